"""Train LoRA adapters of FLUX.1-dev with Flow-GRPO or TP-GRPO.

    accelerate launch train_flux.py --config=config/grpo.py:pickscore_flux
    python train_flux.py --config=config/grpo.py:tiny_flux --config.num_epochs=4

A thin wrapper over `flow_grpo.train` (which takes the family from the preset) that defaults to a
flux preset and refuses a preset of another family.
"""

from flow_grpo.train import main

if __name__ == "__main__":
    main(default_preset="config/grpo.py:pickscore_flux", family="flux")
