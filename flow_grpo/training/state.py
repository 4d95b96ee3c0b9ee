"""The training state a checkpoint holds, how it is written, and how a resumed run restores it.

A checkpoint `<run>/checkpoints/epoch_XXXXX/` holds:

- `lora/`: the LoRA in diffusers' format (EMA weights when `train.ema`), with a model card that
  reproduces the run's evaluation images (`flow_grpo.run.model_card`);
- `state.pt`: epoch, optimizer updates, the LoRA tensors by parameter name, the optimizer, the EMA
  and the fp16 grad scaler (tensors and plain containers only: it is read back as data);
- `rng_<rank>.pt`: every process's random-number state.

Everything is written into a temporary directory that is renamed once complete
(`flow_grpo.run.checkpoint_files.publish`), so a crash while writing leaves the previous checkpoint
intact; a write that fails (a full disk) removes the temporary directory. The newest
`config.keep_checkpoints` stay.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from typing import Any, Protocol

import ml_collections
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from peft.utils import get_peft_model_state_dict

from flow_grpo.models import ModelAdapter
from flow_grpo.run import checkpoint_files, model_card
from flow_grpo.training.ema import ParameterEMA
from flow_grpo.training.heartbeat import uninterrupted

__all__ = ["Trainer", "restore_state", "save_state", "training_state"]

logger = get_logger(__name__)


class Trainer(Protocol):
    """What of `flow_grpo.training.trainer.Trainer` a checkpoint reads and restores."""

    config: ml_collections.ConfigDict
    accelerator: Accelerator
    adapter: ModelAdapter
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    trainable_names: list[str]
    ema: ParameterEMA | None
    run_dir: str
    optimizer_updates: int
    start_epoch: int

    def ema_weights(self) -> contextlib.AbstractContextManager: ...


def training_state(trainer: Trainer, epoch: int) -> dict[str, Any]:
    """What `state.pt` holds after `epoch`: counters, LoRA tensors (CPU), optimizer, EMA and scaler states."""
    scaler = trainer.accelerator.scaler
    return {
        "epoch": epoch,
        "optimizer_updates": trainer.optimizer_updates,
        "lora": {name: p.detach().cpu() for name, p in zip(trainer.trainable_names, trainer.trainable)},
        "optimizer": trainer.optimizer.state_dict(),
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def save_state(trainer: Trainer, epoch: int) -> str:
    """Write the checkpoint after `epoch` on every process (collective); returns its directory."""
    accelerator = trainer.accelerator
    target = checkpoint_files.checkpoint_dir(trainer.run_dir, epoch)
    temporary = checkpoint_files.temporary_dir(target)
    unwrapped = accelerator.unwrap_model(trainer.model)
    with _removed_on_failure(temporary):
        if accelerator.is_main_process:
            os.makedirs(temporary, exist_ok=True)
            with trainer.ema_weights():
                trainer.adapter.pipeline_class.save_lora_weights(
                    os.path.join(temporary, "lora"),
                    transformer_lora_layers=get_peft_model_state_dict(unwrapped),
                    transformer_lora_adapter_metadata=unwrapped.peft_config["default"].to_dict(),
                )
            model_card.write_trainer_card(os.path.join(temporary, "lora"), trainer, epoch)
            checkpoint_files.save_file(training_state(trainer, epoch), os.path.join(temporary, checkpoint_files.STATE_FILE))
        accelerator.wait_for_everyone()
        checkpoint_files.save_file(checkpoint_files.rng_state(), os.path.join(temporary, f"rng_{accelerator.process_index}.pt"))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with uninterrupted():  # a process that stops answering elsewhere does not end this one mid-rename
            checkpoint_files.publish(target, trainer.config.keep_checkpoints)
    accelerator.wait_for_everyone()
    return target


@contextlib.contextmanager
def _removed_on_failure(temporary: str) -> Iterator[None]:
    """Remove the half-written checkpoint `temporary` when the block fails; a full disk names the path."""
    try:
        yield
    except Exception as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError) and error.errno == errno.ENOSPC and "no space left" not in str(error):
            raise checkpoint_files.no_space_error(temporary, error) from error
        raise


def restore_state(trainer: Trainer, path: str, state: dict[str, Any] | None = None) -> None:
    """Restore LoRA, optimizer, EMA, scaler, counters and this process's RNG from the checkpoint `path`.

    Every file is read as data only (`checkpoint_files.load_file`); `state` is `path`'s already
    loaded `state.pt`. The optimizer keeps its restored moments but takes this config's
    learning rate, betas, weight decay and epsilon. Sets `trainer.start_epoch` to the next epoch.
    """
    state = checkpoint_files.load_checkpoint_state(path) if state is None else state
    if list(state["lora"]) != trainer.trainable_names:
        raise checkpoint_files.CheckpointError(
            f"checkpoint {path} holds a different LoRA (target modules) than this config; resume with the config it was trained with"
        )
    for name, param, saved in zip(trainer.trainable_names, trainer.trainable, state["lora"].values()):
        if saved.shape != param.shape:
            raise checkpoint_files.CheckpointError(
                f"checkpoint {path}: LoRA tensor {name} has shape {tuple(saved.shape)}, the model's has "
                f"{tuple(param.shape)}; resume with the train.lora_rank and model it was trained with"
            )
    with torch.no_grad():
        for param, saved in zip(trainer.trainable, state["lora"].values()):
            param.copy_(saved)
    trainer.optimizer.load_state_dict(state["optimizer"])
    train = trainer.config.train
    for group in trainer.optimizer.param_groups:
        group.update(
            lr=train.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.adam_weight_decay,
            eps=train.adam_epsilon,
        )
    if trainer.ema is not None and state["ema"] is not None:
        trainer.ema.load_state_dict(state["ema"])
    scaler = trainer.accelerator.scaler
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    trainer.optimizer_updates = state["optimizer_updates"]
    trainer.start_epoch = state["epoch"] + 1
    rng_file = os.path.join(path, f"rng_{trainer.accelerator.process_index}.pt")
    if os.path.isfile(rng_file):
        checkpoint_files.set_rng_state(checkpoint_files.load_file(rng_file))
    logger.info(f"resumed from {path}: continuing at epoch {trainer.start_epoch}")
