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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without installing

from flow_grpo.commands.generate import main  # noqa: E402

if __name__ == "__main__":
    main()
