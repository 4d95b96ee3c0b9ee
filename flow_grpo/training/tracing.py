"""Byte counting of model calls under fake tensors: real architectures, no weights, no device.

Models are built inside `torch._subclasses.fake_tensor.FakeTensorMode`: every tensor has a shape,
dtype and storage size but no data, so a real-size forward and backward runs on any CPU in seconds.
Two counters observe such a run:

- `SavedBytes`: `torch.autograd.graph.saved_tensors_hooks` sees every tensor autograd keeps for the
  backward pass; storages are counted once and parameter storages are left out.
- `LiveBytes`: a dispatch mode that follows every storage an operator creates until it is freed
  and records the peak of the bytes alive at once: the simulated allocator peak of a call,
  including transients, recomputation under gradient checkpointing and the backward pass.

Pitfalls met and handled here: `module.to(...)` cannot swap fake parameters, so models are built
under the target default dtype, buffers are cast by assignment and peft's adapter injection runs
with `Module.to` as a no-op (the LoRA weights are created in float32 on the same fake device).

`architecture(config)` names what a preset builds: the transformer, VAE and scheduler configs of
the published checkpoints, the text encoders (CLIP-L, OpenCLIP bigG, T5-XXL v1.1 encoder, Qwen3, Qwen2.5-VL) and the
reward backbones (in `flow_grpo.testing.architectures` and `architectures_qwen`), or a local pipeline directory's own
component configs (e.g. the tiny models).
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from unittest import mock

import ml_collections
import torch
import transformers
from peft import LoraConfig
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from flow_grpo.models import ModelAdapter, PromptEmbeds, adapter_class
from flow_grpo.rewards.remote import NAMED_REMOTE_REWARDS
from flow_grpo.testing.architectures import (
    CLIP_L_TEXT,
    CLIP_VIT_H_14,
    CLIP_VIT_L_14,
    FLUX2_KLEIN_4B_TRANSFORMER,
    FLUX2_SCHEDULER,
    FLUX2_VAE,
    FLUX_DEV_TRANSFORMER,
    FLUX_SCHEDULER,
    FLUX_VAE,
    OPENCLIP_BIGG_TEXT,
    SD35_LARGE_TRANSFORMER,
    SD35_MEDIUM_TRANSFORMER,
    SD3_SCHEDULER,
    SD3_VAE,
    T5_XXL_ENCODER,
    Z_IMAGE_SCHEDULER,
    Z_IMAGE_TRANSFORMER,
)
from flow_grpo.testing.architectures_qwen import (
    QWEN25_VL_7B,
    QWEN3_4B,
    QWEN_IMAGE_SCHEDULER,
    QWEN_IMAGE_TRANSFORMER,
    QWEN_IMAGE_VAE,
)

__all__ = [
    "REMOTE_REWARDS",
    "Architecture",
    "LiveBytes",
    "RewardModel",
    "SavedBytes",
    "architecture",
    "build_fake_adapter",
    "build_frozen",
    "default_dtype",
    "fake_mode",
    "fake_prompts",
    "live_peak",
    "module_bytes",
    "module_tensors",
    "reward_models",
    "reward_trace",
    "storage_key",
    "text_encoder_bytes",
]

# ------------------------------------------------------------------------------ architectures

REMOTE_REWARDS = frozenset({"remote", *NAMED_REMOTE_REWARDS})
"""Rewards scored by a server process: no model on the training device."""

_CPU_REWARDS = frozenset({"jpeg_compressibility", "jpeg_incompressibility"})

_SD3_TEXT = {
    "text_encoder": ("CLIPTextModelWithProjection", CLIP_L_TEXT),
    "text_encoder_2": ("CLIPTextModelWithProjection", OPENCLIP_BIGG_TEXT),
    "text_encoder_3": ("T5EncoderModel", T5_XXL_ENCODER),
}
_FLUX_TEXT = {"text_encoder": ("CLIPTextModel", CLIP_L_TEXT), "text_encoder_2": ("T5EncoderModel", T5_XXL_ENCODER)}
_SD3 = {"vae": SD3_VAE, "scheduler": SD3_SCHEDULER}
_FLUX2_KLEIN_4B = ("flux2_klein", {"transformer": FLUX2_KLEIN_4B_TRANSFORMER, "vae": FLUX2_VAE, "scheduler": FLUX2_SCHEDULER},
                   {"text_encoder": ("Qwen3ForCausalLM", QWEN3_4B)})
_Z_IMAGE = ("z_image", {"transformer": Z_IMAGE_TRANSFORMER, "vae": FLUX_VAE, "scheduler": Z_IMAGE_SCHEDULER},
            {"text_encoder": ("Qwen3Model", QWEN3_4B)})

_HUB: dict[str, tuple[str, dict[str, Mapping[str, Any]], dict[str, tuple[str, Mapping[str, Any]]]]] = {
    "stabilityai/stable-diffusion-3.5-medium": ("sd3", {"transformer": SD35_MEDIUM_TRANSFORMER, **_SD3}, _SD3_TEXT),
    "stabilityai/stable-diffusion-3.5-large": ("sd3", {"transformer": SD35_LARGE_TRANSFORMER, **_SD3}, _SD3_TEXT),
    "black-forest-labs/FLUX.1-dev": (
        "flux", {"transformer": FLUX_DEV_TRANSFORMER, "vae": FLUX_VAE, "scheduler": FLUX_SCHEDULER}, _FLUX_TEXT,
    ),
    "black-forest-labs/FLUX.2-klein-4B": _FLUX2_KLEIN_4B,
    "black-forest-labs/FLUX.2-klein-base-4B": _FLUX2_KLEIN_4B,
    "Tongyi-MAI/Z-Image": _Z_IMAGE,
    "Tongyi-MAI/Z-Image-Turbo": _Z_IMAGE,
    "Qwen/Qwen-Image": (
        "qwen_image", {"transformer": QWEN_IMAGE_TRANSFORMER, "vae": QWEN_IMAGE_VAE, "scheduler": QWEN_IMAGE_SCHEDULER},
        {"text_encoder": ("Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B)},
    ),
}
"""Hub id -> (family, component configs, text encoders as (transformers class, config)) of the published checkpoints."""


@dataclass(frozen=True)
class Architecture:
    """What a preset builds on the device, as configs.

    Attributes:
        name: label in reports.
        family: the adapter family (`config.pretrained.family`).
        components: diffusers configs of "transformer", "vae" and "scheduler".
        text_encoders: component name -> (transformers class name, config keyword arguments).
        text_tokens: tokens of the prompt embeddings (`ModelAdapter.prompt_tokens`; SD3: 77 CLIP + T5 length).
    """

    name: str
    family: str
    components: Mapping[str, Mapping[str, Any]]
    text_encoders: Mapping[str, tuple[str, Mapping[str, Any]]]
    text_tokens: int


def _read_json(*parts: str) -> dict[str, Any]:
    with open(os.path.join(*parts)) as f:
        return json.load(f)


def _local(root: str) -> tuple[dict, dict]:
    components = {
        "transformer": _read_json(root, "transformer", "config.json"),
        "vae": _read_json(root, "vae", "config.json"),
        "scheduler": _read_json(root, "scheduler", "scheduler_config.json"),
    }
    index = _read_json(root, "model_index.json")
    encoders = {}
    for name, entry in index.items():
        if name.startswith("text_encoder") and isinstance(entry, list) and entry[1]:
            config = _read_json(root, name, "config.json")
            encoders[name] = (entry[1], {k: v for k, v in config.items() if not k.startswith("_")})
    return components, encoders


def architecture(config: ml_collections.ConfigDict) -> Architecture:
    """The architecture of `config.pretrained`: a known hub id or a local pipeline directory."""
    pretrained = config.pretrained
    family = pretrained.family
    root = os.path.expanduser(pretrained.model)
    if os.path.isdir(root):
        components, encoders = _local(root)
        name = os.path.basename(os.path.normpath(root))
    elif pretrained.model in _HUB:
        hub_family, components, encoders = _HUB[pretrained.model]
        if hub_family != family:
            raise ValueError(f"config.pretrained.family={family!r} does not match {pretrained.model} ({hub_family})")
        name = pretrained.model.split("/")[-1]
    else:
        raise ValueError(
            f"no architecture known for config.pretrained.model={pretrained.model!r}: use one of {sorted(_HUB)} "
            "or a local pipeline directory (its component configs are read, no weights)"
        )
    tokens = adapter_class(family).prompt_tokens(pretrained.max_sequence_length)
    return Architecture(name, family, components, encoders, tokens)


_TEXT_ENCODER_BYTES: dict[str, int] = {}


def text_encoder_bytes(arch: Architecture, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of each text encoder's parameters and buffers in `dtype` (built on the meta device, cached)."""
    result = {}
    for name, (class_name, kwargs) in arch.text_encoders.items():
        key = json.dumps([class_name, kwargs, str(dtype)], sort_keys=True, default=str)
        if key not in _TEXT_ENCODER_BYTES:
            model_class = getattr(transformers, class_name)
            with torch.device("meta"):
                model = model_class(model_class.config_class(**kwargs))
            _TEXT_ENCODER_BYTES[key] = module_bytes(model, dtype)
        result[name] = _TEXT_ENCODER_BYTES[key]
    return result


def module_bytes(module: torch.nn.Module, dtype: torch.dtype, exclude: set[int] = frozenset()) -> int:
    """Bytes of `module`'s distinct parameters and buffers once floating ones are cast to `dtype`.

    Tensors whose `id` is in `exclude` (e.g. the float32 LoRA parameters) are left out.
    """
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in exclude:
            continue
        size = dtype.itemsize if tensor.is_floating_point() else tensor.element_size()
        seen[id(tensor)] = tensor.numel() * size
    return sum(seen.values())


@dataclass(frozen=True)
class RewardModel:
    """A reward model on the training device: its `CLIPConfig` arguments, dtype and images per call."""

    name: str
    clip: Mapping[str, Any]
    dtype: torch.dtype
    batch_size: int
    extra_bytes: int = 0  # float32 head on top of the backbone (aesthetic)
    image_size: int = 224


_REWARD_DTYPES = {"auto": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def reward_models(config: ml_collections.ConfigDict) -> list[RewardModel]:
    """The reward models the trainer builds on a CUDA device (union of training and eval rewards).

    Remote and CPU rewards hold no device memory. HPSv2's open_clip ViT-H-14 has the dimensions of
    the CLIP ViT-H/14 config, which stands in for it.
    """
    names = sorted({*config.reward_fn.keys(), *config.eval_reward_fn.keys()})
    models = []
    for name in names:
        if name in REMOTE_REWARDS or name in _CPU_REWARDS:
            continue
        options = config.reward_options[name]
        dtype = _REWARD_DTYPES[options.dtype]
        if name in ("pickscore", "hpsv2"):
            models.append(RewardModel(name, CLIP_VIT_H_14, dtype, options.batch_size))
        elif name in ("clipscore", "clipscore_hessel"):
            models.append(RewardModel(name, CLIP_VIT_L_14, dtype, options.batch_size))
        elif name == "aesthetic":
            head = (768 * 1024 + 1024) + (1024 * 128 + 128) + (128 * 64 + 64) + (64 * 16 + 16) + (16 + 1)
            models.append(RewardModel(name, CLIP_VIT_L_14, dtype, options.batch_size, extra_bytes=4 * head))
        else:
            raise ValueError(f"memory preflight: no device-memory model for reward {name!r}; add it to {__name__}")
    return models


_REWARD_TRACES: dict[str, dict[str, int]] = {}


def reward_trace(reward: RewardModel, images: int) -> dict[str, int]:
    """Bytes of a CLIP reward: "weights", and "live", the peak of one image-embedding call of `images` images (cached)."""
    key = json.dumps([reward.clip, str(reward.dtype), images, reward.image_size, reward.extra_bytes], sort_keys=True, default=str)
    if key not in _REWARD_TRACES:
        with fake_mode(), default_dtype(reward.dtype):
            model = transformers.CLIPModel(transformers.CLIPConfig(**reward.clip)).requires_grad_(False).eval()
            pixels = torch.empty(images, 3, reward.image_size, reward.image_size, dtype=reward.dtype)

            def embed() -> torch.Tensor:
                with torch.no_grad():
                    return model.get_image_features(pixel_values=pixels)

            _REWARD_TRACES[key] = {
                "weights": module_bytes(model, reward.dtype) + reward.extra_bytes,
                "live": live_peak(embed, [*module_tensors(model), pixels]),
            }
    return _REWARD_TRACES[key]


# ---------------------------------------------------------------------------------- counting


def storage_key(tensor: torch.Tensor) -> int:
    """Identity of the storage behind `tensor` (shared by all its views)."""
    return tensor.untyped_storage()._cdata


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode for building and tracing (no data is ever allocated)."""
    return FakeTensorMode()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating tensors in `dtype` inside the block."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters left out.

    Use as a context manager around a forward pass; `bytes` holds the total afterwards.
    """

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        self._excluded = {storage_key(p) for p in parameters}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key not in self._excluded:
            self._seen[key] = tensor.untyped_storage().nbytes()
        return tensor

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._hooks.__exit__(*exc_info)


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the block that are alive at once.

    Storages that exist before (parameters, buffers, inputs passed to `ignore`) are not counted,
    nor are views of them. A storage counts from the operator that creates it until its last
    reference dies, as a caching allocator would see it (without rounding or fragmentation).
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._known: set[int] = set()
        self._alive: dict[int, weakref.finalize] = {}
        self.current = 0
        self.peak = 0
        self.ignore(existing)

    def ignore(self, tensors: Iterable[torch.Tensor]) -> None:
        """Leave the storages of `tensors` out of the count."""
        self._known.update(storage_key(t) for t in tensors)

    def _free(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._alive.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key in self._known or key in self._alive:
                continue
            nbytes = storage.nbytes()
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            self._alive[key] = weakref.finalize(storage, self._free, key, nbytes)
        return out


def _cast_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Floating buffers to `dtype`, as loading with `dtype=...` gives (assignment: fake tensors cannot swap)."""
    for submodule in module.modules():
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                submodule._buffers[name] = buffer.to(dtype)


def build_frozen(model_class: Any, config: Mapping[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """A frozen eval-mode `model_class` from its config in `dtype` (parameters and floating buffers)."""
    with default_dtype(dtype):
        model = model_class.from_config(dict(config))
    _cast_buffers(model, dtype)
    return model.requires_grad_(False).eval()


def add_lora(transformer: torch.nn.Module, rank: int, alpha: int, targets: list[str]) -> list[torch.nn.Parameter]:
    """Add the trainer's LoRA (float32) to `transformer`; returns the trainable parameters."""
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    with default_dtype(torch.float32), mock.patch.object(torch.nn.Module, "to", lambda self, *args, **kwargs: self):
        transformer.add_adapter(config)
    return [p for p in transformer.parameters() if p.requires_grad]


def build_fake_adapter(
    family: str,
    components: Mapping[str, Mapping[str, Any]],
    dtype: torch.dtype,
    *,
    guidance_scale: float,
    text_tokens: int,
    lora: tuple[int, int] | None,
    gradient_checkpointing: bool = False,
) -> tuple[ModelAdapter, list[torch.nn.Parameter]]:
    """The family's adapter over a transformer (in `dtype`, with LoRA) and a float32 VAE, no text encoders.

    Call inside a fake mode. `components` holds the diffusers configs "transformer", "vae" and
    "scheduler"; `lora` is (rank, alpha) or None. The component classes are the ones the family's
    pipeline takes; a CFG negative prompt is a placeholder row (`fake_prompts`). Returns the adapter
    and the LoRA parameters.
    """
    cls = adapter_class(family)
    transformer = build_frozen(cls.component_class("transformer"), components["transformer"], dtype)
    vae = build_frozen(cls.component_class("vae"), components["vae"], torch.float32)
    with unset_fake_temporarily():  # the scheduler computes its grid with real tensors
        scheduler = cls.component_class("scheduler").from_config(dict(components["scheduler"]))
    trainable = add_lora(transformer, *lora, cls.lora_target_modules) if lora else []
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    adapter = cls.from_components(
        transformer, vae, scheduler, guidance_scale=guidance_scale, max_sequence_length=text_tokens
    )
    if adapter.uses_cfg:
        adapter._negative = fake_prompts(adapter, 1, text_tokens)  # what `negative_prompt()` returns
    return adapter, trainable


def fake_prompts(adapter: ModelAdapter, rows: int, text_tokens: int) -> PromptEmbeds:
    """Prompt embeddings of `rows` prompts of `text_tokens` tokens, shaped as the family's encoders give them."""
    shapes = adapter.prompt_shapes(text_tokens)
    return PromptEmbeds({name: torch.empty(rows, *shape, dtype=dtype) for name, (shape, dtype) in shapes.items()})


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers of `modules` (storages a trace leaves out)."""
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def live_peak(run: Callable[[], Any], existing: Iterable[torch.Tensor]) -> int:
    """Peak live bytes of `run()`, leaving out the storages of `existing` (call inside a fake mode)."""
    tracker = LiveBytes(existing)
    with tracker:
        result = run()
        del result
    return tracker.peak
