"""Generate images from a LoRA checkpoint (or the base model) for a list of prompts.

    python scripts/generate.py --config=config/grpo.py:pickscore_sd3 \
        --lora=logs/<run>/checkpoints/epoch_00299/lora --out=samples/epoch299 --num_images=4
    python scripts/generate.py --config=config/grpo.py:pickscore_sd3 --out=samples/base \
        --prompt="a red bicycle leaning on a wall" --prompt="a bowl of ramen"

Model, resolution, steps (`sample.eval_num_steps`), guidance, batch size per process
(`sample.eval_batch_size`) and seed come from the preset; change them with `--config.KEY=VALUE`.
Writes `<out>/images/<prompt>_<sample>.png`, `<out>/index.jsonl` (one line per image: file, prompt,
seed, metadata) and `<out>/settings.json`. Runs under `accelerate launch` to split the prompts.
"""

from __future__ import annotations

import os

from flow_grpo.commands.options import define_sampling_flags
from flow_grpo.commands import run_command, start_command
from flow_grpo.sampling.generation import run_generation

_FLAGS = define_sampling_flags("Output directory for images/, index.jsonl and settings.json.")


def run(argv: list[str]) -> None:
    """Run the command under absl (`argv`: the arguments absl did not parse)."""
    request = _FLAGS.request()
    state = start_command(_FLAGS.config.value, needs_dataset=request.reads_dataset)
    index = run_generation(_FLAGS.config.value, _FLAGS.out.value, request, overwrite=_FLAGS.overwrite.value)
    if state.is_main_process:
        print(f"images: {len(index)} in {os.path.join(_FLAGS.out.value, 'images')}")
        print(f"index: {os.path.join(_FLAGS.out.value, 'index.jsonl')}")


def main() -> None:
    """Console entry point (see `run_command`)."""
    run_command(run)


if __name__ == "__main__":
    main()
