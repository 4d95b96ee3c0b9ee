"""Every mistake a user can fix ends with one line `error: ...; ...` on stderr and exit code 2."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flow_grpo.commands.errors import user_errors
from flow_grpo.run.config_checks import ConfigError
from flow_grpo.run.directory import plan_run, prepare
from tests.test_trainer import tiny_config

ROOT = Path(__file__).resolve().parents[1]
PRESET = "--config=config/grpo.py:tiny_tp_grpo"


def _train(*flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flow_grpo.train", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})},
    )


def _one_error_line(done: subprocess.CompletedProcess, pattern: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "; " in lines[0], done.stderr[-2000:]
    assert __import__("re").search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize(
    "flags,pattern",
    [
        (("--config=config/grpo.py:no_such_preset",), r"unknown preset 'no_such_preset'; available presets: .*tiny_tp_grpo"),
        (("--config=config/missing.py:tiny_tp_grpo", "--config.num_epochs=2"), r"preset file config/missing\.py does not exist"),
        ((PRESET, "stray"), r"unexpected arguments \['stray'\]; settings are given as --config"),
    ],
    ids=["unknown-preset", "missing-preset-file", "stray-argument"],
)
def test_command_line_mistakes_end_with_one_error_line(flags, pattern) -> None:
    _one_error_line(_train(*flags), pattern)


def test_a_bad_prompt_file_and_a_non_pipeline_model_are_caught_before_the_model_loads(tmp_path, tiny_sd3_dir) -> None:
    dataset = tmp_path / "data"
    dataset.mkdir()
    (dataset / "train.txt").write_bytes(b"\xff\xfe not utf-8\n")
    done = _train(PRESET, f"--config.dataset={dataset}", f"--config.pretrained.model={tiny_sd3_dir}", f"--config.logdir={tmp_path}")
    _one_error_line(done, r"config\.dataset: Prompt file .*train\.txt is not valid UTF-8.*; .*--help")
    assert not (tmp_path / "run").exists() and "Loading pipeline" not in done.stderr
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"x")
    done = _train(PRESET, f"--config.pretrained.model={tmp_path / 'model'}", f"--config.logdir={tmp_path}", "--config.run_name=r")
    _one_error_line(done, r"config\.pretrained\.model: directory .* is not a diffusers pipeline \(it has no model_index\.json\)")


def test_debug_shows_the_traceback(tmp_path) -> None:
    done = _train("--config=config/grpo.py:no_such_preset", env={"FLOW_GRPO_DEBUG": "1"})
    assert done.returncode != 0 and "Traceback" in done.stderr


@pytest.mark.parametrize("content", [b"", b"\x00\x01\x02binary", b"   \n\n"])
def test_empty_blank_and_binary_prompt_files_are_config_errors(tmp_path, content) -> None:
    from flow_grpo.run import config_checks

    (tmp_path / "train.txt").write_bytes(content)
    config = tiny_config("unused", tmp_path, dataset=str(tmp_path))
    with pytest.raises(ConfigError, match=r"config\.dataset: Prompt file .*train\.txt (is binary|contains no prompts)"):
        config_checks._check_dataset(config)


@pytest.mark.parametrize(
    "line,message",
    [('{"prompt": 3}', r"line 1: needs a non-empty string"), ("{not json", r"line 1: malformed JSON")],
)
def test_malformed_jsonl_and_non_string_prompts_are_config_errors(tmp_path, line, message) -> None:
    from flow_grpo.run import config_checks

    (tmp_path / "train_metadata.jsonl").write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        config_checks._check_dataset(tiny_config("unused", tmp_path, dataset=str(tmp_path)))


def test_a_truncated_config_json_is_a_config_error_naming_it(tmp_path) -> None:
    from tests.test_run_dir import _make_run

    run = _make_run(tmp_path, "test", [0])
    Path(run, "config.json").write_text('{"algorithm": "tp_')
    with pytest.raises(ConfigError, match=r"config\.json is truncated or not JSON"):
        plan_run(tiny_config("unused-model", tmp_path, num_epochs=10, resume_from=run), "test")


def test_an_unwritable_logdir_is_a_config_error(tmp_path, monkeypatch) -> None:
    config = tiny_config("unused-model", tmp_path / "ro")
    plan = plan_run(config, "test")

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(ConfigError, match=r"config\.logdir: cannot write .*ro/test \(Permission denied\); choose a writable"):
        prepare(plan, config)


def test_user_errors_exit_2_with_one_line_and_programming_errors_keep_their_traceback(capsys) -> None:
    with pytest.raises(SystemExit) as done, user_errors(debug=False, hint="see --help"):
        raise ConfigError("config.x: is wrong\nsecond line")
    assert done.value.code == 2
    assert capsys.readouterr().err == "error: config.x: is wrong; second line; see --help\n"
    with pytest.raises(SystemExit), user_errors(debug=False):
        raise OSError(errno.ENOSPC, "No space left on device", "/logs/run/metrics.jsonl")
    assert capsys.readouterr().err.startswith("error: /logs/run/metrics.jsonl: no space left on device; ")
    with pytest.raises(ZeroDivisionError), user_errors(debug=False):
        1 / 0
    with pytest.raises(ConfigError), user_errors(debug=True):
        raise ConfigError("shown with its traceback")
