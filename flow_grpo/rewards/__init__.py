"""Rewards: one call signature, a registry of factories, weighted combination, async scoring.

Importing this package registers every built-in reward; heavy stacks (transformers, open_clip)
are imported only inside the factories, when a reward is built:

- weight-free: ``jpeg_compressibility``, ``jpeg_incompressibility`` (:mod:`.jpeg`);
- local models: ``pickscore``, ``clipscore``, ``aesthetic`` (:mod:`.clip_models`, transformers),
  ``hpsv2`` (:mod:`.hpsv2`, open_clip), ``imagereward`` (:mod:`.imagereward`, BLIP in transformers) and
  ``hpsv3`` (:mod:`.hpsv3`, Qwen2-VL in transformers), the last two checked against their authors' packages;
- remote: ``remote``, ``geneval``, ``ocr``, ``unifiedreward``, ``deqa`` (:mod:`.remote`), scored by a reward
  server (:mod:`flow_grpo.reward_server`, ``scripts/reward_server.py``).
"""

from flow_grpo.rewards import clip_models, hpsv2, hpsv3, imagereward, jpeg, remote
from flow_grpo.rewards.clip_models import AestheticHead
from flow_grpo.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from flow_grpo.rewards.preprocess import ImagePreprocess
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
from flow_grpo.rewards.remote import (
    RemoteReward,
    RemoteRewardBadReplyError,
    RemoteRewardError,
    RemoteRewardHTTPError,
    RemoteRewardStartError,
    RemoteRewardTimeoutError,
    RemoteRewardUnreachableError,
)

__all__ = [
    "AVERAGE_KEY",
    "AestheticHead",
    "AsyncScorer",
    "ImagePreprocess",
    "MultiReward",
    "RemoteReward",
    "RemoteRewardBadReplyError",
    "RemoteRewardError",
    "RemoteRewardHTTPError",
    "RemoteRewardStartError",
    "RemoteRewardTimeoutError",
    "RemoteRewardUnreachableError",
    "RewardFactory",
    "RewardFn",
    "available_rewards",
    "build_reward",
    "check_reward_names",
    "clip_models",
    "hpsv2",
    "hpsv3",
    "imagereward",
    "jpeg",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "register_reward",
    "remote",
]
