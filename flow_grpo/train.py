"""The training entry point: `python -m flow_grpo.train --config=config/grpo.py:<preset>`.

The model family comes from the preset (`config.pretrained.family`), so one entry trains every
registered adapter:

    accelerate launch -m flow_grpo.train --config=config/grpo.py:pickscore_flux
    python -m flow_grpo.train --config=config/grpo.py:tiny_tp_grpo --config.num_epochs=4

`train_sd3.py` and `train_flux.py` are thin wrappers that also check the preset's family.
"""

from __future__ import annotations

import os
import re
import sys

import ml_collections
from absl import app, flags
from accelerate.logging import get_logger
from ml_collections import config_flags

from flow_grpo.commands.errors import DEBUG_ENV, DEBUG_FLAG, debug_requested, exit_with_error, user_errors
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
    debug = debug_requested(sys.argv)
    sys.argv = [argument for argument in sys.argv if argument != DEBUG_FLAG]
    no_arguments = len(sys.argv) == 1
    sys.argv = resolve_config_argument(sys.argv)
    try:  # ml_collections may apply the overrides while the flags are defined
        preset = resolve_config_argument(["--config", default_preset])[1]
        holder = config_flags.DEFINE_config_file("config", preset, "Preset: file:function.")
        print_config = flags.DEFINE_bool("print_config", False, "Print the resolved config with comments and exit.")
    except (AttributeError, KeyError) as error:
        exit_with_error(unknown_key_message(sys.argv, error))
    except PRESET_ERRORS as error:  # the preset file is missing, or its function refused the name
        if debug:
            raise
        exit_with_error(f"{preset_message(error)}; run `{program} --help` for the presets")

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            exit_with_error(
                f"unexpected arguments {argv[1:]}; settings are given as --config.<key>=<value> "
                f"(run `{program} --help`)"
            )
        first = f"No --config given, so the default preset {default_preset} was used; " if no_arguments else ""
        with user_errors(debug, f"{first}run `{program} --help` for the presets and first steps"):
            config = _preset(holder, debug)
            if print_config.value:
                print(format_config(config))
                return
            run_training(config, family)

    app.run(run, flags_parser=_parse_flags)


PRESET_PARSE_FAILURE = "Error whilst parsing config file"
PRESET_ERRORS = (ValueError, OSError, ImportError)
"""What loading a `--config=<file>:<preset>` raises for a missing file or an unknown preset."""


def _preset(holder: flags.FlagHolder, debug: bool) -> ml_collections.ConfigDict:
    """The config the `--config` flag names; a missing preset file or an unknown preset is a ConfigError."""
    try:
        return holder.value
    except PRESET_ERRORS as error:
        if debug:
            raise
        raise ConfigError(preset_message(error)) from None


def preset_message(error: BaseException) -> str:
    """The one-line message for a preset that does not load: the missing file, or the preset's own message."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    missing = re.search(r"No such file or directory: '([^']+)'", str(error))
    if isinstance(error, FileNotFoundError) or missing:
        path = error.filename if isinstance(error, FileNotFoundError) else missing.group(1)
        return f"--config: preset file {path} does not exist; give e.g. --config=config/grpo.py:<preset>"
    return f"--config: {error}"


def _parse_flags(argv: list[str]) -> list[str]:
    """Parse the flags; an override naming a key the locked config lacks, or a preset that does not
    load, exits with code 2 and advice (`--debug` / `FLOW_GRPO_DEBUG=1`: the traceback).
    """
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error, *PRESET_ERRORS) as error:
        if debug_requested(sys.argv) or os.environ.get(DEBUG_ENV):
            raise
        text = str(error)
        if PRESET_PARSE_FAILURE in text:  # ml_collections puts the preset's traceback into the message
            last = text.strip().splitlines()[-1]
            exit_with_error(f"--config: {last.partition(': ')[2] or last}; run `--help` for the presets")
        if isinstance(error, PRESET_ERRORS):
            exit_with_error(f"{preset_message(error)}; run `--help` for the presets")
        exit_with_error(unknown_key_message(argv, error))


def unknown_key_message(argv: list[str], error: BaseException) -> str:
    """The message for a flag error: the override, the missing key, ml_collections' "did you mean", a fix.

    Adding a reward with `--config.reward_fn.<name>=w` cannot work (the reward dicts are locked
    like the rest of the config): the message shows the whole-dict form that does.
    """
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    overrides = [arg.split("=", 1) for arg in argv[1:] if arg.startswith("--config.")]
    matching = [(flag, value) for flag, *value in overrides if key and flag.split(".")[-1] == key]
    if not matching or isinstance(error, flags.Error):
        return text
    flag, value = matching[-1]
    parent = flag[len("--config.") :].rpartition(".")[0]
    message = f"{flag}: the config has no key {key!r}" + (f" under config.{parent}." if parent else ".")
    if hint:
        message += f" {hint}"
    if parent in ("reward_fn", "eval_reward_fn"):
        weight = value[0] if value else "1.0"
        message += (
            f" Rewards are given as a whole dict, which replaces the preset's: --config.{parent}='{{\"{key}\": {weight}}}'"
            " (list every reward you want, e.g. '{\"pickscore\": 1.0, \"aesthetic\": 0.5}')."
        )
    else:
        message += " Every key is listed by --print_config (defined in config/base.py)."
    return message


if __name__ == "__main__":
    main()
