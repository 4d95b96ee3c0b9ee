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

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without installing

from flow_grpo.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    main()
