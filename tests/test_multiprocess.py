"""The training entry point under `accelerate launch --num_processes 2` on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flow_grpo.run.checkpoint_files import list_checkpoints
from flow_grpo.training.heartbeat import collective_timeout

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(model_dir: str, logdir: Path, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "train_sd3.py", "--config=config/grpo.py:tiny_tp_grpo", f"--config.pretrained.model={model_dir}",
        f"--config.logdir={logdir}", "--config.run_name=mp", "--config.num_epochs=2", "--config.eval_freq=1",
        "--config.sample.prompts_per_epoch=4", "--config.distributed_timeout_s=60", *flags,
    ]


def _env(extra_env: dict | None = None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **(extra_env or {})}


def _launch(model_dir: str, logdir: Path, extra_env: dict | None = None, *flags: str) -> subprocess.CompletedProcess:
    command = _command(model_dir, logdir, *flags)
    return subprocess.run(command, cwd=ROOT, env=_env(extra_env), capture_output=True, text=True, timeout=300)


def test_two_process_training_completes_with_groups_across_processes(tiny_sd3_dir, tmp_path) -> None:
    # Rank 0 zeroes the advantages of 3 of its 8 trajectories: it trains on 5, rank 1 on 8, in one
    # micro-batch each, and both must still take the same optimizer steps.
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import torch\n"
        "    import flow_grpo.training.trainer as trainer\n"
        "    original = trainer.Trainer.advantages\n"
        "    def zeroed(self, epoch, samples):\n"
        "        advantages, metrics = original(self, epoch, samples)\n"
        "        advantages[:3] = 0\n"
        "        group = torch.distributed.group.WORLD._get_backend(torch.device('cpu'))\n"
        f"        open({str(tmp_path / 'timeout')!r}, 'w').write(str(group.options._timeout.total_seconds()))\n"
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
    # The process group got the configured timeout (60 s), plus the heartbeat's bound and margin.
    assert float((tmp_path / "timeout").read_text()) == collective_timeout(60).total_seconds() == 82.0


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


def _state(pid: int) -> str | None:
    """The state letter of process `pid` (`T`: stopped, `Z`: exited, not reaped), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return None


def test_a_stopped_process_ends_the_job_within_the_timeout(tiny_sd3_dir, tmp_path) -> None:
    # Rank 0 stops itself (SIGSTOP) in the middle of its first checkpoint write: the LoRA is written,
    # state.pt is not. Rank 1 waits for it in a collective; its heartbeat must end the job.
    pids = tmp_path / "pids"
    pids.mkdir()
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os, signal, pathlib\n"
        "if 'RANK' in os.environ:\n"
        f"    pathlib.Path({str(pids)!r}, 'rank' + os.environ['RANK']).write_text(str(os.getpid()))\n"
        "if os.environ.get('RANK') == '0':\n"
        "    import flow_grpo.run.checkpoint_files as files\n"
        "    original = files.save_file\n"
        "    def stopping(value, path):\n"
        "        if path.endswith('state.pt'):\n"
        "            os.kill(os.getpid(), signal.SIGSTOP)\n"
        "        return original(value, path)\n"
        "    files.save_file = stopping\n"
    )
    timeout_s = 10
    flags = ("--config.eval_freq=0", "--config.save_freq=1", "--config.sample.prompts_per_epoch=2",
             "--config.sample.batch_size=4", "--config.train.batch_size=4", f"--config.distributed_timeout_s={timeout_s}")
    log = tmp_path / "launcher.log"
    env = _env({"PYTHONPATH": f"{tmp_path / 'inject'}{os.pathsep}{ROOT}"})
    with open(log, "w") as out:
        launcher = subprocess.Popen(
            _command(tiny_sd3_dir, tmp_path, *flags), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not (pids / "rank0").exists() or _state(int((pids / "rank0").read_text())) != "T":
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "rank 0 never reached its checkpoint"
            time.sleep(0.1)
        stopped = time.monotonic()
        ranks = [int((pids / f"rank{rank}").read_text()) for rank in (0, 1)]
        # Detection within T + 2 intervals (heartbeat.detection_bound), plus generous room for the
        # launcher on a loaded machine. Without the heartbeat the launcher would wait for the
        # collective timeout (T + 12 s) and then 30 s more for the stopped process to take SIGTERM.
        launcher.wait(timeout=timeout_s + 2 + 16)
        elapsed = time.monotonic() - stopped
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        for pid in ranks:
            if _state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert launcher.returncode != 0
    assert timeout_s - 2 < elapsed, output[-3000:]  # not before the timeout
    assert f"rank 0 (pid {ranks[0]} on " in output and "stopped answering" in output, output[-3000:]
    assert "killed rank 0 (on this machine)" in output
    assert [_state(pid) for pid in ranks] == [None, None]  # both ended and reaped
    # The half-written checkpoint stays a temporary directory that no resume loads.
    run_dir = tmp_path / "mp"
    assert list_checkpoints(str(run_dir)) == []
    assert (run_dir / "checkpoints" / "epoch_00000.tmp" / "lora").is_dir()
    assert not (run_dir / "checkpoints" / "epoch_00000.tmp" / "state.pt").exists()
