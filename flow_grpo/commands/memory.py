"""`flow-grpo-memory`: the memory preflight of a preset, printed as a per-phase table (no GPU needed).

    flow-grpo-memory --preset pickscore_sd3 --num_processes 8 --device_gb 80
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags

from flow_grpo.command_flags import parse_flags
from flow_grpo.commands.errors import command_main, input_errors
from flow_grpo.training.memory import GIB, InsufficientMemoryError, check_fits, format_report, load_preset, predict_memory

_FLAGS = flags.FlagValues()
flags.DEFINE_bool("memory", False, "Accepted for `flow-grpo-benchmark --memory`.", flag_values=_FLAGS)
flags.DEFINE_string("preset", None, "Preset name in config/grpo.py.", required=True, flag_values=_FLAGS)
flags.DEFINE_integer("num_processes", 8, "World size.", lower_bound=1, flag_values=_FLAGS)
flags.DEFINE_float("device_gb", 0.0, "Check against this many GB (2^30 bytes); 0 = no check.", flag_values=_FLAGS)


@command_main()
def main(argv: Sequence[str] | None = None) -> int:
    """`flow-grpo-memory --preset NAME --num_processes N [--device_gb G]`: print the table; 1 if it does not fit."""
    args = parse_flags(_FLAGS, argv, "Predict the per-process peak device memory of a preset.", "flow-grpo-memory")
    with input_errors(ValueError):  # config/grpo.py names the presets when the name is unknown
        config = load_preset(args.preset)
    report = predict_memory(config, args.num_processes)
    status = 0
    if args.device_gb > 0:
        try:
            check_fits(report, int(args.device_gb * GIB))
        except InsufficientMemoryError as error:
            print(error)
            status = 1
    print(format_report(report))
    return status
