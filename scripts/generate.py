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

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without installing

_CONFIG = config_flags.DEFINE_config_file("config", "config/grpo.py:pickscore_sd3", "Preset: file:function.")
_LORA = flags.DEFINE_string("lora", "", "LoRA checkpoint directory (.../checkpoints/epoch_XXXXX/lora); empty = base model.")
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "Adapter weight of the LoRA (multiplies its effect); 1 = as saved.")
_OUT = flags.DEFINE_string("out", None, "Output directory for images/, index.jsonl and settings.json.", required=True)
_PROMPTS = flags.DEFINE_string("prompts", "", "Prompt file (.txt or .jsonl) or dataset directory; empty = config.dataset.")
_SPLIT = flags.DEFINE_string("split", "test", "Split read from a dataset directory.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt given directly (repeatable); overrides --prompts.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt, each with its own seed.", lower_bound=1)
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 0, "Use only the first N prompts; 0 = all.", lower_bound=0)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    from accelerate import PartialState

    from flow_grpo.trainer import use_cpu
    from flow_grpo.tools import run_generation

    state = PartialState(cpu=use_cpu())
    index = run_generation(
        _CONFIG.value,
        _OUT.value,
        lora=_LORA.value or None,
        lora_scale=_LORA_SCALE.value,
        prompts=_PROMPTS.value,
        texts=_PROMPT.value,
        split=_SPLIT.value,
        images_per_prompt=_NUM_IMAGES.value,
        max_prompts=_MAX_PROMPTS.value,
    )
    if state.is_main_process:
        print(f"images: {len(index)} in {os.path.join(_OUT.value, 'images')}")
        print(f"index: {os.path.join(_OUT.value, 'index.jsonl')}")


if __name__ == "__main__":
    app.run(main)
