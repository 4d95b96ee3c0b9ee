"""The training entry point: `python -m flow_grpo.train --config=config/grpo.py:<preset>`.

The model family comes from the preset (`config.pretrained.family`), so one entry trains every
registered adapter:

    accelerate launch -m flow_grpo.train --config=config/grpo.py:pickscore_flux
    python -m flow_grpo.train --config=config/grpo.py:tiny_tp_grpo --config.num_epochs=4

`train_sd3.py` and `train_flux.py` are thin wrappers that also check the preset's family.
"""

from __future__ import annotations

import os
import sys

import ml_collections
from absl import app, flags
from accelerate import PartialState
from accelerate.logging import get_logger
from ml_collections import config_flags
from tqdm.contrib.logging import logging_redirect_tqdm

from flow_grpo.cli import format_config, setup_logging, training_help
from flow_grpo.config_checks import ConfigError
from flow_grpo.distributed import check_supported_backend
from flow_grpo.paths import check_model_source, resolve_config_argument, resolve_config_paths
from flow_grpo.trainer import Trainer, use_cpu

__all__ = ["main", "run_training"]

logger = get_logger(__name__)

DEFAULT_PRESET = "config/grpo.py:pickscore_sd3"


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
    resolve_config_paths(config)
    warning = check_model_source(config.pretrained.model)
    if warning is not None:
        logger.warning(warning, main_process_only=True)
    logger.info("resolved config:\n" + format_config(config), main_process_only=True)
    with logging_redirect_tqdm():  # log lines go between progress bars, never onto them
        Trainer(config).train()


def main(default_preset: str = DEFAULT_PRESET, family: str | None = None) -> None:
    """Define `--config` (default `default_preset`) and `--print_config`, and run training under absl.

    `--help` lists the presets; a config error (e.g. a prompt set not prepared yet) ends the program
    with its message and what to run first instead of a traceback.

    Args:
        default_preset: the preset used without `--config` (relative to the repository).
        family: the model family the calling entry point trains (checked against the preset); None
            trains whatever family the preset names.
    """
    script = os.path.basename(sys.argv[0])
    program = "python -m flow_grpo.train" if script == "train.py" else f"python {script}" if script.endswith(".py") else script
    if any(argument in ("-h", "--help", "-?") for argument in sys.argv[1:]):
        print(training_help(program, default_preset))
        sys.exit(0)
    no_arguments = len(sys.argv) == 1
    sys.argv = resolve_config_argument(sys.argv)
    holder = config_flags.DEFINE_config_file("config", resolve_config_argument(["--config", default_preset])[1], "Preset: file:function.")
    print_config = flags.DEFINE_bool("print_config", False, "Print the resolved config with comments and exit.")

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if print_config.value:
            print(format_config(holder.value))
            return
        try:
            run_training(holder.value, family)
        except ConfigError as error:
            first = f"No --config given, so the default preset {default_preset} was used.\n" if no_arguments else ""
            sys.exit(f"error: {error}\n{first}Run `{program} --help` for the presets and first steps.")

    app.run(run)


if __name__ == "__main__":
    main()
