"""Prompt datasets and the distributed group sampler for GRPO.

Prompt files:

- ``*.txt``: one prompt per line; surrounding whitespace is stripped and blank lines are skipped.
- ``*.jsonl``: one JSON object per line with a non-empty string ``"prompt"``; every other key
  becomes the prompt's metadata (GenEval style: ``tag``, ``include``, ``exclude``, ...), which is
  handed to the rewards unchanged.

The :class:`GroupSampler` decides, for every epoch, which prompts are sampled, that each of them
is drawn ``group_size`` times, and how those trajectories are dealt to ranks and batches. The plan
depends only on ``(seed, epoch)``, so every rank computes the same global plan without talking to
the others and takes its own share.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from flow_grpo.command_flags import InputNotFoundError, InputValueError, UserInputError
from flow_grpo.seeding import stable_seed

__all__ = [
    "EpochPlan",
    "GroupSampler",
    "Prompt",
    "PromptDataset",
    "dataset_paths",
    "load_prompts",
    "resolve_prompts",
]

PROMPT_KEY = "prompt"
"""Key holding the prompt text in a ``.jsonl`` line."""


class PromptFileError(UserInputError, ValueError):
    """A prompt file that cannot be read: missing, empty, binary, not UTF-8, or a bad line; names the path."""


@dataclass(frozen=True)
class Prompt:
    """One prompt and its metadata (``{}`` for plain-text prompt files)."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_prompts(path: str | os.PathLike[str]) -> list[Prompt]:
    """Read a ``.txt`` or ``.jsonl`` prompt file (see the module docstring for the formats).

    Raises:
        InputNotFoundError: the file does not exist (a `FileNotFoundError`).
        PromptFileError: the file has another extension, is empty, blank, binary or
            not UTF-8, or has a bad line (with its line number).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise PromptFileError(
            f"Prompt file {path} has extension {path.suffix!r}; use a .txt file (one prompt per line) "
            "or a .jsonl file (one JSON object with a 'prompt' key per line)."
        )
    if not path.is_file():
        raise InputNotFoundError(f"Prompt file {path} does not exist; check the dataset path in the config.")
    data = path.read_bytes()
    if b"\0" in data:
        raise PromptFileError(f"Prompt file {path} is binary (it contains NUL bytes); give a UTF-8 text file.")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise PromptFileError(f"Prompt file {path} is not valid UTF-8 ({error}); re-save it as UTF-8.") from error

    prompts = _parse_txt(lines) if suffix == ".txt" else _parse_jsonl(lines, path)
    if not prompts:
        raise PromptFileError(f"Prompt file {path} contains no prompts; add at least one non-blank line.")
    return prompts


def _parse_txt(lines: list[str]) -> list[Prompt]:
    return [Prompt(line.strip(), {}) for line in lines if line.strip()]


def _parse_jsonl(lines: list[str], path: Path) -> list[Prompt]:
    prompts = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(
                f"{where}: malformed JSON ({error.msg} at column {error.colno}); "
                'each line must be one JSON object such as {"prompt": "a red apple"}.'
            ) from error
        if not isinstance(record, dict):
            raise PromptFileError(
                f"{where}: expected a JSON object, got {type(record).__name__}; "
                'write each line as {"prompt": "...", ...}.'
            )
        text = record.pop(PROMPT_KEY, None)
        if not isinstance(text, str) or not text.strip():
            raise PromptFileError(
                f"{where}: needs a non-empty string under the key {PROMPT_KEY!r}, got {text!r}; "
                f"add the prompt text as \"{PROMPT_KEY}\"."
            )
        prompts.append(Prompt(text.strip(), record))
    return prompts


def dataset_paths(
    dataset_dir: str | os.PathLike[str],
    split: str,
    file_format: Literal["auto", "jsonl", "txt"] = "auto",
) -> Path:
    """Find the prompt file of ``split`` (e.g. ``"train"`` or ``"test"``) in ``dataset_dir``.

    Candidates are ``{split}_metadata.jsonl`` and ``{split}.txt``. With ``file_format="auto"``
    the ``.jsonl`` file wins when both exist (its metadata is needed by rewards such as GenEval);
    the ``.txt`` file is used only when no ``.jsonl`` file exists. ``"jsonl"`` / ``"txt"`` pick
    one format explicitly.

    Raises:
        InputNotFoundError: listing the files that were looked for (a `FileNotFoundError`).
        ValueError: on an unknown ``file_format`` or an empty ``split``.
    """
    if file_format not in ("auto", "jsonl", "txt"):
        raise ValueError(f"file_format must be 'auto', 'jsonl' or 'txt', got {file_format!r}.")
    if not split:
        raise InputValueError("split must be a non-empty name such as 'train' or 'test'.")
    directory = Path(dataset_dir)
    candidates = {
        "jsonl": directory / f"{split}_metadata.jsonl",
        "txt": directory / f"{split}.txt",
    }
    wanted = ["jsonl", "txt"] if file_format == "auto" else [file_format]
    for kind in wanted:
        if candidates[kind].is_file():
            return candidates[kind]
    looked_for = " or ".join(str(candidates[kind]) for kind in wanted)
    raise InputNotFoundError(
        f"No prompt file for split {split!r}: looked for {looked_for}; "
        "check the dataset directory in the config or create one of these files."
    )


def resolve_prompts(
    source: str,
    *,
    dataset: str,
    split: str = "test",
    texts: Sequence[str] = (),
    max_prompts: int = 0,
) -> tuple[list[Prompt], str]:
    """The prompts to sample and a description of where they came from.

    Args:
        source: a ``.txt`` / ``.jsonl`` prompt file or a dataset directory; empty = ``dataset``.
        dataset: the config's dataset directory (the fallback).
        split: split looked up in a dataset directory (``{split}_metadata.jsonl`` or ``{split}.txt``).
        texts: prompts given directly; when non-empty, ``source`` and ``dataset`` are ignored.
        max_prompts: keep only the first this many prompts; 0 keeps all.
    """
    if max_prompts < 0:
        raise ValueError(f"max_prompts must be 0 (all) or positive, got {max_prompts}")
    if texts:
        prompts = [Prompt(text.strip(), {}) for text in texts if text.strip()]
        if not prompts:
            raise InputValueError("every prompt given on the command line is blank; give a prompt with text in it")
        origin = "command line"
    else:
        path = Path(source or dataset)
        if path.is_dir():
            path = dataset_paths(path, split)
        prompts = load_prompts(path)
        origin = str(path)
    if max_prompts:
        prompts = prompts[:max_prompts]
    return prompts, origin


class PromptDataset:
    """A list of :class:`Prompt`, indexed by the :class:`GroupSampler`'s dataset indices."""

    def __init__(self, prompts: Sequence[Prompt]) -> None:
        """Args: prompts: at least one prompt."""
        if len(prompts) == 0:
            raise ValueError("PromptDataset needs at least one prompt.")
        self.prompts: list[Prompt] = list(prompts)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PromptDataset:
        """Load a ``.txt`` or ``.jsonl`` prompt file (see :func:`load_prompts`)."""
        return cls(load_prompts(path))

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]

    def gather(self, indices: Sequence[int] | torch.Tensor) -> tuple[list[str], list[dict[str, Any]]]:
        """Prompts and metadata for a batch of dataset indices.

        Args:
            indices: ``(B,)`` dataset indices, e.g. one row of ``EpochPlan.dataset_indices``.

        Returns:
            ``(texts, metadata)``, each of length ``B``; the metadata dicts are shallow copies.
        """
        if isinstance(indices, torch.Tensor):
            indices = indices.reshape(-1).tolist()
        texts = [self.prompts[i].text for i in indices]
        metadata = [dict(self.prompts[i].metadata) for i in indices]
        return texts, metadata


@dataclass(frozen=True)
class EpochPlan:
    """What one rank samples in one epoch.

    Attributes:
        epoch: the epoch this plan is for.
        dataset_indices: LongTensor ``(num_batches, batch_size)``; row ``i`` is batch ``i``.
        group_ids: LongTensor ``(num_batches, batch_size)``; the prompt's slot
            ``0 .. prompts_per_epoch - 1`` in this epoch. Trajectories with the same group id (on
            any rank) share a prompt and are normalised together; a prompt drawn twice in one
            epoch forms two groups.
    """

    epoch: int
    dataset_indices: torch.Tensor
    group_ids: torch.Tensor

    @property
    def num_batches(self) -> int:
        """Number of sampling batches of this rank in the epoch."""
        return self.dataset_indices.shape[0]


class GroupSampler:
    """Distributed sampler that draws every prompt of an epoch exactly ``group_size`` times.

    Per epoch, with one generator seeded from ``(seed, epoch)`` (identical on every rank):

    1. pick ``prompts_per_epoch`` prompts from a random permutation of the dataset; if more are
       needed than the dataset holds, successive permutations are concatenated, so usage counts
       differ by at most one;
    2. repeat each picked prompt ``group_size`` times (group id = its slot in the pick);
    3. shuffle the ``prompts_per_epoch * group_size`` trajectories, so a group is spread over ranks
       and batches;
    4. deal them out: batch ``i`` of rank ``r`` is the slice
       ``[(i * world_size + r) * batch_size : (i * world_size + r + 1) * batch_size]``.
    """

    def __init__(
        self,
        num_prompts: int,
        prompts_per_epoch: int,
        group_size: int,
        world_size: int,
        rank: int,
        batch_size: int,
        seed: int,
    ) -> None:
        """Args:
        num_prompts: size of the prompt dataset.
        prompts_per_epoch: distinct groups per epoch (global, all ranks together).
        group_size: trajectories per prompt, at least 2 (a group of one has no variance).
        world_size: number of processes.
        rank: this process, ``0 <= rank < world_size``.
        batch_size: trajectories per sampling batch per process.
        seed: base seed; plans depend only on ``(seed, epoch)``.
        """
        for name, value in (
            ("num_prompts", num_prompts),
            ("prompts_per_epoch", prompts_per_epoch),
            ("group_size", group_size),
            ("world_size", world_size),
            ("batch_size", batch_size),
        ):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if group_size < 2:
            raise ValueError(
                f"group_size must be at least 2 to compare trajectories of a prompt, got {group_size}."
            )
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}.")
        if not _is_int(seed):
            raise ValueError(f"seed must be an integer, got {seed!r}.")

        total = prompts_per_epoch * group_size
        per_round = world_size * batch_size
        if total % per_round:
            raise ValueError(_divisibility_message(prompts_per_epoch, group_size, world_size, batch_size))

        self.num_prompts = num_prompts
        self.prompts_per_epoch = prompts_per_epoch
        self.group_size = group_size
        self.world_size = world_size
        self.rank = rank
        self.batch_size = batch_size
        self.seed = seed

    @property
    def num_batches(self) -> int:
        """Sampling batches per rank per epoch.

        Equals ``prompts_per_epoch * group_size / (world_size * batch_size)``.
        """
        return self.prompts_per_epoch * self.group_size // (self.world_size * self.batch_size)

    def plan(self, epoch: int) -> EpochPlan:
        """This rank's batches for ``epoch`` (``(num_batches, batch_size)`` indices and group ids)."""
        if not _is_int(epoch) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}.")
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))

        num_permutations = math.ceil(self.prompts_per_epoch / self.num_prompts)
        picked = torch.cat(
            [torch.randperm(self.num_prompts, generator=generator) for _ in range(num_permutations)]
        )[: self.prompts_per_epoch]  # (prompts_per_epoch,) dataset index of each group

        slots = torch.arange(self.prompts_per_epoch).repeat_interleave(self.group_size)
        slots = slots[torch.randperm(slots.numel(), generator=generator)]  # (P * G,) shuffled group ids

        # Row-major (num_batches, world_size, batch_size) is exactly the slice rule of the docstring.
        group_ids = slots.view(self.num_batches, self.world_size, self.batch_size)[:, self.rank].clone()
        return EpochPlan(epoch=epoch, dataset_indices=picked[group_ids], group_ids=group_ids)

    def __repr__(self) -> str:
        return (
            f"GroupSampler(num_prompts={self.num_prompts}, prompts_per_epoch={self.prompts_per_epoch}, "
            f"group_size={self.group_size}, world_size={self.world_size}, rank={self.rank}, "
            f"batch_size={self.batch_size}, seed={self.seed})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _epoch_seed(seed: int, epoch: int) -> int:
    """Mix ``(seed, epoch)`` into a 63-bit seed, stable across processes and Python versions."""
    return stable_seed(f"group-sampler:{seed}:{epoch}")


def _divisibility_message(prompts_per_epoch: int, group_size: int, world_size: int, batch_size: int) -> str:
    total = prompts_per_epoch * group_size
    per_round = world_size * batch_size
    # prompts_per_epoch works iff it is a multiple of this step.
    step = per_round // math.gcd(per_round, group_size)
    lower = (prompts_per_epoch // step) * step
    upper = lower + step
    prompt_choices = " or ".join(str(p) for p in (lower, upper) if p > 0)
    message = (
        f"prompts_per_epoch * group_size = {prompts_per_epoch} * {group_size} = {total} trajectories "
        f"per epoch is not divisible by world_size * batch_size = {world_size} * {batch_size} = "
        f"{per_round}, so the ranks cannot get whole batches. Set prompts_per_epoch to a multiple of "
        f"{step} (e.g. {prompt_choices})"
    )
    if total % world_size == 0:
        per_rank = total // world_size
        batch_choices = [b for b in range(batch_size - 1, 0, -1) if per_rank % b == 0][:3]
        if batch_choices:
            examples = ", ".join(map(str, batch_choices))
            message += f", or set batch_size to a divisor of {per_rank} (e.g. {examples})"
    return message + "."
