"""Which accelerate distributed back-ends the trainer supports, checked at start-up.

Only the LoRA adapter is trained, so the trainable state (weights, gradients, AdamW moments) is a
few GB even for FLUX.1-dev and fits on every GPU; the frozen base model is replicated like any
inference copy. Plain DDP (`MULTI_GPU`, or `MULTI_CPU` / a single process) is therefore the one
engine the trainer supports and tests. DeepSpeed, FSDP and Megatron-LM shard state that needs no
sharding, and the trainer does not work under them (it prepares no DataLoader, which DeepSpeed
needs for its micro-batch size; FSDP shards the LoRA state dict it saves), so a run configured for
one of them stops before any model is loaded, with a message naming the DDP configs to use instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized

__all__ = ["SUPPORTED_CONFIGS", "UnsupportedBackendError", "check_supported_backend"]

SUPPORTED_CONFIGS = ("scripts/accelerate_configs/multi_gpu.yaml", "scripts/accelerate_configs/multi_node.yaml")

# Environment variables `accelerate launch` sets for a sharding back-end, and the back-end's name.
_LAUNCH_FLAGS = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
# accelerate's `DistributedType` values of the same back-ends.
_DISTRIBUTED_TYPES = {"DEEPSPEED": "DeepSpeed", "FSDP": "FSDP", "MEGATRON_LM": "Megatron-LM"}


class UnsupportedBackendError(RuntimeError):
    """Accelerate is configured for a sharding back-end (DeepSpeed, FSDP, Megatron-LM)."""


def _message(backend: str, source: str) -> str:
    single, multi = SUPPORTED_CONFIGS
    return (
        f"accelerate is configured for {backend} ({source}), which this trainer does not support. "
        "Only the LoRA adapter is trained, so its weights, gradients and optimizer state are a few GB and need "
        "no sharding: DDP is the supported engine. Launch with "
        f"`accelerate launch --config_file {single} ...` on one machine or "
        f"`--config_file {multi}` on several (or use scripts/single_node/*.sh / scripts/multi_node/*.sh, "
        "which pick them), and run `accelerate config` again if your default config "
        "(~/.cache/huggingface/accelerate/default_config.yaml) names DeepSpeed or FSDP. "
        "Users of the reference code's deepspeed_zero2.yaml: use multi_gpu.yaml instead, with the same preset."
    )


def check_supported_backend(accelerator: Accelerator | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Raise `UnsupportedBackendError` when accelerate is set up for DeepSpeed, FSDP or Megatron-LM.

    Checks, in order: the launcher's environment flags (`ACCELERATE_USE_DEEPSPEED`, ...; call this
    before creating the `Accelerator`, which already fails under DeepSpeed when it is not installed),
    then the distributed type of `accelerator`, or of the global `AcceleratorState` if one exists.

    Args:
        accelerator: an existing accelerator to check; None checks the global state if initialised.
        environ: the environment to read (default `os.environ`).
    """
    environ = os.environ if environ is None else environ
    for flag, backend in _LAUNCH_FLAGS.items():
        if environ.get(flag, "false").strip().lower() in ("1", "true", "yes", "y", "on", "t"):
            raise UnsupportedBackendError(_message(backend, f"{flag}={environ[flag]}"))
    if accelerator is not None:
        distributed_type = accelerator.distributed_type
    elif is_initialized():
        distributed_type = AcceleratorState().distributed_type
    else:
        return
    name = getattr(distributed_type, "value", str(distributed_type))
    if name in _DISTRIBUTED_TYPES:
        raise UnsupportedBackendError(_message(_DISTRIBUTED_TYPES[name], f"distributed_type {name}"))
