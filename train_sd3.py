"""Train LoRA adapters of Stable Diffusion 3 / 3.5 with Flow-GRPO or TP-GRPO.

    accelerate launch train_sd3.py --config=config/grpo.py:pickscore_sd3
    python train_sd3.py --config=config/grpo.py:tiny_tp_grpo --config.num_epochs=4
"""

from absl import app
from ml_collections import config_flags

from flow_grpo.cli import run_training

_CONFIG = config_flags.DEFINE_config_file("config", "config/grpo.py:pickscore_sd3", "Preset: file:function.")


def main(argv: list[str]) -> None:
    del argv
    run_training(_CONFIG.value, family="sd3")


if __name__ == "__main__":
    app.run(main)
