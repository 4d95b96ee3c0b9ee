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

import os

from absl import flags

from flow_grpo.commands.options import define_sampling_flags, parse_reward_weights
from flow_grpo.commands import run_command, start_command
from flow_grpo.sampling.evaluation import run_evaluation

_FLAGS = define_sampling_flags("Output directory for summary.json and scores.csv.")
_REWARDS = flags.DEFINE_string("rewards", "", "Rewards as name:weight,... (e.g. pickscore:1,aesthetic:1); empty = config.eval_reward_fn.")
_SAVE_IMAGES = flags.DEFINE_bool("save_images", False, "Also write every image to <out>/images/.")


def run(argv: list[str]) -> None:
    """Run the command under absl (`argv`: the arguments absl did not parse)."""
    request = _FLAGS.request()
    state = start_command(_FLAGS.config.value, needs_dataset=request.reads_dataset)
    summary = run_evaluation(
        _FLAGS.config.value,
        _FLAGS.out.value,
        request,
        rewards=parse_reward_weights(_REWARDS.value),
        save_images=_SAVE_IMAGES.value,
        overwrite=_FLAGS.overwrite.value,
    )
    if state.is_main_process:
        for name, stats in summary["rewards"].items():
            print(f"{name}: {stats['mean']:.4f} +- {stats['std']:.4f} over {summary['count']} images")
        print(f"summary: {os.path.join(_FLAGS.out.value, 'summary.json')}")
        print(f"scores: {os.path.join(_FLAGS.out.value, 'scores.csv')}")


def main() -> None:
    """Console entry point (see `run_command`)."""
    run_command(run)


if __name__ == "__main__":
    main()
