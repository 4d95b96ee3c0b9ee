"""The training entry point: `python -m flow_grpo.train --config=config/grpo.py:<preset>`.

The model family comes from the preset (`config.pretrained.family`), so one entry trains every
registered adapter:

    accelerate launch -m flow_grpo.train --config=config/grpo.py:pickscore_flux
    python -m flow_grpo.train --config=config/grpo.py:tiny_tp_grpo --config.num_epochs=4

`train_sd3.py` and `train_flux.py` are thin wrappers that also check the preset's family.
"""

from __future__ import annotations

import ml_collections
from absl import app
from accelerate import PartialState
from ml_collections import config_flags

from flow_grpo.cli import setup_logging
from flow_grpo.config_checks import ConfigError
from flow_grpo.distributed import check_supported_backend
from flow_grpo.trainer import Trainer, use_cpu

__all__ = ["main", "run_training"]


def run_training(config: ml_collections.ConfigDict, family: str | None = None) -> None:
    """Build a Trainer for `config` and train; with `family`, first check that the preset is for it."""
    setup_logging()
    check_supported_backend()
    PartialState(cpu=use_cpu())
    if family is not None and config.pretrained.family != family:
        raise ConfigError(
            f"config.pretrained.family is {config.pretrained.family!r} but this entry point trains {family!r}; "
            f"use train_{config.pretrained.family}.py (or python -m flow_grpo.train) or a {family} preset."
        )
    Trainer(config).train()


def main(default_preset: str = "config/grpo.py:pickscore_sd3", family: str | None = None) -> None:
    """Define `--config` (default `default_preset`) and run training under absl.

    Args:
        default_preset: the preset used without `--config`.
        family: the model family the calling entry point trains (checked against the preset); None
            trains whatever family the preset names.
    """
    holder = config_flags.DEFINE_config_file("config", default_preset, "Preset: file:function.")

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run_training(holder.value, family)

    app.run(run)


if __name__ == "__main__":
    main()
