"""The training command line: presets in --help, --print_config with comments, paths from any directory,
readable errors, log lines apart from progress bars, the progress line, and the console entry points."""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from flow_grpo.commands import options

from flow_grpo.run import paths
from flow_grpo.run.config_checks import ConfigError
from flow_grpo.run.trackers import progress_line

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def test_help_lists_every_preset_with_one_line_from_another_directory(tmp_path) -> None:
    done = _run([str(ROOT / "train_sd3.py"), "--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    summaries = options.preset_summaries()
    assert {name for name, _ in summaries} >= {"pickscore_sd3", "tiny_tp_grpo", "tiny_flux", "geneval_flux"}
    for name, line in summaries:
        assert re.search(rf"^  {name} +{re.escape(line)}$", done.stdout, re.MULTILINE), name
    assert "--print_config" in done.stdout and "prepare_data.py" in done.stdout


def test_print_config_from_another_directory_shows_overrides_and_comments(tmp_path) -> None:
    args = ["-m", "flow_grpo.train", "--config=config/grpo.py:tiny_tp_grpo", "--config.sample.num_steps=7", "--print_config"]
    done = _run(args, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "sample.num_steps = 7  # denoising steps of a training rollout" in done.stdout
    assert "reward_options.geneval.url = " in done.stdout and "# base URL of the reward server" in done.stdout


def test_every_config_key_has_a_comment() -> None:
    spec = importlib.util.spec_from_file_location("base_for_cli", ROOT / "config" / "base.py")
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    lines = options.format_config(base.get_config()).splitlines()
    assert lines and all("  # " in line for line in lines), [line for line in lines if "  # " not in line]


def test_no_arguments_says_what_to_run_first_without_a_traceback(tmp_path) -> None:
    done = _run([str(ROOT / "train_sd3.py")], tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "config.dataset" in done.stderr and "scripts/prepare_data.py" in done.stderr
    assert "No --config given" in done.stderr and "--help" in done.stderr


def test_relative_preset_paths_resolve_from_any_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_path("dataset/demo", "dataset") == str(ROOT / "dataset" / "demo")
    (tmp_path / "dataset" / "demo").mkdir(parents=True)  # a directory under the cwd wins
    assert paths.resolve_path("dataset/demo", "dataset") == str(tmp_path / "dataset" / "demo")
    with pytest.raises(ConfigError, match=rf"config\.dataset: 'dataset/nope'.*{tmp_path}.*{ROOT}"):
        paths.resolve_path("dataset/nope", "dataset")
    argv = paths.resolve_config_argument(["prog", "--config=config/grpo.py:tiny_tp_grpo", "--config", "config/grpo.py:x"])
    assert argv == ["prog", f"--config={ROOT}/config/grpo.py:tiny_tp_grpo", "--config", f"{ROOT}/config/grpo.py:x"]


def test_hub_ids_stay_and_missing_local_models_fail(tmp_path, monkeypatch, tiny_sd3_dir) -> None:
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("presets_for_cli", ROOT / "config" / "grpo.py")
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    config = presets.tiny_tp_grpo()
    config.pretrained.model = tiny_sd3_dir  # an existing absolute directory stays as it is
    config = paths.resolve_config_paths(config)
    assert config.dataset == str(ROOT / "dataset" / "demo")  # relative: found in the repository
    assert config.pretrained.model == tiny_sd3_dir
    hub = presets.pickscore_sd3()
    hub.dataset = "dataset/demo"
    assert paths.resolve_config_paths(hub).pretrained.model == "stabilityai/stable-diffusion-3.5-medium"
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        paths.check_model_source("stabilityai/stable-diffusion-3.5-medium")
    local = presets.tiny_tp_grpo()
    local.pretrained.model = "./missing/model"
    with pytest.raises(ConfigError, match=r"config\.pretrained\.model: './missing/model'.*make tiny-model"):
        paths.resolve_config_paths(local)


def test_log_lines_never_share_a_line_with_a_progress_bar(monkeypatch) -> None:
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    options.setup_logging()
    with options.log_lines_apart():
        bar = tqdm(total=4, desc="sampling", leave=False, mininterval=0)
        bar.update(2)
        logging.getLogger("flow_grpo.test").info("epoch 0 | reward -1.5")
        bar.update(2)
        bar.close()
        logging.getLogger("flow_grpo.test").info("progress: epoch 1/2")
    lines = captured.getvalue().split("\n")
    logged = [line for line in lines if "flow_grpo.test" in line]
    assert len(logged) == 2
    assert all(re.match(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO flow_grpo\.test: ", line) for line in logged), logged
    assert "sampling" in captured.getvalue()


def test_progress_line_extrapolates_the_epochs_of_this_run() -> None:
    assert progress_line(0, 0, 10, 12.0) == "progress: epoch 1/10 | elapsed 0:00:12 | ETA 0:01:48"
    assert progress_line(5, 4, 10, 100.0) == "progress: epoch 6/10 | elapsed 0:01:40 | ETA 0:03:20"  # resumed at 4
    assert progress_line(9, 0, 10, 60.0).endswith("ETA 0:00:00")


_IMPORT_ENTRY_POINTS = """
import importlib, json, os, sys
import flow_grpo.training.trainer  # the heavy imports once; each entry point is then imported in its own fork
failures = {}
for name, target in json.loads(sys.argv[1]).items():
    module, function = target.split(":")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fresh flag registry per command: evaluate and generate define the same absl flags
        try:
            ok = callable(getattr(importlib.import_module(module), function))
            message = "" if ok else f"{target} is not callable"
        except Exception as error:
            message = f"{target}: {type(error).__name__}: {error}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    message = os.read(read, 65536).decode()
    os.waitpid(pid, 0)
    if message:
        failures[name] = message
print(json.dumps(failures))
"""


def test_console_entry_points_are_declared_and_import() -> None:
    source = (ROOT / "setup.py").read_text()
    declared = dict(re.findall(r'"(flow-grpo-[\w-]+)=([\w.:]+)"', source))
    commands = {"train", "evaluate", "generate", "benchmark", "memory", "reward-server", "reward-server-benchmark", "prepare-data"}
    assert {f"flow-grpo-{command}" for command in commands} <= set(declared)
    assert 'python_requires=">=3.11"' in source
    done = _run(["-c", _IMPORT_ENTRY_POINTS, json.dumps(declared)], ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {}


def _listed_flags(help_text: str) -> set[str]:
    return set(re.findall(r"^\s*--(?:\[no\])?(\w+):", help_text, flags=re.M))


def test_commands_take_absl_flags_and_scripts_wrap_them(capsys: pytest.CaptureFixture) -> None:
    """`--help` lists each command's absl flags; a script is a thin wrapper that runs from any directory."""
    from flow_grpo.commands import benchmark, reward_server

    expected = {
        benchmark: {"state_buckets", "buckets", "max_states_per_call", "num_steps", "count_only", "memory", "reward_server"},
        reward_server: {"scorers", "devices", "device", "max_batch", "max_wait_ms", "max_request_mb"},
    }
    for command, names in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            command.main(["--help"])
        assert exit_info.value.code == 0 and names <= _listed_flags(capsys.readouterr().out)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--size", "tiny", "--state_buckets", "3,x"])
    assert exit_info.value.code == 2 and "--state_buckets takes comma-separated integers" in capsys.readouterr().err
    for script in ("benchmark", "reward_server", "prepare_data"):
        assert len((ROOT / "scripts" / f"{script}.py").read_text().splitlines()) <= 12
    done = _run([str(ROOT / "scripts" / "prepare_data.py"), "--help"], ROOT.parent)
    assert done.returncode == 0 and {"source", "seed", "test_size", "overwrite"} <= _listed_flags(done.stdout), done.stderr
