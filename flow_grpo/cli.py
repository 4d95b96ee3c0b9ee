"""Shared body of the thin `train_*.py` entry points."""

from __future__ import annotations

import logging

import ml_collections
from accelerate import PartialState

from flow_grpo.config_checks import ConfigError
from flow_grpo.trainer import Trainer, use_cpu


def run_training(config: ml_collections.ConfigDict, family: str) -> None:
    """Check that `config` is for `family`, then build a Trainer and train."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    PartialState(cpu=use_cpu())
    if config.pretrained.family != family:
        raise ConfigError(
            f"config.pretrained.family is {config.pretrained.family!r} but this entry point trains {family!r}; "
            f"use train_{config.pretrained.family}.py or a {family} preset."
        )
    Trainer(config).train()
