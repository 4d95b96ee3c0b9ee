"""Reproduce the TP-GRPO paper's Table 1: generate the paper's benchmarks and score every column.

    flow-grpo-prepare-data --source published            # the paper's prompt sets, hash-verified
    flow-grpo-paper-eval --config=config/grpo.py:geneval_sd3 --out=eval/table1
        --checkpoint base --checkpoint tp_grpo=logs/<run>/checkpoints/epoch_00299/lora   # (one command line)
    accelerate launch --num_processes 8 -m flow_grpo.commands.paper_eval --config=... --out=... --checkpoint=...

Rows are `--checkpoint` values: `base` (the base model), a LoRA checkpoint, or `NAME=PATH`. The
preset gives the model and the evaluation settings (`sample.resolution`, `sample.eval_num_steps`,
`sample.guidance_scale`, `seed`); every image's seed is fixed by its prompt and sample index, so all
rows see the same noise. Benchmarks are read from `--dataset_root` (GenEval with 4 images per
prompt, OCR, PickScore and DrawBench with 1). `--suite paper` scores every column; `--suite task`
or `quality`, or `--metrics a,b`, a part. Rewards read their settings from `config.reward_options`,
overridden by `--reward_options '{"imagereward": {...}}'`; GenEval, OCR, UnifiedReward and DeQA are
scored by a reward server (`flow-grpo-reward-server`).

Writes `<out>/table.md`, `table.json`, `geneval_tasks.md` (GenEval's per-task table, overall = mean of
the six tasks) and `table.png`, with the images and per-image scores under `<out>/<row>/<benchmark>/`.
Run it again with the same `--out` to resume: images already written are not generated again.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from flow_grpo.command_flags import InputNotFoundError, InputValueError
from flow_grpo.commands.options import PRESET_FILE
from flow_grpo.commands import run_command, start_command
from flow_grpo.run.config_checks import ConfigError
from flow_grpo.run.paths import resolve_path

_CONFIG = config_flags.DEFINE_config_file("config", f"{PRESET_FILE}:pickscore_sd3", "Preset: file:function.")
_OUT = flags.DEFINE_string("out", None, "Output directory of the table, images and scores.", required=True)
_CHECKPOINTS = flags.DEFINE_multi_string("checkpoint", [], "A row: base, a LoRA checkpoint directory, or NAME=PATH (repeatable).")
_SUITE = flags.DEFINE_string("suite", "paper", "Metric set: paper (every column), task or quality.")
_METRICS = flags.DEFINE_list("metrics", [], "Metrics to score instead of --suite, e.g. geneval,drawbench_pickscore.")
_DATASET_ROOT = flags.DEFINE_string("dataset_root", "dataset", "Folder holding geneval/, ocr/, pickscore_sfw/, drawbench/.")
_MAX_PROMPTS = flags.DEFINE_integer("max_prompts", 0, "Use only the first N prompts of each benchmark; 0 = all.", lower_bound=0)
_LORA_SCALE = flags.DEFINE_float("lora_scale", 1.0, "Adapter weight of every checkpoint's LoRA; 1 = as saved.")
_REWARD_OPTIONS = flags.DEFINE_string("reward_options", "", "JSON of reward name -> options, merged over config.reward_options.")


def _reward_options(config_options: dict, override: str) -> dict:
    """`config.reward_options` with the `--reward_options` JSON merged in per reward."""
    options = {name: dict(value) for name, value in config_options.items()}
    if not override:
        return options
    try:
        extra = json.loads(override)
    except json.JSONDecodeError as error:
        raise InputValueError(f"--reward_options is not valid JSON ({error}); write e.g. '{{\"hpsv3\": {{\"batch_size\": 4}}}}'") from None
    if not isinstance(extra, dict) or not all(isinstance(value, dict) for value in extra.values()):
        raise InputValueError(
            "--reward_options must be a JSON object of reward name -> object of options; "
            "write e.g. '{\"hpsv3\": {\"batch_size\": 4}}'"
        )
    for name, value in extra.items():
        options[name] = {**options.get(name, {}), **value}
    return options


def run(argv: list[str]) -> None:
    """Run the command under absl (`argv`: the arguments absl did not parse)."""
    from flow_grpo.paper.report import write_report
    from flow_grpo.paper.runner import parse_rows, run_paper_evaluation
    from flow_grpo.paper.suite import select_metrics

    config = _CONFIG.value
    # The benchmarks come from --dataset_root; the preset's own prompt set (config.dataset) is not read.
    try:
        config.dataset = resolve_path(_DATASET_ROOT.value, "dataset_root")
    except ConfigError as error:
        where = str(error).removeprefix("config.dataset_root: ")
        raise InputNotFoundError(f"--dataset_root: {where}; run `flow-grpo-prepare-data --source published` first") from None
    state = start_command(config)
    out = Path(_OUT.value)
    metrics = select_metrics(_SUITE.value, _METRICS.value)
    rows = parse_rows(_CHECKPOINTS.value)
    options = _reward_options(config.reward_options.to_dict(), _REWARD_OPTIONS.value)
    results, settings = run_paper_evaluation(
        config, out, rows, metrics, dataset_root=config.dataset, reward_options=options,
        max_prompts=_MAX_PROMPTS.value, lora_scale=_LORA_SCALE.value,
    )
    if state.is_main_process:
        for path in write_report(out, results, metrics, settings):
            print(f"wrote {path}")
        print((out / "table.md").read_text(encoding="utf-8"))
    state.wait_for_everyone()


def main() -> None:
    """Console entry point (see `run_command`)."""
    run_command(run)


if __name__ == "__main__":
    main()
