"""Every number of the published settings (docs/algorithm.md, "Published settings"), pinned per preset.

The expected values are written out below from the published text, not read from the presets: a
preset that drifts from the paper's setting fails here, naming the preset and the key.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

import ml_collections
import pytest

from flow_grpo.run.config_checks import derive_layout, validate_config
from flow_grpo.models import ADAPTERS

ROOT = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("presets_for_table", ROOT / "config" / "grpo.py")
presets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(presets)

# Shared by both models (SD3.5-Medium and FLUX.1-dev) and every task.
COMMON: dict[str, Any] = {
    "seed": 42,
    "sample.resolution": 512,
    "sample.step_kind": "cps",
    "sample.group_size": 24,
    "sample.prompts_per_epoch": 48,
    "train.updates_per_epoch": 2,
    "train.learning_rate": 3e-4,
    "train.adam_beta1": 0.9,
    "train.adam_beta2": 0.999,
    "train.adam_weight_decay": 1e-4,
    "train.adam_epsilon": 1e-8,
    "train.max_grad_norm": 1.0,
    "train.clip_range": 1e-5,
    "train.adv_clip_max": 5.0,
    "train.global_std": False,
    "train.beta": 1e-4,
    "train.ema": True,
    "train.ema_decay": 0.9,
    "train.ema_every": 8,
    "pretrained.max_sequence_length": 128,
    "eval_freq": 20,
    "save_freq": 20,
    "eval_before_training": True,
    "sample.eval_batch_size": 16,
    "tp.consistent": True,
    "tp.first_step": True,
    "tp.balance": True,
}

MODELS: dict[str, dict[str, Any]] = {
    "sd3": {
        "pretrained.model": "stabilityai/stable-diffusion-3.5-medium",
        "pretrained.family": "sd3",
        "mixed_precision": "fp16",
        "train.lora_rank": 32,
        "train.lora_alpha": 64,
        "sample.num_steps": 10,
        "sample.eval_num_steps": 40,
        "sample.guidance_scale": 4.5,
        "sample.window_size": 9,
        "sample.window_range": (0, 9),
        "sample.noise_level": 0.7,
        "sample.batch_size": 9,
        "train.batch_size": 9,
    },
    "flux": {
        "pretrained.model": "black-forest-labs/FLUX.1-dev",
        "pretrained.family": "flux",
        "mixed_precision": "bf16",
        "train.lora_rank": 64,
        "train.lora_alpha": 128,
        "sample.num_steps": 6,
        "sample.eval_num_steps": 28,
        "sample.guidance_scale": 3.5,
        "sample.window_size": 5,
        "sample.window_range": (0, 5),  # the reference's GenEval baseline reaches the last step: (0, 6)
        "sample.noise_level": 0.7,
        "sample.batch_size": 3,
        "train.batch_size": 3,
    },
}

TASKS: dict[str, dict[str, Any]] = {
    "pickscore": {"dataset": "dataset/pickscore_sfw", "reward": {"pickscore": 1.0}},
    "geneval": {"dataset": "dataset/geneval", "reward": {"geneval": 1.0}, "sample.eval_batch_size": 14},
    "ocr": {"dataset": "dataset/ocr", "reward": {"ocr": 1.0}},
}

# Attention q/k/v/out of the image stream and add_q/k/v/to_add_out of the context stream.
JOINT_ATTENTION = {
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
}
LORA_TARGETS = {
    "sd3": JOINT_ATTENTION,
    "flux": JOINT_ATTENTION | {"ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"},
    # FLUX.2 feed-forward names, and the single-stream blocks' fused q/k/v + MLP-in projection.
    "flux2_klein": JOINT_ATTENTION | {
        "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out", "attn.to_qkv_mlp_proj",
    },
    "z_image": {"attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"},
    "qwen_image": JOINT_ATTENTION | {"img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"},
}


def expected_settings(task: str, family: str, algorithm: str, *, basic: bool = False) -> dict[str, Any]:
    """The published settings of one preset, as `{dotted key: value}` plus `reward`."""
    expected = {**COMMON, **MODELS[family], **TASKS[task], "algorithm": algorithm}
    if algorithm == "flow_grpo" and family == "flux":
        expected["sample.noise_level"] = 0.8  # the reference baseline script's; TP-GRPO uses 0.7
    if basic:
        expected["tp.consistent"] = False
    return expected


PUBLISHED: dict[str, dict[str, Any]] = {}
for _task in TASKS:
    for _family in MODELS:
        PUBLISHED[f"{_task}_{_family}"] = expected_settings(_task, _family, "tp_grpo")
        PUBLISHED[f"{_task}_{_family}_flow_grpo"] = expected_settings(_task, _family, "flow_grpo")
PUBLISHED["ocr_sd3_basic"] = expected_settings("ocr", "sd3", "tp_grpo", basic=True)

# Models the TP-GRPO paper did not train: the paper's algorithm settings (COMMON) on each model, with
# the model's own settings (config/grpo.py cites the peer recipe or says where they are our choice).
NEW_MODELS: dict[str, dict[str, Any]] = {
    "sd3_large": {
        **MODELS["sd3"],
        "pretrained.model": "stabilityai/stable-diffusion-3.5-large",
        "mixed_precision": "bf16",
        "train.gradient_checkpointing": True,  # the memory preflight: 127 GB per process without it
    },
    # Flow-Factory's FLUX.2-klein GRPO recipe: 4 steps, guidance 1, noise 0.5, LoRA r64/alpha128.
    "flux2_klein": {
        "pretrained.model": "black-forest-labs/FLUX.2-klein-4B",
        "pretrained.family": "flux2_klein",
        "mixed_precision": "bf16",
        "train.lora_rank": 64,
        "train.lora_alpha": 128,
        "sample.num_steps": 4,
        "sample.eval_num_steps": 10,
        "sample.guidance_scale": 1.0,
        "sample.window_size": 3,
        "sample.window_range": (0, 3),
        "sample.noise_level": 0.5,
        "sample.batch_size": 3,
        "train.batch_size": 3,
        "train.gradient_checkpointing": True,
        "offload_text_encoders": True,
    },
    # Flow-Factory's Z-Image GRPO recipe: 10 / 40 steps, guidance 4, noise 0.7, LoRA r64/alpha128.
    "z_image": {
        "pretrained.model": "Tongyi-MAI/Z-Image",
        "pretrained.family": "z_image",
        "mixed_precision": "bf16",
        "train.lora_rank": 64,
        "train.lora_alpha": 128,
        "sample.num_steps": 10,
        "sample.eval_num_steps": 40,
        "sample.guidance_scale": 4.0,
        "sample.window_size": 9,
        "sample.window_range": (0, 9),
        "sample.noise_level": 0.7,
        "sample.batch_size": 3,
        "train.batch_size": 3,
        "train.gradient_checkpointing": True,
        "offload_text_encoders": True,
    },
    # Flow-GRPO's Qwen-Image PickScore recipe: 10 steps, guidance 4 (true CFG), no EMA;
    # verl's LoRA r64/alpha128; the preflight keeps gradient checkpointing and the encoder offload.
    "qwen_image": {
        "pretrained.model": "Qwen/Qwen-Image",
        "pretrained.family": "qwen_image",
        "mixed_precision": "bf16",
        "train.lora_rank": 64,
        "train.lora_alpha": 128,
        "train.ema": False,
        "sample.num_steps": 10,
        "sample.eval_num_steps": 40,
        "sample.guidance_scale": 4.0,
        "sample.window_size": 9,
        "sample.window_range": (0, 9),
        "sample.noise_level": 0.7,
        "sample.batch_size": 3,
        "train.batch_size": 3,
        "train.gradient_checkpointing": True,
        "offload_text_encoders": True,
    },
}
NEW_MODEL_PRESETS: dict[str, dict[str, Any]] = {}
for _model, _settings in NEW_MODELS.items():
    for _algorithm, _suffix in (("tp_grpo", ""), ("flow_grpo", "_flow_grpo")):
        NEW_MODEL_PRESETS[f"pickscore_{_model}{_suffix}"] = {
            **COMMON, **_settings, **TASKS["pickscore"], "algorithm": _algorithm
        }
# Every preset trained for real, published or new: the `,tiny` runs and the global-batch checks cover all.
TRAINED = {**PUBLISHED, **NEW_MODEL_PRESETS}

# Presets that are not a published setting: the family defaults and the tiny CPU presets.
NOT_PUBLISHED = {
    "sd3_tp_grpo", "flux_tp_grpo", "sd3_large_tp_grpo", "flux2_klein_tp_grpo", "z_image_tp_grpo", "qwen_image_tp_grpo",
}


def _value(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return tuple(node) if isinstance(node, (list, tuple)) else node


def _preset_names() -> set[str]:
    return {
        name
        for name, value in vars(presets).items()
        if inspect.isfunction(value) and value.__module__ == presets.__name__
        and not name.startswith("_") and name != "get_config"
    }


def test_the_table_covers_every_published_preset() -> None:
    names = _preset_names()
    published = {name for name in names if not name.startswith("tiny") and name not in NOT_PUBLISHED}
    assert published == set(TRAINED)
    assert len(PUBLISHED) == 13


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_preset_reproduces_the_published_settings(name: str) -> None:
    config = presets.get_config(name)
    expected = TRAINED[name]
    mismatches = {
        key: (_value(config, key), value)
        for key, value in expected.items()
        if key != "reward" and (_value(config, key) != value or type(_value(config, key)) is not type(value))
    }
    assert not mismatches, f"{name}: {{key: (preset, published)}} = {mismatches}"
    assert dict(config.reward_fn) == expected["reward"]
    assert dict(config.eval_reward_fn) == expected["reward"]
    family = expected["pretrained.family"]
    assert set(ADAPTERS[family].lora_target_modules) == LORA_TARGETS[family]


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_preset_validates_and_keeps_the_global_batch_on_8_and_32_gpus(name: str) -> None:
    config = presets.get_config(name)
    per_update = set()
    for world_size in (8, 32):
        layout = validate_config(config, world_size, check_paths=False)
        assert layout == derive_layout(config, world_size)
        assert layout.trajectories_per_epoch == 48 * 24
        micro_batches = layout.gradient_accumulation_steps // config.sample.window_size
        assert micro_batches * config.train.updates_per_epoch == layout.train_batches_per_epoch
        per_update.add(world_size * micro_batches * config.train.batch_size)
    assert per_update == {48 * 24 // 2}  # 2 optimizer updates per epoch, whatever the world size
