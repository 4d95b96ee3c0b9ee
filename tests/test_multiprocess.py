"""The training entry point under `accelerate launch --num_processes 2` on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(model_dir: str, logdir: Path, extra_env: dict | None = None, *flags: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "train_sd3.py", "--config=config/grpo.py:tiny_tp_grpo", f"--config.pretrained.model={model_dir}",
        f"--config.logdir={logdir}", "--config.run_name=mp", "--config.num_epochs=2", "--config.eval_freq=1",
        "--config.sample.prompts_per_epoch=4", "--config.distributed_timeout_s=60", *flags,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(extra_env or {})}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_two_process_training_completes_with_groups_across_processes(tiny_sd3_dir, tmp_path) -> None:
    # Rank 0 zeroes the advantages of 3 of its 8 trajectories: it trains on 5, rank 1 on 8, in one
    # micro-batch each, and both must still take the same optimizer steps.
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import flow_grpo.training.trainer as trainer\n"
        "    original = trainer.Trainer.advantages\n"
        "    def zeroed(self, epoch, samples):\n"
        "        advantages, metrics = original(self, epoch, samples)\n"
        "        advantages[:3] = 0\n"
        "        return advantages, metrics\n"
        "    trainer.Trainer.advantages = zeroed\n"
    )
    done = _launch(tiny_sd3_dir, tmp_path, {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world_size=2" in done.stderr
    rows = [json.loads(line) for line in (tmp_path / "mp" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [0, 1]  # written once, by the main process
    # 4 groups of 4 per epoch, gathered from both processes; groups are split across them.
    assert all(row["data/groups"] == 4 for row in rows)
    assert max(row["data/groups_across_processes"] for row in rows) > 0
    assert all("eval/avg" in row for row in rows)
    assert all(row["train/kept_fraction"] == (5 / 8 + 8 / 8) / 2 for row in rows)
    assert (tmp_path / "mp" / "checkpoints" / "epoch_00001" / "rng_1.pt").exists()


def test_failure_of_one_process_ends_the_job(tiny_sd3_dir, tmp_path) -> None:
    # sitecustomize runs at interpreter start in every process: rank 1 dies in its second epoch.
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import flow_grpo.training.trainer as trainer\n"
        "    original = trainer.Trainer.sample_epoch\n"
        "    def failing(self, epoch):\n"
        "        if epoch == 1:\n"
        "            raise RuntimeError('simulated failure on rank 1')\n"
        "        return original(self, epoch)\n"
        "    trainer.Trainer.sample_epoch = failing\n"
    )
    started = time.monotonic()
    done = _launch(tiny_sd3_dir, tmp_path, {"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}"})
    assert done.returncode != 0
    assert "simulated failure on rank 1" in done.stderr
    assert time.monotonic() - started < 120  # ended, not hung until the collective timeout and beyond
