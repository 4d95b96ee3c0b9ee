"""Evaluate a LoRA checkpoint (or the base model) with ODE sampling and any set of rewards.

    python scripts/evaluate.py --config=config/grpo.py:pickscore_sd3 \
        --lora=logs/<run>/checkpoints/epoch_00299/lora --out=eval/pickscore_epoch299 \
        --rewards=pickscore:1,aesthetic:1 --prompts=dataset/pickscore/test.txt
    accelerate launch --num_processes 8 scripts/evaluate.py --config=config/grpo.py:geneval_sd3 --lora=... --out=...

The preset gives the model, family, resolution (`sample.resolution`), steps (`sample.eval_num_steps`),
guidance (`sample.guidance_scale`), batch size per process (`sample.eval_batch_size`), seed (`seed`)
and the default rewards (`eval_reward_fn`) and prompts (the test split of `dataset`); change any of
them with `--config.KEY=VALUE`. Writes `<out>/summary.json` (mean/std/min/max per reward, count,
settings) and `<out>/scores.csv` (one row per image).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without installing

_CONFIG = config_flags.DEFINE_config_file("config", "config/grpo.py:pickscore_sd3", "Preset: file:function.")
_LORA = flags.DEFINE_string("lora", "", "LoRA checkpoint directory (.../checkpoints/epoch_XXXXX/lora); empty = base model.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "Adapter weight of the LoRA (multiplies its effect); 1 = as saved.")
_OUT = flags.DEFINE_string("out", None, "Output directory for summary.json and scores.csv.", required=True)
_PROMPTS = flags.DEFINE_string("prompts", "", "Prompt file (.txt or .jsonl) or dataset directory; empty = config.dataset.")
_SPLIT = flags.DEFINE_string("split", "test", "Split read from a dataset directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt given directly (repeatable); overrides --prompts.")
_REWARDS = flags.DEFINE_string("rewards", "", "Rewards as name:weight,... (e.g. pickscore:1,aesthetic:1); empty = config.eval_reward_fn.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt, each with its own seed.", lower_bound=1)
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 0, "Use only the first N prompts; 0 = all.", lower_bound=0)
_SAVE_IMAGES = flags.DEFINE_bool("save_images", False, "Also write every image to <out>/images/.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    from accelerate import PartialState

    from flow_grpo.trainer import use_cpu
    from flow_grpo.tools import parse_reward_weights, run_evaluation

    state = PartialState(cpu=use_cpu())
    summary = run_evaluation(
        _CONFIG.value,
        _OUT.value,
        lora=_LORA.value or None,
        lora_scale=_LORA_SCALE.value,
        prompts=_PROMPTS.value,
        texts=_PROMPT.value,
        split=_SPLIT.value,
        rewards=parse_reward_weights(_REWARDS.value),
        images_per_prompt=_NUM_IMAGES.value,
        max_prompts=_MAX_PROMPTS.value,
        save_images=_SAVE_IMAGES.value,
    )
    if state.is_main_process:
        for name, stats in summary["rewards"].items():
            print(f"{name}: {stats['mean']:.4f} +- {stats['std']:.4f} over {summary['count']} images")
        print(f"summary: {os.path.join(_OUT.value, 'summary.json')}")
        print(f"scores: {os.path.join(_OUT.value, 'scores.csv')}")


if __name__ == "__main__":
    app.run(main)
