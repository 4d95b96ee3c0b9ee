"""Tiny ImageReward and HPSv3 checkpoints in their published layouts, with seeded random weights.

Each builder writes what the real scorer reads, in the files' real formats, so that both the in-project
scorers (:mod:`flow_grpo.rewards.imagereward`, :mod:`flow_grpo.rewards.hpsv3`) and the authors' packages
load them (``tests/parity/`` runs the packages):

- :func:`save_tiny_imagereward`: ``ImageReward.pt`` (the authors' key names), ``med_config.json`` and a
  WordPiece ``vocab.txt`` tokenizer directory.
- :func:`save_tiny_hpsv3`: ``HPSv3.safetensors`` (transformers 4.45 key names + ``rm_head``) and a base model
  directory like Qwen2-VL-7B-Instruct's (flat ``config.json``, byte-level BPE tokenizer, image processor
  and chat template files, ``model.safetensors``).

Every tensor is drawn in key order from one seeded generator (:func:`seeded_tensors`), so a checkpoint is a
function of the seed and the architecture's tensor names and shapes only, not of any library's
initialisation. :func:`parity_inputs` makes the images and prompts the parity references are scored on.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Mapping
from pathlib import Path

import torch

__all__ = [
    "QWEN2_VL_CHAT_TEMPLATE",
    "parity_inputs",
    "save_tiny_hpsv3",
    "save_tiny_imagereward",
    "seeded_tensors",
    "tensor_digest",
]

QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Renders a conversation as Qwen2-VL-Instruct's template does (default system turn, vision markers)."""

_QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
)
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def seeded_tensors(shapes: Mapping[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Float32 tensors for ``shapes``, drawn in sorted key order from one generator seeded with ``seed``.

    Norm weights (1-D ``*weight``) are ``1 + 0.1 n``, biases ``0.1 n``, everything else ``n / sqrt(fan_in)``
    with ``n`` standard normal, so activations keep their scale through a few layers.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key in sorted(shapes):
        shape = torch.Size(shapes[key])
        noise = torch.randn(shape, generator=generator)
        if len(shape) == 1 and key.endswith("weight"):
            tensors[key] = 1.0 + 0.1 * noise
        elif len(shape) == 1:
            tensors[key] = 0.1 * noise
        else:
            tensors[key] = noise / shape[1:].numel() ** 0.5
    return tensors


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> float:
    """A fingerprint of a state dict: the sum over keys of ``sum(|t|) * (key index + 1)`` in float64."""
    return float(sum(tensors[key].double().abs().sum() * (index + 1) for index, key in enumerate(sorted(tensors))))


def parity_inputs(count: int = 3, size: tuple[int, int] = (96, 80), seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """``count`` seeded uint8 images ``(count, 3, H, W)`` (not square, so resizing and cropping matter) and prompts."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, *size), generator=generator, dtype=torch.uint8)
    # the last prompt is longer than ImageReward's 35 tokens, so its truncation is compared too
    prompts = ["a photo of a cat", "A red dog, painted.", "two blue birds on a tree at dusk, a watercolour in soft light"]
    prompts = prompts[:count]
    return images, prompts


def _write_json(path: Path, content: object) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def save_tiny_imagereward(path: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write a tiny ImageReward (ViT 128 wide at patch 32, BERT 32 wide, 2 layers each) to ``path``.

    Returns:
        the ``imagereward`` reward options: ``checkpoint``, ``med_config``, ``tokenizer``.
    """
    from flow_grpo.rewards.imagereward import IMAGEREWARD_KEYS, ImageRewardModel, imagereward_configs

    path = Path(path)
    (path / "tokenizer").mkdir(parents=True, exist_ok=True)
    words = ["a", "the", "of", "on", "photo", "cat", "dog", "red", "blue", "bird", "tree"]
    letters = list(string.ascii_lowercase + string.digits)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *".,!?'-", *(f"##{c}" for c in letters), *words]
    (path / "tokenizer" / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    med_config = {
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(vocab) + 2,  # + [DEC], [ENC]
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 40, "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
        "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 128,
    }
    _write_json(path / "med_config.json", med_config)
    # imagereward_configs reads the ViT's sizes from the checkpoint's tensors: these are the ones it looks at.
    vit_shapes = {
        "blip.visual_encoder.cls_token": (1, 1, 128),
        "blip.visual_encoder.pos_embed": (1, 50, 128),
        "blip.visual_encoder.patch_embed.proj.weight": (128, 3, 32, 32),
        "blip.visual_encoder.blocks.0.mlp.fc1.weight": (512, 128),
        **{f"blip.visual_encoder.blocks.{i}.attn.qkv.weight": (384, 128) for i in range(2)},
    }
    vit_tensors = {key: torch.empty(shape) for key, shape in vit_shapes.items()}
    vision_config, text_config = imagereward_configs(vit_tensors, med_config)
    with torch.device("meta"):
        module = ImageRewardModel(vision_config, text_config)
    published = IMAGEREWARD_KEYS.to_published(module.state_dict())
    checkpoint = path / "ImageReward.pt"
    torch.save(seeded_tensors({key: tensor.shape for key, tensor in published.items()}, seed), checkpoint)
    return {"checkpoint": str(checkpoint), "med_config": str(path / "med_config.json"), "tokenizer": str(path / "tokenizer")}


def _qwen_tokenizer_files(directory: Path) -> tuple[int, dict[str, int]]:
    """Write a byte-level BPE tokenizer (no merges) with Qwen2-VL's special tokens; returns its length and their ids."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=32768, unk_token=None, bos_token=None,
                               eos_token=None, pad_token=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS)})
    tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
    tokenizer.save_pretrained(directory)
    return len(tokenizer), dict(zip(_QWEN_SPECIALS, tokenizer.convert_tokens_to_ids(list(_QWEN_SPECIALS))))


def _qwen2_vl_config(token_ids: Mapping[str, int], vocab_size: int) -> dict:
    """A tiny ``config.json`` in the flat layout of Qwen2-VL-7B-Instruct's (32 wide, 2 layers, 14 px patches)."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "torch_dtype": "float32",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "vocab_size": vocab_size, "tie_word_embeddings": False, "attention_dropout": 0.0, "use_cache": True,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 2,
        "bos_token_id": token_ids["<|endoftext|>"], "eos_token_id": token_ids["<|im_end|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"], "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"], "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_config": {
            "depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3, "hidden_size": 32,
            "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
        },
    }


def save_tiny_hpsv3(path: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write a tiny HPSv3 checkpoint and its base model directory to ``path``.

    Returns:
        the ``hpsv3`` reward options: ``checkpoint`` (``HPSv3.safetensors``) and ``base_model`` (a directory).
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from flow_grpo.rewards.hpsv3 import HPSV3_KEYS, HPSv3Model

    path = Path(path)
    base = path / "base_model"
    base.mkdir(parents=True, exist_ok=True)
    length, token_ids = _qwen_tokenizer_files(base)
    _write_json(base / "config.json", _qwen2_vl_config(token_ids, vocab_size=length + 8))
    _write_json(base / "preprocessor_config.json", {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
    })
    _write_json(base / "chat_template.json", {"chat_template": QWEN2_VL_CHAT_TEMPLATE})
    config = AutoConfig.from_pretrained(base)
    config.text_config.vocab_size = length + 1  # the checkpoint's rows: the tokenizer and <|Reward|>
    with torch.device("meta"):
        module = HPSv3Model(config, reward_token_id=length)
    shapes = {key: tensor.shape for key, tensor in HPSV3_KEYS.to_published(module.state_dict()).items()}
    shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    tensors = seeded_tensors(shapes, seed)
    save_file(tensors, str(path / "HPSv3.safetensors"))
    # The base weights only let the authors' package build its model (HPSv3.safetensors replaces them all);
    # they have the base vocabulary's rows.
    padding = torch.zeros(7, config.text_config.hidden_size)
    base_tensors = {key: value for key, value in tensors.items() if not key.startswith("rm_head.")}
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        base_tensors[key] = torch.cat([tensors[key], padding])
    save_file(base_tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    return {"checkpoint": str(path / "HPSv3.safetensors"), "base_model": str(base)}


def save_parity_inputs(path: str | os.PathLike, seed: int = 0) -> None:
    """Write both tiny models and :func:`parity_inputs` under ``path``, for the reference scripts in ``tests/parity/``.

    Layout: ``imagereward/`` and ``hpsv3/`` (each with the reward options in ``options.json``), ``images/{i}.png``
    and ``prompts.json``.
    """
    from PIL import Image

    path = Path(path)
    images, prompts = parity_inputs()
    (path / "images").mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path / "images" / f"{index}.png")
    _write_json(path / "prompts.json", prompts)
    _write_json(path / "imagereward" / "options.json", save_tiny_imagereward(path / "imagereward", seed))
    _write_json(path / "hpsv3" / "options.json", save_tiny_hpsv3(path / "hpsv3", seed))
