"""DDP is the supported engine: DeepSpeed / FSDP / Megatron-LM set-ups stop with a clear message."""

import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType
from accelerate.utils import launch as accelerate_launch

from flow_grpo.training.distributed import SUPPORTED_CONFIGS, UnsupportedBackendError, check_supported_backend

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "flag, backend",
    [("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"), ("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM")],
)
def test_launcher_flag_for_a_sharding_backend_is_refused_with_the_ddp_configs_named(flag, backend):
    with pytest.raises(UnsupportedBackendError) as error:
        check_supported_backend(environ={flag: "true"})
    message = str(error.value)
    assert f"configured for {backend}" in message
    assert "no sharding" in message and "DDP is the supported engine" in message
    assert "scripts/accelerate_configs/multi_gpu.yaml" in message and "scripts/accelerate_configs/multi_node.yaml" in message
    assert "deepspeed_zero2.yaml" in message  # tells users of the reference code what to use instead


@pytest.mark.parametrize("environ", [{}, {"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_USE_FSDP": "0"}])
def test_ddp_and_single_process_environments_pass(environ):
    check_supported_backend(environ=environ)


@pytest.mark.parametrize("distributed_type", [DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM])
def test_accelerator_with_a_sharding_distributed_type_is_refused(distributed_type):
    accelerator = SimpleNamespace(distributed_type=distributed_type)
    with pytest.raises(UnsupportedBackendError, match=f"distributed_type {distributed_type.value}"):
        check_supported_backend(accelerator, environ={})


@pytest.mark.parametrize("distributed_type", [DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU])
def test_accelerator_with_ddp_passes(distributed_type):
    check_supported_backend(SimpleNamespace(distributed_type=distributed_type), environ={})


def test_accelerate_launch_with_fsdp_sets_the_flag_that_is_refused():
    # accelerate's own launcher code builds the child environment; the check must catch it.
    args = launch_command_parser().parse_args(
        ["--use_fsdp", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train_sd3.py"]
    )
    environ = accelerate_launch.prepare_multi_gpu_env(args)
    with pytest.raises(UnsupportedBackendError, match="configured for FSDP"):
        check_supported_backend(environ=environ)
    # The DeepSpeed launcher needs deepspeed installed; check it still writes the flag's name.
    assert '"ACCELERATE_USE_DEEPSPEED"' in inspect.getsource(accelerate_launch.prepare_deepspeed_cmd_env)


def test_only_ddp_accelerate_configs_ship():
    shipped = sorted(path.relative_to(REPO).as_posix() for path in (REPO / "scripts/accelerate_configs").glob("*.yaml"))
    assert shipped == sorted(SUPPORTED_CONFIGS)
    for path in shipped:
        assert yaml.safe_load((REPO / path).read_text())["distributed_type"] == "MULTI_GPU"


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"])
def test_trainer_refuses_a_sharding_backend_before_any_work(flag, tiny_sd3_dir, tmp_path, monkeypatch):
    from flow_grpo.training.trainer import Trainer
    from tests.test_trainer import tiny_config

    monkeypatch.setenv(flag, "true")
    with pytest.raises(UnsupportedBackendError, match="multi_gpu.yaml"):
        Trainer(tiny_config(tiny_sd3_dir, tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()  # stopped before the run directory was written
