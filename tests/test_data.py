"""Tests for prompt loading, PromptDataset, dataset_paths and GroupSampler."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from flow_grpo.data import GroupSampler, Prompt, PromptDataset, dataset_paths, load_prompts

DEMO_DIR = Path(__file__).resolve().parents[1] / "dataset" / "demo"


# ---------------------------------------------------------------------------------------------
# Loaders


def test_load_txt_strips_and_skips_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a red apple \n\n   \na cat on a mat\n", encoding="utf-8")
    assert load_prompts(path) == [Prompt("a red apple", {}), Prompt("a cat on a mat", {})]


def test_load_jsonl_moves_other_keys_to_metadata(tmp_path):
    path = tmp_path / "train_metadata.jsonl"
    records = [
        {"prompt": "a photo of two cups", "tag": "counting", "include": [{"class": "cup", "count": 2}]},
        {"prompt": " a photo of a dog ", "tag": "single_object", "exclude": []},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    prompts = load_prompts(str(path))
    assert [p.text for p in prompts] == ["a photo of two cups", "a photo of a dog"]
    assert prompts[0].metadata == {"tag": "counting", "include": [{"class": "cup", "count": 2}]}
    assert prompts[1].metadata == {"tag": "single_object", "exclude": []}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"line 2.*malformed JSON"),
        ('{"prompt": "ok"}\n\n{"tag": "counting"}\n', r"line 3.*'prompt'"),
        ('{"prompt": ""}\n', r"line 1.*non-empty string"),
        ('{"prompt": 3}\n', r"line 1.*non-empty string"),
        ('["a list"]\n', r"line 1.*JSON object"),
        ("\n  \n", r"contains no prompts"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match) as error:
        load_prompts(path)
    assert str(path) in str(error.value)


def test_load_errors_for_missing_empty_and_wrong_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_prompts(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty.txt contains no prompts"):
        load_prompts(empty)
    csv = tmp_path / "prompts.csv"
    csv.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"prompts.csv.*\.txt.*\.jsonl"):
        load_prompts(csv)


def test_demo_prompt_files_load():
    train = load_prompts(DEMO_DIR / "train.txt")
    test = load_prompts(DEMO_DIR / "test.txt")
    geneval = load_prompts(DEMO_DIR.parent / "demo_geneval" / "train_metadata.jsonl")
    assert len(train) >= 40 and len(test) >= 10
    assert not {p.text for p in train} & {p.text for p in test}
    assert len({p.text for p in train}) == len(train)
    for prompt in geneval:
        assert prompt.metadata["tag"]
        assert prompt.metadata["include"] and all(
            isinstance(obj["class"], str) and obj["count"] >= 1 for obj in prompt.metadata["include"]
        )
        assert isinstance(prompt.metadata["exclude"], list)


def test_dataset_paths_prefers_jsonl_and_falls_back_to_txt(tmp_path):
    (tmp_path / "train.txt").write_text("a\n", encoding="utf-8")
    assert dataset_paths(tmp_path, "train") == tmp_path / "train.txt"
    (tmp_path / "train_metadata.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    assert dataset_paths(str(tmp_path), "train") == tmp_path / "train_metadata.jsonl"
    assert dataset_paths(tmp_path, "train", file_format="txt") == tmp_path / "train.txt"
    with pytest.raises(FileNotFoundError) as error:
        dataset_paths(tmp_path, "test")
    assert "test_metadata.jsonl" in str(error.value) and "test.txt" in str(error.value)
    with pytest.raises(ValueError, match="file_format"):
        dataset_paths(tmp_path, "train", file_format="csv")


def test_prompt_dataset(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "tag": "x"}\n{"prompt": "b"}\n{"prompt": "c"}\n', encoding="utf-8")
    dataset = PromptDataset.from_file(path)
    assert len(dataset) == 3
    assert dataset[0] == Prompt("a", {"tag": "x"})
    texts, metadata = dataset.gather(torch.tensor([2, 0, 0]))
    assert texts == ["c", "a", "a"]
    assert metadata == [{}, {"tag": "x"}, {"tag": "x"}]
    metadata[1]["tag"] = "changed"
    assert dataset[0].metadata == {"tag": "x"}
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptDataset([])


# ---------------------------------------------------------------------------------------------
# GroupSampler


def _all_ranks(epoch: int, world_size: int, **kwargs) -> list:
    return [GroupSampler(world_size=world_size, rank=r, **kwargs).plan(epoch) for r in range(world_size)]


SETTINGS = [
    dict(num_prompts=100, prompts_per_epoch=48, group_size=24, world_size=8, batch_size=9, seed=0),
    dict(num_prompts=5, prompts_per_epoch=12, group_size=4, world_size=3, batch_size=2, seed=7),
    dict(num_prompts=30, prompts_per_epoch=6, group_size=2, world_size=1, batch_size=4, seed=1),
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_groups_complete_and_ranks_disjoint(setting):
    setting = dict(setting)
    world_size = setting.pop("world_size")
    plans = _all_ranks(3, world_size, **setting)
    num_batches = GroupSampler(world_size=world_size, rank=0, **setting).num_batches
    total = setting["prompts_per_epoch"] * setting["group_size"]
    assert num_batches * world_size * setting["batch_size"] == total

    for plan in plans:
        assert plan.dataset_indices.shape == plan.group_ids.shape == (num_batches, setting["batch_size"])
        assert plan.dataset_indices.dtype == plan.group_ids.dtype == torch.long
        assert plan.num_batches == num_batches

    group_ids = torch.cat([p.group_ids.flatten() for p in plans])
    dataset_indices = torch.cat([p.dataset_indices.flatten() for p in plans])
    counts = Counter(group_ids.tolist())
    assert sorted(counts) == list(range(setting["prompts_per_epoch"]))
    assert set(counts.values()) == {setting["group_size"]}
    for group in counts:
        assert dataset_indices[group_ids == group].unique().numel() == 1
    assert dataset_indices.min() >= 0 and dataset_indices.max() < setting["num_prompts"]


def test_ranks_follow_the_slice_rule():
    """Batch i of rank r is slice (i * world_size + r) of the one global shuffled list."""
    kwargs = dict(num_prompts=10, prompts_per_epoch=6, group_size=4, batch_size=2, seed=3)
    plans = _all_ranks(0, 3, **kwargs)
    # Interleave (batch 0 of ranks 0..W-1, batch 1 of ranks 0..W-1, ...) to rebuild the global list.
    interleaved = torch.stack([p.group_ids for p in plans], dim=1).flatten()  # (num_batches * W * B,)
    # The global shuffle depends only on (seed, epoch), so a single-rank sampler holds that list as is.
    single = GroupSampler(world_size=1, rank=0, **kwargs).plan(0).group_ids.flatten()
    assert torch.equal(interleaved, single)


def test_same_epoch_same_plan_different_epoch_different_plan():
    kwargs = dict(
        num_prompts=50, prompts_per_epoch=16, group_size=4, world_size=2, rank=1, batch_size=4, seed=5
    )
    a, b = GroupSampler(**kwargs).plan(2), GroupSampler(**kwargs).plan(2)
    assert torch.equal(a.dataset_indices, b.dataset_indices) and torch.equal(a.group_ids, b.group_ids)
    c = GroupSampler(**kwargs).plan(3)
    assert not torch.equal(a.dataset_indices, c.dataset_indices)
    d = GroupSampler(**{**kwargs, "seed": 6}).plan(2)
    assert not torch.equal(a.dataset_indices, d.dataset_indices)
    # The plan ignores the global RNG state.
    torch.manual_seed(123)
    assert torch.equal(GroupSampler(**kwargs).plan(2).group_ids, a.group_ids)


def test_groups_spread_over_ranks_and_batches():
    kwargs = dict(num_prompts=100, prompts_per_epoch=48, group_size=24, batch_size=9, seed=0)
    plans = _all_ranks(0, 8, **kwargs)
    places: dict[int, set] = {}
    for rank, plan in enumerate(plans):
        for batch, row in enumerate(plan.group_ids.tolist()):
            for group in row:
                places.setdefault(group, set()).add((rank, batch))
    assert all(len({rank for rank, _ in spots}) > 1 for spots in places.values())
    assert all(len(spots) > 1 for spots in places.values())


def test_more_prompts_per_epoch_than_dataset_uses_prompts_evenly():
    kwargs = dict(num_prompts=5, prompts_per_epoch=12, group_size=2, world_size=2, batch_size=3, seed=0)
    for epoch in range(3):
        plans = _all_ranks(epoch, **kwargs)
        group_to_prompt = {}
        for plan in plans:
            for g, i in zip(plan.group_ids.flatten().tolist(), plan.dataset_indices.flatten().tolist()):
                group_to_prompt[g] = i
        assert len(group_to_prompt) == 12
        uses = Counter(group_to_prompt.values())
        assert sorted(uses) == list(range(5))
        assert set(uses.values()) <= {2, 3}


def test_divisibility_error_explains_numbers_and_fix():
    with pytest.raises(ValueError) as error:
        GroupSampler(
            num_prompts=10, prompts_per_epoch=10, group_size=3, world_size=4, rank=0, batch_size=4, seed=0
        )
    message = str(error.value)
    assert "10 * 3 = 30" in message and "4 * 4 = 16" in message
    assert "multiple of 16" in message
    # The suggested prompts_per_epoch really works.
    GroupSampler(
        num_prompts=10, prompts_per_epoch=16, group_size=3, world_size=4, rank=0, batch_size=4, seed=0
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"group_size": 1}, "group_size must be at least 2"),
        ({"rank": 2}, r"rank must be an integer in \[0, 2\)"),
        ({"rank": -1}, "rank must be"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_prompts": 2.0}, "num_prompts must be a positive integer"),
        ({"world_size": True}, "world_size must be a positive integer"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_sampler_validation(change, match):
    kwargs = dict(
        num_prompts=10, prompts_per_epoch=4, group_size=4, world_size=2, rank=0, batch_size=2, seed=0
    )
    with pytest.raises(ValueError, match=match):
        GroupSampler(**{**kwargs, **change})


def test_plan_rejects_negative_epoch():
    sampler = GroupSampler(
        num_prompts=4, prompts_per_epoch=2, group_size=2, world_size=1, rank=0, batch_size=2, seed=0
    )
    with pytest.raises(ValueError, match="epoch"):
        sampler.plan(-1)
