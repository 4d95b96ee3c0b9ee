"""HPSv3 (Ma et al., 2025) scored in-project: Qwen2-VL-7B with the authors' preference head.

The authors' package (``hpsv3`` 1.0) pins ``transformers==4.45.2``, and this project needs transformers 5,
so it cannot share the environment. This module runs the same model with transformers 5's
:class:`~transformers.Qwen2VLModel`, following the package's ``HPSv3RewardInferencer``:

- **Input.** One user turn of the base model's chat template (``add_generation_prompt=True``): the image,
  then :data:`HPSV3_INSTRUCTION` with the prompt filled in, followed by :data:`HPSV3_RATING_REQUEST`,
  which holds the special token ``<|Reward|>`` (added to the tokenizer as the package adds it; the
  checkpoint's embedding has one row more than the base tokenizer for it). Batches are padded on the
  right.
- **Image.** Resized with PIL bicubic to Qwen2-VL's ``smart_resize`` of it with ``min_pixels`` =
  ``max_pixels`` = :data:`HPSV3_PIXELS` (256 * 28 * 28): both sides multiples of 28, the aspect kept,
  the area that many pixels as closely as the rounding allows (448 x 448 for a square image); then the
  base model's image processor (rescale, CLIP normalisation, 14 px patches, 2 x 2 merge).
- **Model.** The image features replace the image-pad token embeddings; the language model then runs
  without position ids, so every token, the image's too, gets its sequence index on all three M-RoPE
  axes (the package calls the language model directly and skips Qwen2-VL's 2-D image positions).
- **Head.** ``Linear(hidden, 1024) - ReLU - Dropout(0.05) - Linear(1024, 16) - ReLU - Linear(16, 2)`` in
  float32 on the final hidden state at ``<|Reward|>``: ``(mu, sigma)`` of the preference distribution;
  the score is ``mu``.
- **Checkpoint.** ``HPSv3.safetensors`` (MizzenAI/HPSv3) holds the whole model as transformers 4.45 named
  it: ``model.*`` (language model), ``visual.*`` (vision tower and merger), ``lm_head.weight`` (unused
  here) and ``rm_head.{0,3,5}.*``. Only the base model's ``config.json`` and processor files are read from
  ``base_model``, never its weights.

``tests/test_preference_parity.py`` checks token ids and scores against the package on tiny weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger
from PIL import Image
from torch import nn

from flow_grpo.rewards.key_maps import KeyMap
from flow_grpo.command_flags import InputNotFoundError, InputValueError
from flow_grpo.rewards.options import chunk_slices, parse_options, resolve_dtype, resolve_weights_file
from flow_grpo.rewards.registry import register_reward
from flow_grpo.rewards.transport import images_to_uint8

__all__ = [
    "HPSV3_DEFAULTS",
    "HPSV3_INSTRUCTION",
    "HPSV3_KEYS",
    "HPSV3_PIXELS",
    "HPSV3_RATING_REQUEST",
    "HPSv3Model",
    "HPSv3Scorer",
    "REWARD_TOKEN",
    "hpsv3_conversation",
    "hpsv3_head",
    "hpsv3_resize",
    "load_hpsv3",
    "make_hpsv3",
]

logger = get_logger(__name__)

HPSV3_DEFAULTS: dict[str, Any] = {
    "checkpoint": "MizzenAI/HPSv3:HPSv3.safetensors",
    "base_model": "Qwen/Qwen2-VL-7B-Instruct",
    "dtype": "auto",
    "batch_size": 8,
}
"""Options of ``hpsv3`` (mirrored in ``config/base.py``); ``auto`` is bfloat16 on CUDA (the authors'), else float32."""

HPSV3_PIXELS = 256 * 28 * 28
"""Pixels of every image HPSv3 sees (the package's ``min_pixels`` = ``max_pixels``)."""
REWARD_TOKEN = "<|Reward|>"
"""The special token whose final hidden state the head reads."""

# The package's prompt text (hpsv3/dataset/data_collator_qwen.py: INSTRUCTION and
# prompt_with_special_token), byte for byte: the model was trained on it.
HPSV3_INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and "
    "give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 "
    "being the worst and 10 being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be "
    "considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, "
    "such as abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and "
    "easy to interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other "
    "visual elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color "
    "scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should "
    "convey a sense of harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, "
    "violent, or adult material. If such content is present, the image quality and satisfaction score "
    "should be the lowest possible. \n"
    "\n"
    "**Text Alignment:**  \n"
    "Assess how well the image matches the textual prompt across the following sub-dimensions:\n"
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, "
    "object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n"
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate "
    "how well the image adheres to this style.\n"
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in "
    "the image logically fit the scenario described in the prompt. The environment should support and "
    "enhance the subject without contradictions.\n"
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, "
    "clothing, accessories, expressions, actions) are faithfully represented in the image. Minor "
    "deviations may be acceptable, but critical attributes should be preserved.\n"
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are "
    "captured in the image. The generated content should not introduce elements that conflict with or "
    "distort the original description.\n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n"
)
HPSV3_RATING_REQUEST = (
    "\n"
    "Please provide the overall ratings of this image: <|Reward|>\n"
    "\n"
    "END\n"
)

HPSV3_KEYS = KeyMap(
    [
        ("model.{rest}", "backbone.language_model.{rest}"),
        ("visual.{rest}", "backbone.visual.{rest}"),
        ("rm_head.{rest}", "head.{rest}"),
    ]
)
"""``HPSv3.safetensors`` keys (transformers 4.45 names) <-> :class:`HPSv3Model` parameters; ``lm_head`` is unused."""


def hpsv3_head(hidden_size: int) -> nn.Sequential:
    """The authors' ``ranknet`` head: hidden -> 1024 -> 16 -> 2 with ReLUs (indices 0, 3, 5 hold the weights)."""
    return nn.Sequential(
        nn.Linear(hidden_size, 1024),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(1024, 16),
        nn.ReLU(),
        nn.Linear(16, 2),
    )


class HPSv3Model(nn.Module):
    """Qwen2-VL (``backbone``, a transformers :class:`~transformers.Qwen2VLModel`) and the float32 ``head``."""

    def __init__(self, config: Any, reward_token_id: int) -> None:
        from transformers import Qwen2VLModel

        super().__init__()
        self.backbone = Qwen2VLModel(config)
        self.head = hpsv3_head(config.text_config.hidden_size)
        self.reward_token_id = reward_token_id

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        image_grid_thw: torch.Tensor,
    ) -> torch.Tensor:
        """Processor outputs for N conversations -> float32 ``(N, 2)``: ``(mu, sigma)`` at each ``<|Reward|>``.

        Args:
            input_ids, attention_mask: ``(N, L)``, right-padded, one reward token per row.
            pixel_values: ``(P, 3 * 2 * 14 * 14)`` patches of all images; image_grid_thw: ``(N, 3)``.
        """
        rows = input_ids == self.reward_token_id
        if not torch.equal(rows.sum(dim=1), torch.ones_like(rows[:, 0], dtype=torch.long)):
            raise ValueError(f"every HPSv3 input needs exactly one {REWARD_TOKEN} token; a prompt may not contain it")
        embeds = self.backbone.get_input_embeddings()(input_ids)
        image = self.backbone.visual(pixel_values.to(embeds.dtype), grid_thw=image_grid_thw).pooler_output
        slots = (input_ids == self.backbone.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, image.to(embeds.dtype))
        # No position ids, as the package: sequence positions on all three rotary axes.
        hidden = self.backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[rows].float())


def hpsv3_resize(image: Image.Image) -> Image.Image:
    """Resize to about :data:`HPSV3_PIXELS` pixels, both sides multiples of 28, with PIL bicubic (the package's step)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    height, width = smart_resize(image.height, image.width, factor=28, min_pixels=HPSV3_PIXELS, max_pixels=HPSV3_PIXELS)
    return image.convert("RGB").resize((width, height), Image.BICUBIC)


def hpsv3_conversation(prompt: str) -> list[dict[str, Any]]:
    """The one user turn HPSv3 scores: the image, then the instruction with ``prompt`` and the rating request."""
    text = HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_RATING_REQUEST
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def load_hpsv3(checkpoint: str, base_model: str) -> tuple[HPSv3Model, Any]:
    """Build :class:`HPSv3Model` from ``HPSv3.safetensors`` and the base model's config and processor (CPU, file dtype).

    Returns:
        ``(model, processor)``; the processor's tokenizer holds ``<|Reward|>`` and pads on the right.
    """
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(base_model)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    processor.tokenizer.padding_side = "right"
    reward_token_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    state = HPSV3_KEYS.to_module(load_file(checkpoint))
    embedding = state.get("backbone.language_model.embed_tokens.weight")
    if embedding is None or "head.5.weight" not in state:
        raise InputValueError(
            f"{checkpoint!r} is not an HPSv3 checkpoint (no 'model.embed_tokens.weight' or 'rm_head.5.weight'); "
            "point reward_options.hpsv3.checkpoint at the published HPSv3.safetensors"
        )
    if reward_token_id != embedding.shape[0] - 1:
        raise InputValueError(
            f"the tokenizer of {base_model!r} gives {REWARD_TOKEN} the id {reward_token_id}, but the checkpoint's "
            f"embedding has {embedding.shape[0]} rows (HPSv3 appended the token last); use Qwen2-VL-7B-Instruct's files"
        )
    config = AutoConfig.from_pretrained(base_model)
    config.text_config.vocab_size = embedding.shape[0]
    with init_empty_weights(include_buffers=False):
        model = HPSv3Model(config, reward_token_id)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False), processor


class HPSv3Scorer:
    """``reward(images, prompts, metadata) -> HPSv3 mu``; ``model`` is the :class:`HPSv3Model`."""

    def __init__(self, model: HPSv3Model, processor: Any, device: torch.device, dtype: torch.dtype, batch_size: int) -> None:
        self.model = model.to(device=device, dtype=dtype)
        self.model.head.float()
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The processor's batch for PIL ``images`` and their ``prompts`` (``input_ids``, ``pixel_values``, ...)."""
        texts = self.processor.apply_chat_template(
            [hpsv3_conversation(prompt) for prompt in prompts], tokenize=False, add_generation_prompt=True
        )
        return self.processor(
            text=texts, images=[hpsv3_resize(image) for image in images], padding=True, return_tensors="pt"
        )

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] or uint8 -> float32 ``(N,)`` CPU HPSv3 score (``mu``)."""
        pil = [Image.fromarray(pixels) for pixels in images_to_uint8(images)]
        scores = []
        for part in chunk_slices(len(pil), self.batch_size):
            batch = self.inputs(pil[part], prompts[part]).to(self.device)
            mu_sigma = self.model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
            scores.append(mu_sigma[:, 0].cpu())
        return torch.cat(scores)


@register_reward("hpsv3")
def make_hpsv3(device: torch.device, options: Mapping[str, Any]) -> HPSv3Scorer:
    """HPSv3 from the published ``HPSv3.safetensors`` and Qwen2-VL-7B-Instruct's config and processor (module docstring)."""
    opts = parse_options("hpsv3", options, HPSV3_DEFAULTS)
    if opts["dtype"] == "auto":  # the authors score in bfloat16
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dtype = resolve_dtype(opts["dtype"], device, "hpsv3")
    checkpoint = resolve_weights_file(opts["checkpoint"], "hpsv3", "checkpoint")
    try:
        model, processor = load_hpsv3(checkpoint, opts["base_model"])
    except OSError as error:
        raise InputNotFoundError(
            f"Could not load the hpsv3 base model files from {opts['base_model']!r} ({error}); set "
            "reward_options.hpsv3.base_model to 'Qwen/Qwen2-VL-7B-Instruct' or a local copy of its config and processor."
        ) from error
    logger.info(f"Loaded hpsv3 from {checkpoint!r} ({dtype}) on {device}", main_process_only=False)
    return HPSv3Scorer(model, processor, device, dtype, opts["batch_size"])
