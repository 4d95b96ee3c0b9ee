"""Measure how faithful cheap TP-GRPO completions are on a preset's own model and reward.

    flow-grpo-tp-agreement --config=config/grpo.py:pickscore_sd3 --completion_steps=1,2,3 --batches=8 --out=agreement/sd3
    flow-grpo-tp-agreement --config=config/grpo.py:tiny_tp_grpo,tiny --completion_steps=1,2,3 --batches=2 --out=/tmp/agree

Samples `--batches` TP-GRPO sampling batches of the preset with exact completions and, from the
same window states and noise, with `tp.completion_steps = k` for each k of `--completion_steps`;
scores every completed image with the preset's reward (`reward_fn`) and reports, per mode, the
agreement of the completed rewards, incremental-reward signs, turning points (before and after
balancing) and per-step advantages with the exact ones, with each mode's rollout seconds and
transformer rows. Writes `<out>/agreement.json` and `<out>/agreement.png`; the table is printed last.
Any `--config.KEY=VALUE` applies (e.g. `--config.pretrained.model=/local/sd3.5`).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from flow_grpo.command_flags import InputValueError, int_list
from flow_grpo.commands import run_command, start_command
from flow_grpo.commands.options import PRESET_FILE
from flow_grpo.sampling.agreement import format_agreement, run_agreement

_CONFIG = config_flags.DEFINE_config_file("config", f"{PRESET_FILE}:pickscore_sd3", "Preset: file:function.")
_MODES = flags.DEFINE_list("completion_steps", ["1", "2", "3"], "Approximate completion modes k >= 1 compared with exact.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Sampling batches (of sample.batch_size trajectories) to compare.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Output directory for agreement.json and agreement.png.", required=True)


def run(argv: list[str]) -> None:
    """Run the command under absl (`argv`: the arguments absl did not parse)."""
    modes = int_list(_MODES.value, "completion_steps")
    if not modes or min(modes) < 1:
        raise InputValueError(
            f"--completion_steps takes modes k >= 1 (0, exact, is always the reference); got {','.join(_MODES.value)}"
        )
    start_command(_CONFIG.value)
    report = run_agreement(_CONFIG.value, _OUT.value, modes, _BATCHES.value)
    print(format_agreement(report), flush=True)


def main() -> None:
    """Console entry point (see `run_command`)."""
    run_command(run)


if __name__ == "__main__":
    main()
