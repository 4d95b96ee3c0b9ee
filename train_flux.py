"""Train LoRA adapters of FLUX.1-dev with Flow-GRPO or TP-GRPO.

    accelerate launch train_flux.py --config=config/grpo.py:pickscore_flux
    python train_flux.py --config=config/grpo.py:tiny_flux --config.num_epochs=4
"""

from absl import app
from ml_collections import config_flags

from flow_grpo.cli import run_training

_CONFIG = config_flags.DEFINE_config_file("config", "config/grpo.py:pickscore_flux", "Preset: file:function.")


def main(argv: list[str]) -> None:
    del argv
    run_training(_CONFIG.value, family="flux")


if __name__ == "__main__":
    app.run(main)
