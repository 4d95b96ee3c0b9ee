"""Every console command ends a user's mistake with one line `error: ...; ...` on stderr and exit code 2.

The commands with a `--config` preset (generate, evaluate, paper-eval, tp-agreement) run as a user
runs them, in one batch (`tests/cli_batch.py`); the others are called through their console entry
`main(argv)`. `--debug` or `FLOW_GRPO_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import re

import pytest

from flow_grpo.command_flags import DEBUG_ENV, InputValueError
from flow_grpo.commands import benchmark, memory, prepare_data
from flow_grpo.commands import reward_server as server_command
from flow_grpo.reward_server import server as server_module
from tests.cli_batch import one_error_line, run_commands

PRESET = "--config=config/grpo.py:tiny_tp_grpo"


@pytest.fixture(scope="module")
def commands(tmp_path_factory, tiny_sd3_dir):
    """case id -> (Done, the scratch directory) for every preset command case below."""
    root = tmp_path_factory.mktemp("command-errors")
    (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8\n")
    (root / "earlier").mkdir()
    (root / "earlier" / "index.jsonl").write_text("{}\n")
    model = f"--config.pretrained.model={tiny_sd3_dir}"
    cases = {
        "generate-unknown-preset": ("generate", ["--config=config/grpo.py:no_such_preset", f"--out={root / 'g0'}"]),
        "generate-missing-lora": ("generate", [PRESET, model, f"--out={root / 'g1'}", f"--lora={root / 'no-lora'}", "--prompt=a cat"]),
        "generate-stray-argument": ("generate", [PRESET, model, f"--out={root / 'g2'}", "stray"]),
        "generate-unknown-flag": ("generate", [PRESET, model, f"--out={root / 'g4'}", "--num_imgaes=2"]),
        "generate-debug": ("generate", [PRESET, model, f"--out={root / 'g3'}", f"--lora={root / 'no-lora'}", "--prompt=a cat", "--debug"]),
        "evaluate-unknown-reward": ("evaluate", [PRESET, model, f"--out={root / 'e0'}", "--rewards=pickscore:1,nope:1", "--prompt=a"]),
        "evaluate-bad-weight": ("evaluate", [PRESET, model, f"--out={root / 'e1'}", "--rewards=pickscore:x", "--prompt=a"]),
        "evaluate-bad-prompt-file": ("evaluate", [PRESET, model, f"--out={root / 'e2'}", f"--prompts={root / 'bad.txt'}"]),
        "evaluate-unknown-key": ("evaluate", [PRESET, model, f"--out={root / 'e3'}", "--config.sample.noise_levle=1"]),
        "paper-eval-unknown-metric": ("paper_eval", [PRESET, model, f"--out={root / 'p0'}", "--checkpoint=base", "--metrics=fid"]),
        "paper-eval-bad-options": (
            "paper_eval", [PRESET, model, f"--out={root / 'p1'}", "--checkpoint=base", "--reward_options={bad"],
        ),
        "evaluate-reward-weights": (
            "evaluate", [PRESET, model, f"--out={root / 'e4'}", "--rewards=aesthetic:1", "--prompt=a",
                         f"--config.reward_options.aesthetic.head={root / 'no-head.pth'}"],
        ),
        "evaluate-reward-model": (
            "evaluate", [PRESET, model, f"--out={root / 'e5'}", "--rewards=pickscore:1", "--prompt=a",
                         f"--config.reward_options.pickscore.model={root / 'no-clip'}"],
        ),
        "paper-eval-bug": ("tests.paper_eval_with_a_bug", [PRESET, model, f"--out={root / 'p2'}", "--checkpoint=base"]),
        "generate-earlier-output": ("generate", [PRESET, model, f"--out={root / 'earlier'}", "--prompt=a cat"]),
        "generate-no-dataset": ("generate", [PRESET, model, f"--out={root / 'g5'}", f"--config.dataset={root / 'nowhere'}"]),
        "generate-prompt-no-dataset": (
            "generate", [PRESET, model, f"--out={root / 'given'}", f"--config.dataset={root / 'nowhere'}", "--prompt=a cat"],
        ),
        "agreement-mode": ("tp_agreement", [PRESET, model, f"--out={root / 'a0'}", "--completion_steps=0,1"]),
        "agreement-missing-preset-file": ("tp_agreement", ["--config=config/missing.py:tiny_tp_grpo", f"--out={root / 'a1'}"]),
    }
    batch = {case: (module if "." in module else f"flow_grpo.commands.{module}", args, {}) for case, (module, args) in cases.items()}
    return run_commands(batch), root


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("generate-unknown-preset", r"^error: --config: unknown preset 'no_such_preset'; available presets: .*tiny_tp_grpo"),
        ("generate-missing-lora", r"^error: no LoRA checkpoint at .*no-lora: looked for .*; pass a checkpoint directory"),
        ("generate-stray-argument", r"^error: unexpected arguments \['stray'\]; settings are given as --config"),
        ("generate-unknown-flag", r"^error: Unknown command line flag 'num_imgaes'.*; run the command with --help for its flags$"),
        ("evaluate-unknown-reward", r"^error: Unknown reward\(s\) \['nope'\]; available rewards: .*; fix the reward name"),
        ("evaluate-bad-weight", r"^error: --rewards: reward 'pickscore' has weight 'x', which is not a number; write name:weight"),
        ("evaluate-bad-prompt-file", r"^error: Prompt file .*bad\.txt is not valid UTF-8 .*; re-save it as UTF-8"),
        ("evaluate-unknown-key", r"^error: --config\.sample\.noise_levle: the config has no key 'noise_levle' .*noise_level"),
        ("paper-eval-unknown-metric", r"^error: unknown metric\(s\) \['fid'\] in --metrics; metrics: geneval"),
        ("paper-eval-bad-options", r"^error: --reward_options is not valid JSON \(.*\); write e\.g\."),
        ("evaluate-reward-weights", r"^error: reward_options\.aesthetic\.head = '.*no-head\.pth' is neither an existing file"),
        ("evaluate-reward-model", r"^error: Could not load the pickscore model from '.*no-clip' .*; set reward_options\.pickscore\.model"),
        ("generate-earlier-output", r"^error: --out .*earlier already holds the outputs of an earlier run \(index\.jsonl\); pass --overwrite"),
        ("generate-no-dataset", r"^error: config\.dataset: '.*nowhere' does not exist as given .*; prompt sets are built by"),
        ("agreement-mode", r"^error: --completion_steps takes modes k >= 1 .*; got 0,1$"),
        ("agreement-missing-preset-file", r"^error: --config: preset file config/missing\.py does not exist; give e\.g\."),
    ],
)
def test_preset_commands_end_a_mistake_with_one_line_before_the_model_loads(commands, case, pattern) -> None:
    done, root = commands
    line = one_error_line(done[case])
    assert re.search(pattern, line), line
    assert "Loading pipeline" not in done[case].stderr
    assert not any(root.glob("[gepa][0-9]/*")), "an output was written before the input was checked"


def test_debug_shows_the_traceback_of_a_preset_command(commands) -> None:
    done = commands[0]["generate-debug"]
    assert done.returncode == 1 and "Traceback" in done.stderr
    assert "InputNotFoundError: no LoRA checkpoint at" in done.stderr


def test_a_programming_error_in_the_paper_evaluation_keeps_its_traceback(commands) -> None:
    done = commands[0]["paper-eval-bug"]
    assert done.returncode == 1 and "Traceback" in done.stderr and "ValueError: a bug" in done.stderr, done.stderr[-2000:]
    assert not any(line.startswith("error: ") for line in done.stderr.splitlines())


def test_prompts_given_on_the_command_line_need_no_dataset_folder(commands) -> None:
    done, root = commands
    assert done["generate-prompt-no-dataset"].returncode == 0, done["generate-prompt-no-dataset"].stderr
    assert [path.name for path in (root / "given" / "images").iterdir()] == ["00000_00.png"]


# ----------------------------------------------------------------------------- commands without a preset


def _error_line(capsys, main, argv: list[str]) -> str:
    """Run a console entry `main(argv)`; it must exit with code 2 and print exactly one `error: ...; ...` line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "; " in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_prepare_data_mistakes_are_one_line(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    line = _error_line(capsys, prepare_data.main, ["--source", "files", "--inputs", str(tmp_path / "missing.txt"), "--out", str(out)])
    assert re.search(r"^error: Prompt file .*missing\.txt does not exist; check", line), line
    (tmp_path / "one.txt").write_text("a cat\n")
    line = _error_line(capsys, prepare_data.main, ["--source", "files", "--inputs", str(tmp_path / "one.txt"), "--out", str(out)])
    assert line == "error: 1 unique prompt(s) cannot be split into a train and a test set; give at least two prompts"
    line = _error_line(capsys, prepare_data.main, ["--source", "published", "--name", "x", "--out", str(out)])
    assert line.endswith("; drop --name")
    line = _error_line(capsys, prepare_data.main, ["--source", "nowhere"])
    assert re.search(r"^error: flag --source=nowhere: value should be one of <.*>; run `flow-grpo-prepare-data --help`", line)
    assert not out.exists()
    with pytest.raises(InputValueError, match="cannot be split"):
        prepare_data.main(["--source", "files", "--inputs", str(tmp_path / "one.txt"), "--out", str(out), "--debug"])


def test_benchmark_and_memory_mistakes_are_one_line(tmp_path, capsys, monkeypatch) -> None:
    line = _error_line(capsys, benchmark.main, ["--size", "tiny", "--phases", "rollout"])
    assert re.search(r"^error: phases must be a non-empty subset of \(.*\), got \('rollout',\); each setting is a flag", line), line
    (tmp_path / "file.txt").write_text("")
    report = tmp_path / "file.txt" / "reports" / "x.json"
    line = _error_line(capsys, benchmark.main, ["--size", "tiny", "--count_only", "--json", str(report)])
    assert line.startswith(f"error: {report.parent}: not a directory; a part of the path is a file; choose a directory")
    line = _error_line(capsys, benchmark.main, ["--memory", "--preset", "no_such_preset"])
    assert re.search(r"^error: unknown preset 'no_such_preset'; available presets: .*tiny_tp_grpo", line)
    for main, flags in ((benchmark.main, ["--reward_server"]), (benchmark.reward_server_main, [])):
        line = _error_line(capsys, main, [*flags, "--scorer", "jpeg_compressibility", "--preset", "no_such_preset"])
        assert line.startswith("error: config/grpo.py has no preset 'no_such_preset'; give a preset of it, or --batch_size and")
    line = _error_line(capsys, memory.main, ["--preset", "tiny_tp_grpo", "--num_processes", "3"])
    assert line.startswith("error: config.sample.batch_size: ")
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="unknown preset 'no_such_preset'"):
        memory.main(["--preset", "no_such_preset"])


# ----------------------------------------------------------------------------- the reward server's start


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if the reward server builds a scorer: every mistake below is found before."""

    def must_not_load(*args, **kwargs):
        raise AssertionError("the scorers were built before the flags were checked")

    monkeypatch.setattr(server_module, "build_replicas", must_not_load)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--scorers", "jpeg_compressibility,nope"], r"^error: --scorers: unknown scorer 'nope'; use a server scorer \[.*'geneval'"),
        (["--scorers", "remote"], r"^error: --scorers: 'remote' is a remote client reward, which a server cannot host; host"),
        (["--scorers", " , "], r"^error: --scorers names no scorer; give e\.g\. --scorers geneval,ocr$"),
        (["--scorers", "ocr", "--devices", "gpu0"], r"^error: --devices: 'gpu0' is not a device name; give e\.g\. cpu"),
        (["--scorers", "ocr", "--devices", "cpu,cuda:1"], r"^error: --devices: cuda:1 is a CUDA device but this machine has none; pass"),
        (["--scorers", "ocr", "--options", "{not json"], r"^error: --options is neither a JSON object nor a JSON file \(.*\); write"),
        (["--scorers", "ocr", "--options", '{"ocr": 1}'], r"^error: --options must map scorer names to option objects; write"),
        (["--scorers", "ocr", "--options", '{"pickscore": {}}'], r"^error: --options names scorers \['pickscore'\] that are not hosted"),
        (["--scorers", "ocr", "--max_batch", "0"], r"^error: reward server limit max_batch = 0 is out of range; it must be at least 1"),
        (["--scorers", "ocr", "--read_timeout_s", "nan"], r"^error: reward server limit read_timeout_s = nan is out of range"),
        (["--scorers", "ocr", "--log_level", "LOUD"], r"^error: --log_level 'LOUD' is not a logging level; use DEBUG"),
        (["--scorers", "ocr", "--host", "203.0.113.7", "--port", "18099"], r"^error: cannot bind 203\.0\.113\.7:18099 \(.*\); pass an address"),
        (["--scorers", "ocr", "--port", "-1"], r"^error: flag --port=-1: .*; run `flow-grpo-reward-server --help` for the flags$"),
    ],
)
def test_reward_server_start_up_mistakes_are_one_line_before_any_scorer_loads(nothing_loads, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(server_command, "_cuda_devices", lambda: 0)
    line = _error_line(capsys, server_command.main, flags)
    assert re.search(message, line), line


def test_reward_server_options_file_and_scorer_weights_are_one_line(tmp_path, capsys) -> None:
    options = tmp_path / "options.json"
    options.write_bytes(b"\xff\xfe")
    line = _error_line(capsys, server_command.main, ["--scorers", "ocr", "--options", str(options), "--devices", "cpu"])
    assert line.startswith(f"error: --options file {options} cannot be read (") and line.endswith("; give a UTF-8 JSON file")
    # A missing weights file is found by the scorer's factory, before its model loads.
    head = '{"aesthetic": {"head": "/nonexistent/head.pth"}}'
    line = _error_line(capsys, server_command.main, ["--scorers", "aesthetic", "--options", head, "--devices", "cpu", "--port", "0"])
    assert re.search(r"^error: reward_options\.aesthetic\.head = '/nonexistent/head\.pth' is neither an existing file", line), line


def test_reward_server_debug_shows_the_traceback(nothing_loads, capsys) -> None:
    with pytest.raises(InputValueError, match="unknown scorer 'nope'"):
        server_command.main(["--scorers", "nope", "--debug"])
    assert capsys.readouterr().err == ""
