"""Train LoRA adapters of Stable Diffusion 3 / 3.5 with Flow-GRPO or TP-GRPO.

    accelerate launch train_sd3.py --config=config/grpo.py:pickscore_sd3
    python train_sd3.py --config=config/grpo.py:tiny_tp_grpo --config.num_epochs=4

A thin wrapper over `flow_grpo.train` (which takes the family from the preset) that defaults to a
sd3 preset and refuses a preset of another family.
"""

from flow_grpo.train import main

if __name__ == "__main__":
    main(default_preset="config/grpo.py:pickscore_sd3", family="sd3")
