"""CLIP-based rewards loaded with transformers: PickScore, CLIPScore and the LAION aesthetic score.

``clipscore`` is the CLIP score of the public TP-GRPO / Flow-GRPO code (``flow_grpo/clip_scorer.py``):
the model's image-text logit ``exp(logit_scale) * cos(image, prompt)`` divided by
:data:`CLIPSCORE_DIVISOR` (30), negative cosines kept (``100 / 30 * cos`` with CLIP ViT-L/14).
``clipscore_hessel`` is CLIPScore as Hessel et al. (2021) define it, ``w * max(cos, 0)`` with w = 2.5.

Every scorer takes images ``(N, 3, H, W)`` (float in ``[0, 1]`` or uint8) on any device,
preprocesses them on the reward device as the model's processor would (:class:`ImagePreprocess`),
runs the model in chunks of ``batch_size`` images under ``torch.no_grad`` in the configured dtype,
and returns float32 ``(N,)`` on the CPU. Text is tokenised once per distinct prompt (a GRPO batch repeats each
prompt ``G`` times).

transformers is imported inside the factories, so importing this module stays light.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger
from torch import nn

from flow_grpo.command_flags import InputNotFoundError, InputValueError
from flow_grpo.rewards.options import chunk_slices, parse_options, resolve_dtype, resolve_weights_file
from flow_grpo.rewards.preprocess import ImagePreprocess
from flow_grpo.rewards.registry import register_reward

__all__ = [
    "AESTHETIC_DEFAULTS",
    "CLIPSCORE_DEFAULTS",
    "CLIPSCORE_DIVISOR",
    "CLIPSCORE_HESSEL_DEFAULTS",
    "PICKSCORE_DEFAULTS",
    "PICKSCORE_DIVISOR",
    "AestheticHead",
    "AestheticReward",
    "ClipEncoder",
    "ClipSimilarityReward",
    "make_aesthetic",
    "make_clipscore",
    "make_clipscore_hessel",
    "make_pickscore",
]

logger = get_logger(__name__)

PICKSCORE_DIVISOR = 26.0
"""PickScore is reported divided by 26, which puts typical scores near 0.8-0.9."""

PICKSCORE_DEFAULTS: dict[str, Any] = {
    "model": "yuvalkirstain/PickScore_v1",
    "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "dtype": "auto",
    "batch_size": 64,
}
"""Options of ``pickscore`` (mirrored in ``config/base.py``)."""

CLIPSCORE_DIVISOR = 30.0
"""The public code's CLIP score is the model's logit ``exp(logit_scale) * cos`` divided by 30."""

CLIPSCORE_DEFAULTS: dict[str, Any] = {
    "model": "openai/clip-vit-large-patch14",
    "processor": "",
    "dtype": "auto",
    "batch_size": 64,
}
"""Options of ``clipscore`` (mirrored in ``config/base.py``)."""

CLIPSCORE_HESSEL_DEFAULTS: dict[str, Any] = {**CLIPSCORE_DEFAULTS, "scale": 2.5}
"""Options of ``clipscore_hessel`` (mirrored in ``config/base.py``)."""

AESTHETIC_DEFAULTS: dict[str, Any] = {
    "model": "openai/clip-vit-large-patch14",
    "processor": "",
    "head": "assets/sac+logos+ava1-l14-linearMSE.pth",
    "dtype": "auto",
    "batch_size": 64,
}
"""Options of ``aesthetic`` (mirrored in ``config/base.py``)."""


class EmbeddingEncoder:
    """A contrastive image-text model with its tokenizer and an on-device image preprocessing.

    Subclasses say how one chunk of pixels or prompts is embedded; this class chunks, encodes each
    distinct prompt once and L2-normalises. Embeddings are float32; the model runs in ``dtype``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        preprocess: ImagePreprocess,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels ``(n, 3, h, w)`` -> unnormalised embeddings ``(n, D)``."""
        raise NotImplementedError

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unnormalised embeddings ``(n, D)``."""
        raise NotImplementedError

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] or uint8 -> L2-normalised float32 ``(N, D)`` on the reward device."""
        out = []
        for part in chunk_slices(images.shape[0], self.batch_size):
            pixels = self.preprocess(images[part].to(self.device, non_blocking=True)).to(self.dtype)
            out.append(self._encode_pixels(pixels).float())
        return nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """``N`` prompts -> L2-normalised float32 ``(N, D)``; each distinct prompt is encoded once."""
        unique = list(dict.fromkeys(prompts))
        out = [self._encode_prompts(unique[part]).float() for part in chunk_slices(len(unique), self.batch_size)]
        embeddings = nn.functional.normalize(torch.cat(out), dim=-1)
        index = {prompt: i for i, prompt in enumerate(unique)}
        return embeddings[torch.tensor([index[p] for p in prompts], device=embeddings.device)]

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of each image with its prompt: float32 ``(N,)`` on the reward device."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(dim=-1)


class ClipEncoder(EmbeddingEncoder):
    """A transformers ``CLIPModel`` (PickScore, CLIPScore, the aesthetic predictor's backbone)."""

    @property
    def max_length(self) -> int:
        """Prompt tokens kept: the tokenizer's limit, at most the text model's position embeddings."""
        text_positions = self.model.config.text_config.max_position_embeddings
        return min(int(getattr(self.tokenizer, "model_max_length", text_positions)), text_positions)

    @classmethod
    def load(
        cls, reward: str, model: str, processor: str, device: torch.device, dtype_name: str, batch_size: int
    ) -> ClipEncoder:
        """Load a ``CLIPModel`` and its processor (hub ids or local directories).

        Args:
            reward: reward name, for messages.
            model: hub id or directory of the ``CLIPModel`` weights.
            processor: hub id or directory of the processor; empty = same as ``model``.
        """
        from transformers import AutoProcessor, CLIPModel

        dtype = resolve_dtype(dtype_name, device, reward)
        processor = processor or model
        try:
            clip = CLIPModel.from_pretrained(model)
        except (OSError, ValueError) as error:
            raise InputNotFoundError(
                f"Could not load the {reward} model from {model!r} ({error}); set reward_options.{reward}.model "
                "to a hub id or a local directory holding a CLIPModel."
            ) from error
        try:
            loaded_processor = AutoProcessor.from_pretrained(processor)
        except (OSError, ValueError) as error:
            raise InputNotFoundError(
                f"Could not load the {reward} processor from {processor!r} ({error}); set "
                f"reward_options.{reward}.processor to a hub id or local directory with a CLIP processor."
            ) from error
        tokenizer = getattr(loaded_processor, "tokenizer", None)
        if tokenizer is None or getattr(loaded_processor, "image_processor", None) is None:
            raise InputValueError(
                f"{processor!r} is not a CLIP processor with a tokenizer and an image processor; "
                f"set reward_options.{reward}.processor to one."
            )
        preprocess = ImagePreprocess.from_clip_image_processor(loaded_processor)
        logger.info(f"Loaded {reward} model {model!r} ({dtype}) on {device}", main_process_only=False)
        return cls(clip, tokenizer, preprocess, device, dtype, batch_size)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
        return self.model.text_projection(pooled)

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)`` of the model (100 for trained CLIP models)."""
        return float(self.model.logit_scale.detach().float().exp())


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor MLP on L2-normalised CLIP ViT-L/14 image embeddings.

    Layer indices match the released ``sac+logos+ava1-l14-linearMSE.pth`` state dict
    (``layers.{0,2,4,6,7}``), so it loads with ``load_state_dict``. Dropout is inactive in eval.
    """

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(N, input_dim)`` normalised embeddings -> ``(N,)`` aesthetic scores (about 1-10)."""
        return self.layers(embeddings).squeeze(-1)


class ClipSimilarityReward:
    """``reward(images, prompts, metadata) = scale * cos(image, prompt)``, optionally clamped below.

    Attributes:
        encoder: the :class:`ClipEncoder` (exposed for benchmarks and tests).
    """

    def __init__(self, encoder: ClipEncoder, scale: float, min_cosine: float | None = None) -> None:
        self.encoder = encoder
        self.scale = float(scale)
        self.min_cosine = min_cosine

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] or uint8 -> float32 ``(N,)`` on the CPU."""
        cosine = self.encoder.cosine(images, prompts)
        if self.min_cosine is not None:
            cosine = cosine.clamp(min=self.min_cosine)
        return (self.scale * cosine).cpu()


@register_reward("pickscore")
def make_pickscore(device: torch.device, options: Mapping[str, Any]) -> ClipSimilarityReward:
    """PickScore: ``exp(logit_scale) * cos(image, prompt) / 26`` with the PickScore CLIP ViT-H/14."""
    opts = parse_options("pickscore", options, PICKSCORE_DEFAULTS)
    encoder = ClipEncoder.load("pickscore", opts["model"], opts["processor"], device, opts["dtype"], opts["batch_size"])
    return ClipSimilarityReward(encoder, encoder.logit_scale / PICKSCORE_DIVISOR)


@register_reward("clipscore")
def make_clipscore(device: torch.device, options: Mapping[str, Any]) -> ClipSimilarityReward:
    """The public code's CLIP score: ``exp(logit_scale) * cos(image, prompt) / 30`` with CLIP ViT-L/14."""
    opts = parse_options("clipscore", options, CLIPSCORE_DEFAULTS)
    encoder = ClipEncoder.load("clipscore", opts["model"], opts["processor"], device, opts["dtype"], opts["batch_size"])
    return ClipSimilarityReward(encoder, encoder.logit_scale / CLIPSCORE_DIVISOR)


@register_reward("clipscore_hessel")
def make_clipscore_hessel(device: torch.device, options: Mapping[str, Any]) -> ClipSimilarityReward:
    """CLIPScore (Hessel et al., 2021): ``scale * max(cos(image, prompt), 0)`` with CLIP ViT-L/14."""
    opts = parse_options("clipscore_hessel", options, CLIPSCORE_HESSEL_DEFAULTS)
    encoder = ClipEncoder.load(
        "clipscore_hessel", opts["model"], opts["processor"], device, opts["dtype"], opts["batch_size"]
    )
    return ClipSimilarityReward(encoder, opts["scale"], min_cosine=0.0)


def load_aesthetic_head(file: str, input_dim: int) -> AestheticHead:
    """Load an :class:`AestheticHead` from a ``.pth`` state dict (tensors only) or ``.safetensors``."""
    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        # weights_only: a plain state dict needs no unpickling of arbitrary objects.
        state = torch.load(file, map_location="cpu", weights_only=True)
    head = AestheticHead(input_dim)
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        raise InputValueError(
            f"{file!r} is not an aesthetic head for {input_dim}-dimensional CLIP embeddings ({error}); "
            "use the LAION 'sac+logos+ava1-l14-linearMSE.pth' weights with CLIP ViT-L/14."
        ) from error
    return head.eval().requires_grad_(False)


@register_reward("aesthetic")
def make_aesthetic(device: torch.device, options: Mapping[str, Any]) -> AestheticReward:
    """LAION aesthetic score: the MLP head on normalised CLIP ViT-L/14 image embeddings."""
    opts = parse_options("aesthetic", options, AESTHETIC_DEFAULTS)
    try:
        head_file = resolve_weights_file(opts["head"], "aesthetic", "head")
    except FileNotFoundError as error:
        raise InputNotFoundError(
            f"{error} The aesthetic head is 'sac+logos+ava1-l14-linearMSE.pth' from the LAION improved "
            "aesthetic predictor (christophschuhmann/improved-aesthetic-predictor on GitHub)."
        ) from error
    encoder = ClipEncoder.load("aesthetic", opts["model"], opts["processor"], device, opts["dtype"], opts["batch_size"])
    head = load_aesthetic_head(head_file, encoder.model.config.projection_dim).to(device)
    return AestheticReward(encoder, head)


class AestheticReward:
    """``reward(images, prompts, metadata) = head(normalised CLIP image embedding)``; prompts are ignored.

    Attributes:
        encoder: the CLIP ViT-L/14 :class:`ClipEncoder`; head: the :class:`AestheticHead` (float32).
    """

    def __init__(self, encoder: ClipEncoder, head: AestheticHead) -> None:
        self.encoder = encoder
        self.head = head

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] or uint8 -> float32 ``(N,)`` CPU aesthetic score (about 1-10 with real weights)."""
        return self.head(self.encoder.image_embeddings(images)).float().cpu()
