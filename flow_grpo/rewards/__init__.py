"""Rewards: one call signature, a registry of factories, weighted combination, async scoring.

Importing this package registers the built-in weight-free rewards (``jpeg_compressibility``,
``jpeg_incompressibility``). Modules for model-based rewards register theirs on import.
"""

from flow_grpo.rewards import jpeg
from flow_grpo.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from flow_grpo.rewards.registry import (
    AVERAGE_KEY,
    AsyncScorer,
    MultiReward,
    RewardFactory,
    RewardFn,
    available_rewards,
    build_reward,
    check_reward_names,
    register_reward,
)

__all__ = [
    "AVERAGE_KEY",
    "AsyncScorer",
    "MultiReward",
    "RewardFactory",
    "RewardFn",
    "available_rewards",
    "build_reward",
    "check_reward_names",
    "jpeg",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "register_reward",
]
