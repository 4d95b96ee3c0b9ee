"""Launch scripts (scripts/single_node, scripts/multi_node) and the accelerate config files."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "scripts" / "accelerate_configs"
# Knobs of the launch scripts; cleared so the caller's environment cannot leak into a test.
KNOBS = ("MODEL_NAME", "REWARD", "PRESET", "BETA", "NUM_GPUS", "MASTER_PORT", "MASTER_ADDR", "NUM_MACHINES",
         "NUM_PROCESSES", "DRY_RUN", "CUDA_VISIBLE_DEVICES")


def run_script(script: str, *args: str, cwd: Path | None = None, path_prefix: str = "", timeout: float = 60, **knobs: str):
    env = {key: value for key, value in os.environ.items() if key not in KNOBS}
    env["PATH"] = os.pathsep.join(p for p in (path_prefix, str(Path(sys.executable).parent), env.get("PATH", "")) if p)
    env["PYTHON"] = sys.executable
    env.update(knobs)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / script), *args], env=env, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout
    )


def dry_run_output(script: str, *args: str, **knobs: str) -> tuple[list[str], str]:
    """The resolved command of a dry run, and the model family it reports for the preset."""
    result = run_script(script, *args, DRY_RUN="1", **knobs)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("command: ")]
    assert len(lines) == 1, result.stdout
    family = re.search(r"^preset: \S+ \(model family (\w+)\)$", result.stdout, re.MULTILINE)
    assert family, result.stdout
    return shlex.split(lines[0].removeprefix("command: ")), family.group(1)


def dry_run(script: str, *args: str, **knobs: str) -> list[str]:
    return dry_run_output(script, *args, **knobs)[0]


def training_part(command: list[str]) -> list[str]:
    """The entry point and its arguments (everything after the accelerate options)."""
    entry = command.index("-m")
    return command[entry:]


ENTRY = ["-m", "flow_grpo.train"]


@pytest.mark.parametrize(
    "script, knobs, preset, family",
    [
        ("single_node/tp_grpo.sh", {}, "pickscore_sd3", "sd3"),
        ("single_node/flow_grpo.sh", {}, "pickscore_sd3_flow_grpo", "sd3"),
        ("single_node/tp_grpo.sh", {"MODEL_NAME": "flux", "REWARD": "geneval"}, "geneval_flux", "flux"),
        ("single_node/flow_grpo.sh", {"MODEL_NAME": "flux", "REWARD": "pickscore"}, "pickscore_flux_flow_grpo", "flux"),
        ("single_node/tp_grpo.sh", {"REWARD": "general_ocr"}, "ocr_sd3", "sd3"),
        ("single_node/flow_grpo.sh", {"MODEL_NAME": "flux", "REWARD": "general_ocr"}, "ocr_flux_flow_grpo", "flux"),
        ("single_node/flow_grpo.sh", {"REWARD": "geneval"}, "geneval_sd3_flow_grpo", "sd3"),
        ("single_node/common_op3.sh", {"MODEL_NAME": "flux"}, "pickscore_flux", "flux"),
        ("single_node/common_normal.sh", {"REWARD": "general_ocr"}, "ocr_sd3_flow_grpo", "sd3"),
        # PRESET wins over MODEL_NAME / REWARD, and the family is the preset's.
        ("single_node/tp_grpo.sh", {"PRESET": "tiny_flux", "MODEL_NAME": "sd3"}, "tiny_flux", "flux"),
        ("single_node/flow_grpo.sh", {"PRESET": "tiny_flow_grpo", "REWARD": "geneval"}, "tiny_flow_grpo", "sd3"),
    ],
)
def test_single_node_dry_run_picks_preset_and_entry_point(script, knobs, preset, family) -> None:
    command, reported_family = dry_run_output(script, NUM_GPUS="1", **knobs)
    assert command[:6] == ["accelerate", "launch", "--num_processes", "1", "--main_process_port", "29500"]
    assert "--config_file" not in command
    assert training_part(command) == [*ENTRY, f"--config=config/grpo.py:{preset}"]
    assert reported_family == family


def test_single_node_gpus_port_beta_and_pass_through_arguments() -> None:
    extra = ["--config.num_epochs=3", "--config.run_name=my run", "--config.sample.noise_level=0.5"]
    command = dry_run("single_node/tp_grpo.sh", *extra, NUM_GPUS="8", MASTER_PORT="29611", BETA="0.004")
    assert command[:6] == ["accelerate", "launch", "--num_processes", "8", "--main_process_port", "29611"]
    assert command[command.index("--config_file") + 1] == "scripts/accelerate_configs/multi_gpu.yaml"
    assert training_part(command) == [*ENTRY, "--config=config/grpo.py:pickscore_sd3", "--config.train.beta=0.004", *extra]


def test_gpu_count_defaults_to_visible_gpus(tmp_path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2; do echo \"GPU $i: NVIDIA H100 (UUID: GPU-$i)\"; done\n")
    (fake / "nvidia-smi").chmod(0o755)
    result = run_script("single_node/tp_grpo.sh", path_prefix=str(fake), DRY_RUN="1")
    assert "--num_processes 3 " in result.stdout and "multi_gpu.yaml" in result.stdout
    result = run_script("single_node/tp_grpo.sh", path_prefix=str(fake), DRY_RUN="1", CUDA_VISIBLE_DEVICES="4,5")
    assert "--num_processes 2 " in result.stdout
    result = run_script("single_node/tp_grpo.sh", DRY_RUN="1", CUDA_VISIBLE_DEVICES="")
    assert "--num_processes 1 " in result.stdout


@pytest.mark.parametrize("script", ["multi_node/tp_grpo.sh", "multi_node/common_op3.sh", "multi_node/flow_grpo.sh", "multi_node/common_normal.sh"])
def test_multi_node_dry_run_passes_rank_and_rendezvous(script) -> None:
    command = dry_run(
        script, "2", "--config.seed=7",
        MASTER_ADDR="10.0.0.5", MASTER_PORT="29700", NUM_MACHINES="4", NUM_PROCESSES="32", MODEL_NAME="flux", BETA="0",
    )
    options = command[: command.index(training_part(command)[0])]
    assert options[:2] == ["accelerate", "launch"]
    pairs = dict(zip(options[2::2], options[3::2]))
    assert pairs == {
        "--config_file": "scripts/accelerate_configs/multi_node.yaml",
        "--num_machines": "4",
        "--num_processes": "32",
        "--machine_rank": "2",
        "--main_process_ip": "10.0.0.5",
        "--main_process_port": "29700",
    }
    preset = "pickscore_flux" if "tp_grpo" in script or "op3" in script else "pickscore_flux_flow_grpo"
    assert training_part(command) == [*ENTRY, f"--config=config/grpo.py:{preset}", "--config.train.beta=0", "--config.seed=7"]


@pytest.mark.parametrize(
    "script, args, knobs, message",
    [
        ("single_node/tp_grpo.sh", [], {"MODEL_NAME": "sdxl"}, "MODEL_NAME=sdxl is not supported"),
        ("single_node/flow_grpo.sh", [], {"REWARD": "clipscore"}, "REWARD=clipscore is not supported"),
        ("single_node/tp_grpo.sh", [], {"PRESET": "pickscore_sd4"}, "unknown preset 'pickscore_sd4'"),
        ("single_node/flow_grpo.sh", [], {"PRESET": "tiny_tp_grpo"}, "trains tp_grpo, but this script launches flow_grpo"),
        ("single_node/tp_grpo.sh", [], {"NUM_GPUS": "0"}, "NUM_GPUS=0 is not a positive integer"),
        ("single_node/tp_grpo.sh", [], {"BETA": "big"}, "BETA=big is not a non-negative number"),
        ("single_node/tp_grpo.sh", [], {"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        ("multi_node/tp_grpo.sh", [], {"MASTER_ADDR": "h", "NUM_MACHINES": "2"}, "first argument must be this machine's rank"),
        ("multi_node/tp_grpo.sh", ["0"], {"NUM_MACHINES": "2"}, "MASTER_ADDR is not set"),
        ("multi_node/tp_grpo.sh", ["0"], {"MASTER_ADDR": "h"}, "NUM_MACHINES is not set"),
        ("multi_node/tp_grpo.sh", ["2"], {"MASTER_ADDR": "h", "NUM_MACHINES": "2"}, "rank 2 is out of range"),
        ("multi_node/tp_grpo.sh", ["0"], {"MASTER_ADDR": "h", "NUM_MACHINES": "2", "NUM_PROCESSES": "3"}, "does not split evenly"),
        ("multi_node/flow_grpo.sh", ["1"], {"MASTER_ADDR": "h", "NUM_MACHINES": "2", "MODEL_NAME": "sd35"}, "MODEL_NAME=sd35"),
    ],
)
def test_invalid_knobs_fail_with_a_clear_message(script, args, knobs, message) -> None:
    result = run_script(script, *args, DRY_RUN="1", **knobs)
    assert result.returncode != 0
    assert message in result.stderr
    assert "command:" not in result.stdout


# ------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize(
    "name, distributed_type",
    [
        ("multi_gpu.yaml", DistributedType.MULTI_GPU),
        ("multi_node.yaml", DistributedType.MULTI_GPU),
    ],
)
def test_accelerate_configs_load_with_accelerates_loader(name, distributed_type) -> None:
    path = CONFIGS / name
    config = load_config_from_file(str(path))  # rejects unknown top-level keys
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == distributed_type
    # Nested settings become `accelerate launch` options (fsdp_config keys keep their fsdp_ prefix);
    # a misspelt key would be silently ignored by the loader, so check it names a real option.
    options = vars(launch_command_parser().parse_args(["--config_file", str(path), "train_sd3.py"]))
    for key in {**config.deepspeed_config, **config.fsdp_config}:
        assert key in options, f"{name}: {key} is not an accelerate launch option"
    if name == "multi_node.yaml":
        assert config.num_machines > 1


# ------------------------------------------------------------------------ a real launch


def test_single_process_launch_trains_the_tiny_model(tiny_sd3_dir, tmp_path) -> None:
    logdir = tmp_path / "logs"
    result = run_script(
        "single_node/tp_grpo.sh",
        f"--config.pretrained.model={tiny_sd3_dir}",
        "--config.num_epochs=1",
        f"--config.logdir={logdir}",
        "--config.sample.prompts_per_epoch=2",
        "--config.run_name=launched",
        cwd=tmp_path,  # the script runs from the repository root wherever it is called from
        timeout=300,
        NUM_GPUS="1",
        PRESET="tiny_tp_grpo",
        MASTER_PORT="29517",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        HF_HOME=str(tmp_path / "hf"),  # no accelerate default_config.yaml of the machine's user
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    run_dir = logdir / "launched"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["epoch"] == 0
    assert json.loads((run_dir / "config.json").read_text())["pretrained"]["model"] == tiny_sd3_dir


# ------------------------------------------------------------------------ entry points


def test_family_wrapper_refuses_a_preset_of_another_family(tmp_path) -> None:
    # train_flux.py trains FLUX only; the check runs before any model is loaded (the model path is missing).
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_flux.py"), "--config=config/grpo.py:tiny_tp_grpo",
         f"--config.pretrained.model={tmp_path / 'missing'}", f"--config.logdir={tmp_path / 'logs'}"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "config.pretrained.family is 'sd3' but this entry point trains 'flux'" in result.stderr
    assert not (tmp_path / "logs").exists()
