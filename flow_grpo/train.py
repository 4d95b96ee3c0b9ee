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
from absl import flags
from accelerate.logging import get_logger
from ml_collections import config_flags

from flow_grpo.commands.errors import DEBUG_FLAG, PRESET_ERRORS, debug_requested, exit_with_error, flag_error_message, run_absl
from flow_grpo.commands.options import format_config, log_lines_apart, setup_logging, training_help
from flow_grpo.run.config_checks import ConfigError
from flow_grpo.training.distributed import check_supported_backend
from flow_grpo.run.paths import check_model_source, resolve_config_argument, resolve_config_paths
from flow_grpo.training.heartbeat import watching
from flow_grpo.training.trainer import Trainer, process_state

__all__ = ["main", "run_training"]

logger = get_logger(__name__)

DEFAULT_PRESET = "config/grpo.py:pickscore_sd3"


def run_training(config: ml_collections.ConfigDict, family: str | None = None) -> None:
    """Build a Trainer for `config` and train; with `family`, first check that the preset is for it."""
    setup_logging()
    check_supported_backend()
    process_state(config)
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
    # log lines never share a line with a progress bar; a process that stops answering ends the job
    with log_lines_apart(), watching(config.distributed_timeout_s):
        Trainer(config).train()


def main(default_preset: str = DEFAULT_PRESET, family: str | None = None) -> None:
    """Define `--config` (default `default_preset`) and `--print_config`, and run training under absl.

    `--help` lists the presets; a user's mistake (e.g. a prompt set not prepared yet) ends the
    program with one `error:` line, what to run first and exit code 2 instead of a traceback (see
    `flow_grpo.commands.errors`).

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
    no_arguments = len([argument for argument in sys.argv[1:] if argument != DEBUG_FLAG]) == 0
    sys.argv = resolve_config_argument(sys.argv)
    first = f"No --config given, so the default preset {default_preset} was used; " if no_arguments else ""
    hint = f"{first}run `{program} --help` for the presets and first steps"
    try:  # ml_collections may apply the overrides while the flags are defined
        preset = resolve_config_argument(["--config", default_preset])[1]
        holder = config_flags.DEFINE_config_file("config", preset, "Preset: file:function.")
        print_config = flags.DEFINE_bool("print_config", False, "Print the resolved config with comments and exit.")
    except (AttributeError, KeyError, *PRESET_ERRORS) as error:
        if debug_requested(sys.argv[1:]):
            raise
        exit_with_error(flag_error_message(sys.argv, error, hint))

    def run(argv: list[str]) -> None:
        if print_config.value:
            print(format_config(holder.value))
            return
        run_training(holder.value, family)

    run_absl(run, hint)


if __name__ == "__main__":
    main()
