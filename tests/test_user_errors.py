"""Every mistake a user can fix ends with one line `error: ...; ...` on stderr and exit code 2.

The training entry runs as a user runs it (`python -m flow_grpo.train ...`), every case in one batch
(see `tests/cli_batch.py`); "before the model loads" means diffusers never printed its loading bar.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel

from flow_grpo.commands.errors import user_errors
from flow_grpo.models import ADAPTERS
from flow_grpo.run import checkpoint_files
from flow_grpo.run.config_checks import ConfigError
from flow_grpo.run.directory import plan_run, prepare
from flow_grpo.training.step import add_lora
from tests.cli_batch import one_error_line, run_commands
from tests.test_run_dir import _RunsCode, _make_run
from tests.test_trainer import tiny_config

PRESET = "--config=config/grpo.py:tiny_tp_grpo"
MODEL_LOADING = "Loading pipeline"


def _trained_lora(model_dir: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors the trainer would save for the tiny_tp_grpo preset on `model_dir` (names and shapes)."""
    config = tiny_config(model_dir, Path("unused"))
    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(model_dir, "transformer"))
    add_lora(transformer, config.train.lora_rank, config.train.lora_alpha, ADAPTERS["sd3"].lora_target_modules, config.seed)
    return {name: param.detach().clone() for name, param in transformer.named_parameters() if param.requires_grad}


def _resumable(logdir: Path, name: str, model_dir: str, lora: dict[str, torch.Tensor], **state_changes) -> str:
    """A run with one checkpoint (epoch 0) as the trainer writes it, with `state_changes` in its state.pt."""
    run = _make_run(logdir, name, [0], **{"pretrained.model": model_dir})
    checkpoint = checkpoint_files.checkpoint_dir(run, 0)
    state = {"epoch": 0, "optimizer_updates": 1, "lora": dict(lora), "optimizer": {}, "ema": None, "scaler": None}
    checkpoint_files.save_file({**state, **state_changes}, os.path.join(checkpoint, checkpoint_files.STATE_FILE))
    checkpoint_files.save_file(checkpoint_files.rng_state(), os.path.join(checkpoint, "rng_0.pt"))
    return checkpoint


def _with_shape(lora: dict[str, torch.Tensor], rank_extra: int, in_extra: int) -> dict[str, torch.Tensor]:
    """`lora` with its first lora_A tensor grown by `rank_extra` rows and `in_extra` columns."""
    name = next(name for name in lora if ".lora_A." in name)
    rows, columns = lora[name].shape
    return {**lora, name: torch.zeros(rows + rank_extra, columns + in_extra)}


def _custom_code_model(model_dir: str, target: Path, marker: Path) -> Path:
    """A copy of the tiny pipeline whose transformer is custom code (it would create `marker` when run)."""
    shutil.copytree(model_dir, target)
    index = json.loads((target / "model_index.json").read_text())
    index["transformer"] = ["my_transformer", "MyTransformer"]
    (target / "model_index.json").write_text(json.dumps(index))
    (target / "transformer" / "my_transformer.py").write_text(
        f"import os\nos.makedirs({str(marker)!r})\nfrom diffusers import SD3Transformer2DModel as MyTransformer\n"
    )
    return target


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def training(tmp_path_factory, tiny_sd3_dir):
    """Every case of this file run through `python -m flow_grpo.train`: case id -> (Done, its inputs)."""
    root = tmp_path_factory.mktemp("user-errors")
    logdir = root / "logs"
    dataset = root / "data"
    dataset.mkdir()
    (dataset / "train.txt").write_bytes(b"\xff\xfe not utf-8\n")
    (root / "not-a-pipeline").mkdir()
    (root / "not-a-pipeline" / "weights.bin").write_bytes(b"x")
    lora = _trained_lora(tiny_sd3_dir)
    marker = root / "code-ran"
    checkpoints = {
        "lora-rank": _resumable(logdir, "rank", tiny_sd3_dir, _with_shape(lora, 1, 0)),
        "lora-shape": _resumable(logdir, "shape", tiny_sd3_dir, _with_shape(lora, 0, 1)),
        "epoch-string": _resumable(logdir, "epoch", tiny_sd3_dir, lora, epoch="0"),
        "state-pickle": _resumable(logdir, "pickle", tiny_sd3_dir, lora, payload=_RunsCode(str(marker))),
        "rng-truncated": _resumable(logdir, "rng", tiny_sd3_dir, lora),
        "rng-pickle": _resumable(logdir, "rngpickle", tiny_sd3_dir, lora),
    }
    rng_file = Path(checkpoints["rng-truncated"], "rng_0.pt")
    rng_file.write_bytes(rng_file.read_bytes()[: rng_file.stat().st_size // 2])
    checkpoint_files.save_file({"python": _RunsCode(str(marker))}, os.path.join(checkpoints["rng-pickle"], "rng_0.pt"))
    custom = _custom_code_model(tiny_sd3_dir, root / "custom-model", marker)

    model = f"--config.pretrained.model={tiny_sd3_dir}"
    resume = [PRESET, model, f"--config.logdir={logdir}", "--config.num_epochs=10", "--config.sample.prompts_per_epoch=2"]
    cases = {
        "unknown-preset": ["--config=config/grpo.py:no_such_preset"],
        "missing-preset-file": ["--config=config/missing.py:tiny_tp_grpo", "--config.num_epochs=2"],
        "stray-argument": [PRESET, "stray"],
        "prompt-file": [PRESET, f"--config.dataset={dataset}", model, f"--config.logdir={root}"],
        "not-a-pipeline": [PRESET, f"--config.pretrained.model={root / 'not-a-pipeline'}", f"--config.logdir={root}", "--config.run_name=r"],
        "custom-code": [PRESET, f"--config.pretrained.model={custom}", f"--config.logdir={root}", "--config.run_name=c"],
        "reward-server-down": [
            PRESET, model, f"--config.logdir={root}", "--config.run_name=s", "--config.reward_fn={'ocr': 1.0}",
            f"--config.reward_options.ocr.url=http://127.0.0.1:{_closed_port()}", "--config.reward_options.ocr.max_retries=0",
        ],
        "reward-weights": [
            PRESET, model, f"--config.logdir={root}", "--config.run_name=w", "--config.reward_fn={'aesthetic': 1.0}",
            f"--config.reward_options.aesthetic.head={root / 'no-head.pth'}",
        ],
        **{case: [*resume, f"--config.resume_from={path}"] for case, path in checkpoints.items()},
        "debug-flag": [*resume, f"--config.resume_from={checkpoints['epoch-string']}", "--debug"],
    }
    batch = {case: ("flow_grpo.train", args, {}) for case, args in cases.items()}
    batch["debug-env"] = ("flow_grpo.train", cases["unknown-preset"], {"FLOW_GRPO_DEBUG": "1"})
    return run_commands(batch), {"root": root, "marker": marker}


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("unknown-preset", r"unknown preset 'no_such_preset'; available presets: .*tiny_tp_grpo"),
        ("missing-preset-file", r"preset file config/missing\.py does not exist"),
        ("stray-argument", r"unexpected arguments \['stray'\]; settings are given as --config"),
    ],
)
def test_command_line_mistakes_end_with_one_error_line(training, case, pattern) -> None:
    line = one_error_line(training[0][case])
    assert re.search(pattern, line), line


def test_a_bad_prompt_file_and_a_non_pipeline_model_are_caught_before_the_model_loads(training) -> None:
    done, inputs = training
    line = one_error_line(done["prompt-file"])
    assert re.search(r"config\.dataset: Prompt file .*train\.txt is not valid UTF-8.*; .*--help", line), line
    assert not (inputs["root"] / "run").exists() and MODEL_LOADING not in done["prompt-file"].stderr
    line = one_error_line(done["not-a-pipeline"])
    assert "config.pretrained.model: directory" in line and "is not a diffusers pipeline (it has no model_index.json)" in line


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("lora-rank", r"config\.resume_from: .*rank/checkpoints/epoch_00000/state\.pt: LoRA tensor \S+lora_A\S+ has shape "
         r"\(9, \d+\), not rank 8 \(config\.train\.lora_rank\); resume with the train\.lora_rank"),
        ("epoch-string", r"config\.resume_from: checkpoint file .*epoch/checkpoints/epoch_00000/state\.pt is not a training state "
         r"of this trainer: epoch is '0', not a non-negative integer; resume from an earlier checkpoint"),
        ("rng-truncated", r"config\.resume_from: checkpoint file .*rng/checkpoints/epoch_00000/rng_0\.pt is truncated or corrupt"),
        ("state-pickle", r"checkpoint file .*pickle/checkpoints/epoch_00000/state\.pt holds objects other than tensors and plain "
         r"values \(it names \S*makedirs\); refusing to load it, since unpickling them could run code"),
        ("rng-pickle", r"checkpoint file .*rngpickle/checkpoints/epoch_00000/rng_0\.pt holds objects other than tensors"),
        ("custom-code", r"config\.pretrained\.model: .*custom-model/model_index\.json names custom code \(transformer: "
         r"\['my_transformer', 'MyTransformer'\]\); the trainer loads only diffusers and transformers classes"),
    ],
)
def test_a_bad_checkpoint_or_model_is_one_line_before_the_model_loads(training, case, pattern) -> None:
    done, inputs = training
    line = one_error_line(done[case])
    assert re.search(pattern, line), line
    assert MODEL_LOADING not in done[case].stderr
    assert not inputs["marker"].exists()  # neither the pickled payload nor the custom module ran


def test_a_missing_reward_weights_file_is_one_line_before_the_model_loads(training) -> None:
    done = training[0]["reward-weights"]
    line = one_error_line(done)
    assert re.search(r"reward_options\.aesthetic\.head = '.*no-head\.pth' is neither an existing file .*LAION", line), line
    assert MODEL_LOADING not in done.stderr


def test_an_unreachable_reward_server_is_one_line_before_the_model_loads(training) -> None:
    done = training[0]["reward-server-down"]
    line = one_error_line(done)
    assert re.search(r"Reward server at http://127\.0\.0\.1:\d+/health is unreachable .*; start it with .*--scorers ocr", line), line
    assert MODEL_LOADING not in done.stderr


def test_lora_tensors_of_another_shape_are_one_line_once_the_model_shows_it(training) -> None:
    done = training[0]["lora-shape"]
    line = one_error_line(done)
    assert re.search(
        r"checkpoint .*shape/checkpoints/epoch_00000: LoRA tensor \S+lora_A\S+ has shape \(8, (\d+)\), the model's has "
        r"\(8, \d+\); resume with the train\.lora_rank and model it was trained with", line
    ), line
    assert MODEL_LOADING in done.stderr  # the other dimensions are the model's, known once it loaded


def test_debug_shows_the_traceback(training) -> None:
    for case, error in (("debug-flag", "ConfigError: config.resume_from"), ("debug-env", "ValueError: unknown preset")):
        done = training[0][case]
        assert done.returncode != 0 and "Traceback" in done.stderr and error in done.stderr, done.stderr[-2000:]


def test_a_run_whose_newest_rng_file_is_truncated_resumes_from_the_previous_checkpoint(tmp_path) -> None:
    run = _make_run(tmp_path, "test", [0, 1])
    for epoch in (0, 1):
        checkpoint_files.save_file(checkpoint_files.rng_state(), os.path.join(checkpoint_files.checkpoint_dir(run, epoch), "rng_0.pt"))
    newest = Path(checkpoint_files.checkpoint_dir(run, 1), "rng_0.pt")
    newest.write_bytes(newest.read_bytes()[:100])
    plan = plan_run(tiny_config("unused-model", tmp_path, num_epochs=10, resume_from=run), "test")
    assert plan.checkpoint == checkpoint_files.checkpoint_dir(run, 0) and plan.epoch == 0


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
