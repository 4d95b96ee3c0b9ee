"""Evaluation / generation tools on the tiny SD3 model, and the prompt-set preparation helpers."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import random
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flow_grpo.data import Prompt, load_prompts
from flow_grpo.commands.options import parse_reward_weights
from flow_grpo.commands import prepare_data
from flow_grpo.sampling.evaluation import run_evaluation
from flow_grpo.sampling.generation import (
    SamplingRequest,
    find_lora_dir,
    generate_batches,
    load_model,
    plan_jobs,
    run_generation,
)

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


presets = _load("presets_for_tools", ROOT / "config" / "grpo.py")

DEMO_TEST_PROMPTS = [line.strip() for line in (ROOT / "dataset" / "demo" / "test.txt").read_text().splitlines() if line.strip()]


def tiny_config(model_dir: str):
    config = presets.tiny_tp_grpo()
    config.pretrained.model = model_dir
    config.dataset = str(ROOT / "dataset" / "demo")
    return config


def add_random_lora(transformer: torch.nn.Module, *, rank: int, alpha: int) -> None:
    """Add a LoRA with random non-zero B (so it changes the output); the same weights on every call."""
    from peft import LoraConfig

    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"])
    )
    generator = torch.Generator().manual_seed(0)
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = 0.2 * torch.randn(param.shape, generator=generator)


def save_lora(model_dir: str, target: Path, *, rank: int, alpha: int) -> Path:
    """A random LoRA (`add_random_lora`) saved the way the trainer saves one: with diffusers' adapter metadata."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    transformer = StableDiffusion3Pipeline.from_pretrained(model_dir).transformer
    add_random_lora(transformer, rank=rank, alpha=alpha)
    StableDiffusion3Pipeline.save_lora_weights(
        str(target),
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return target


def read_pngs(out_dir: Path) -> dict[str, np.ndarray]:
    return {path.name: np.asarray(Image.open(path)).astype(np.int16) for path in sorted((out_dir / "images").glob("*.png"))}


# ------------------------------------------------------------------------ arguments


def test_parse_reward_weights() -> None:
    assert parse_reward_weights("pickscore:1, aesthetic:0.5,clipscore") == {"pickscore": 1.0, "aesthetic": 0.5, "clipscore": 1.0}
    assert parse_reward_weights("  ") == {}
    with pytest.raises(ValueError, match="not a number"):
        parse_reward_weights("pickscore:high")
    with pytest.raises(ValueError, match="twice"):
        parse_reward_weights("pickscore:1,pickscore:2")
    with pytest.raises(ValueError, match="no name"):
        parse_reward_weights(":1")


def test_find_lora_dir_accepts_epoch_dir_and_names_what_is_missing(tmp_path) -> None:
    lora = tmp_path / "epoch_00003" / "lora"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert find_lora_dir(tmp_path / "epoch_00003") == lora
    assert find_lora_dir(lora) == lora
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights.safetensors"):
        find_lora_dir(tmp_path)


# ------------------------------------------------------------------------ evaluation


def test_evaluate_base_model_writes_summary_and_csv(tiny_sd3_dir, tmp_path) -> None:
    rewards = {"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}
    summary = run_evaluation(
        tiny_config(tiny_sd3_dir), tmp_path, SamplingRequest(images_per_prompt=2, max_prompts=3), rewards=rewards
    )

    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["count"] == 6
    assert summary["weights"] == rewards
    settings = summary["settings"]
    assert settings["lora"] is None and settings["num_prompts"] == 3 and settings["images_per_prompt"] == 2
    assert (settings["num_steps"], settings["resolution"], settings["seed"]) == (6, 32, 42)

    with open(tmp_path / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["prompt_index"]), int(r["image_index"])) for r in rows] == [(p, i) for p in range(3) for i in range(2)]
    assert [r["prompt"] for r in rows] == [p for p in DEMO_TEST_PROMPTS[:3] for _ in range(2)]
    assert len({r["seed"] for r in rows}) == 6  # every image has its own noise
    compress = np.array([float(r["jpeg_compressibility"]) for r in rows])
    incompress = np.array([float(r["jpeg_incompressibility"]) for r in rows])
    average = np.array([float(r["avg"]) for r in rows])
    np.testing.assert_allclose(incompress, -compress)
    np.testing.assert_allclose(average, compress + 0.5 * incompress, rtol=1e-6)
    assert np.all(compress < 0)  # minus a JPEG size in kB
    for name, values in (("jpeg_compressibility", compress), ("avg", average)):
        assert summary["rewards"][name]["mean"] == pytest.approx(values.mean(), rel=1e-6)
        assert summary["rewards"][name]["std"] == pytest.approx(values.std(), rel=1e-5, abs=1e-9)


def test_images_do_not_depend_on_batch_size(tiny_sd3_dir) -> None:
    adapter = load_model(tiny_config(tiny_sd3_dir), torch.device("cpu")).adapter
    jobs = plan_jobs([Prompt("a red kite"), Prompt("two cats on a sofa")], images_per_prompt=2, seed=7)

    def sample(batch_size: int) -> torch.Tensor:
        batches = generate_batches(adapter, jobs, num_steps=4, resolution=32, batch_size=batch_size)
        return torch.cat([images for _, images in batches])

    one_by_one, together = sample(1), sample(4)
    assert one_by_one.shape == (4, 3, 32, 32)
    torch.testing.assert_close(one_by_one, together, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])  # same prompt, different seeds


def test_an_earlier_runs_outputs_are_refused_and_replaced_only_with_overwrite(tiny_sd3_dir, tmp_path) -> None:
    config = tiny_config(tiny_sd3_dir)
    out = tmp_path / "samples"
    run_generation(config, out, SamplingRequest(texts=["a red bicycle"], images_per_prompt=2))
    (out / "notes.txt").write_text("mine")
    before = {path.name: path.read_bytes() for path in [*out.iterdir(), *(out / "images").iterdir()] if path.is_file()}
    for again in (
        lambda: run_generation(config, out, SamplingRequest(texts=["a bowl of ramen"])),
        lambda: run_evaluation(config, out, SamplingRequest(texts=["a bowl of ramen"]), rewards={"jpeg_compressibility": 1.0}),
    ):
        with pytest.raises(ValueError, match=r"already holds the outputs of an earlier run \(index\.jsonl, settings\.json, "
                                             r"2 images in images/\); pass --overwrite"):
            again()
    assert {path.name: path.read_bytes() for path in [*out.iterdir(), *(out / "images").iterdir()] if path.is_file()} == before

    index = run_generation(config, out, SamplingRequest(texts=["a bowl of ramen"]), overwrite=True)
    assert [row["prompt"] for row in index] == ["a bowl of ramen"]
    assert sorted(path.name for path in (out / "images").iterdir()) == ["00000_00.png"]  # the second sample is gone
    assert (out / "notes.txt").read_text() == "mine"  # what the tools did not write stays


def test_lora_changes_images_and_trained_scale_is_restored(tiny_sd3_dir, tmp_path) -> None:
    # rank 4, alpha 8 (scale 2), saved with adapter metadata as the trainer saves it. The reference is
    # the same LoRA added in memory, independent of saving and loading: a load that lost alpha (diffusers
    # then uses alpha = rank) would give the images of the alpha-4 reference instead.
    lora = save_lora(tiny_sd3_dir, tmp_path / "run" / "checkpoints" / "epoch_00000" / "lora", rank=4, alpha=8)
    config = tiny_config(tiny_sd3_dir)
    texts = ["a lighthouse at dusk", "a bowl of fruit"]
    run_generation(config, tmp_path / "base", SamplingRequest(texts=texts))
    index = run_generation(config, tmp_path / "lora_out", SamplingRequest(lora=str(lora.parent), texts=texts))

    settings = json.loads((tmp_path / "lora_out" / "settings.json").read_text())
    assert settings["lora"] == str(lora) and settings["lora_scale"] == 1.0
    assert len(index) == 2
    base, loaded = read_pngs(tmp_path / "base"), read_pngs(tmp_path / "lora_out")
    assert base.keys() == loaded.keys() == {"00000_00.png", "00001_00.png"}
    for name in base:
        assert np.abs(base[name] - loaded[name]).max() > 2, "the LoRA must change the image"

    jobs = plan_jobs([Prompt(text) for text in texts], images_per_prompt=1, seed=config.seed)

    def sample(adapter) -> torch.Tensor:
        batches = generate_batches(
            adapter, jobs, num_steps=config.sample.eval_num_steps, resolution=config.sample.resolution, batch_size=len(jobs)
        )
        return torch.cat([images for _, images in batches])

    def in_memory(alpha: int) -> torch.Tensor:
        adapter = load_model(config, torch.device("cpu")).adapter
        add_random_lora(adapter.transformer, rank=4, alpha=alpha)
        return sample(adapter)

    def as_png(images: torch.Tensor) -> list[np.ndarray]:
        return [np.asarray(image.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0)).astype(np.int16) for image in images]

    trained, alpha_lost = in_memory(alpha=8), in_memory(alpha=4)
    for job, expected, lost in zip(jobs, as_png(trained), as_png(alpha_lost)):
        assert np.abs(loaded[job.filename] - expected).max() <= 1, "the checkpoint must load with scale alpha / rank"
        assert np.abs(loaded[job.filename] - lost).max() > 2, "alpha = rank must give other images"

    # --lora_scale multiplies the trained scale: 0.5 x 8 / 4 is the alpha-4 LoRA.
    halved = sample(load_model(config, torch.device("cpu"), lora=str(lora), scale=0.5).adapter)
    torch.testing.assert_close(halved, alpha_lost, atol=1e-4, rtol=1e-4)


def _script_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


def test_generate_cli_writes_one_png_per_image(tiny_sd3_dir, tmp_path) -> None:
    out = tmp_path / "samples"
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "generate.py"),
            "--config=config/grpo.py:tiny_tp_grpo", f"--config.pretrained.model={tiny_sd3_dir}",
            "--config.sample.eval_batch_size=4", f"--out={out}", "--prompts=dataset/demo/test.txt",
            "--max_prompts=2", "--num_images=3",
        ],
        cwd=ROOT, env=_script_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    pngs = sorted(path.name for path in (out / "images").glob("*.png"))
    assert pngs == [f"{p:05d}_{i:02d}.png" for p in range(2) for i in range(3)]
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [entry["file"] for entry in index] == [f"images/{name}" for name in pngs]
    assert [entry["prompt"] for entry in index] == [p for p in DEMO_TEST_PROMPTS[:2] for _ in range(3)]
    assert Image.open(out / index[0]["file"]).size == (32, 32)


def test_evaluate_cli_with_lora_and_reward_flag(tiny_sd3_dir, tmp_path) -> None:
    lora = save_lora(tiny_sd3_dir, tmp_path / "lora", rank=4, alpha=4)
    out = tmp_path / "eval"
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "evaluate.py"),
            "--config=config/grpo.py:tiny_tp_grpo", f"--config.pretrained.model={tiny_sd3_dir}",
            f"--lora={lora}", "--lora_scale=0.5", f"--out={out}", "--rewards=jpeg_incompressibility:2",
            "--prompt=a small boat", "--prompt=a tall tree", "--save_images",
        ],
        cwd=ROOT, env=_script_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == 2 and summary["weights"] == {"jpeg_incompressibility": 2.0}
    assert summary["settings"]["lora"] == str(lora)
    assert summary["settings"]["lora_scale"] == 0.5
    assert summary["rewards"]["avg"]["mean"] == pytest.approx(2 * summary["rewards"]["jpeg_incompressibility"]["mean"], rel=1e-6)
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["prompt"] for r in rows] == ["a small boat", "a tall tree"]
    assert all((out / r["image"]).is_file() for r in rows)
    assert "summary:" in result.stdout


def test_unknown_reward_fails_before_the_model_is_loaded(tmp_path) -> None:
    # The model directory does not exist either: the reward name is checked first.
    with pytest.raises(ValueError, match=r"sharpness.*jpeg_compressibility"):
        run_evaluation(tiny_config(str(tmp_path / "missing")), tmp_path / "eval", rewards={"sharpness": 1.0})
    assert not (tmp_path / "eval").exists()


def test_missing_model_fails_before_loading(tmp_path) -> None:
    with pytest.raises(ValueError, match="pretrained.model"):
        load_model(tiny_config(str(tmp_path / "missing")), torch.device("cpu"))


# ------------------------------------------------------------------- prompt sets


def _prompts(*texts: str) -> list[Prompt]:
    return [Prompt(text, {}) for text in texts]


def test_deduplicate_normalises_whitespace_and_case_and_keeps_first() -> None:
    prompts = [Prompt("  A red  car\n", {"tag": "first"}), Prompt("a red car", {"tag": "second"}), Prompt("   ", {}), Prompt("a blue car", {})]
    unique = prepare_data.deduplicate(prompts)
    assert [p.text for p in unique] == ["A red car", "a blue car"]
    assert unique[0].metadata == {"tag": "first"}


def test_split_is_deterministic_disjoint_and_order_independent() -> None:
    texts = [f"prompt number {i}" for i in range(50)]
    train, test = prepare_data.split_prompts(_prompts(*texts, "PROMPT NUMBER 3"), 0.2, seed=1)
    assert len(test) == 10 and len(train) == 40
    assert {p.text for p in train} | {p.text for p in test} == set(texts)
    assert not {p.text for p in train} & {p.text for p in test}
    shuffled_train, shuffled_test = prepare_data.split_prompts(_prompts(*reversed(texts)), 0.2, seed=1)
    assert {p.text for p in shuffled_test} == {p.text for p in test}
    _, other_seed_test = prepare_data.split_prompts(_prompts(*texts), 0.2, seed=2)
    assert {p.text for p in other_seed_test} != {p.text for p in test}
    assert [p.text for p in train] == [t for t in texts if t in {p.text for p in train}]  # input order kept


def test_split_with_given_test_set_removes_leaked_prompts() -> None:
    train, test = prepare_data.split_prompts(_prompts("a cat", "a dog", "a Fox"), 0.5, 0, test_prompts=_prompts("a fox", "a fox", "an owl"))
    assert [p.text for p in train] == ["a cat", "a dog"]
    assert [p.text for p in test] == ["a fox", "an owl"]
    with pytest.raises(ValueError, match="test_fraction"):
        prepare_data.split_prompts(_prompts("a", "b"), 1.0, 0)
    with pytest.raises(ValueError, match="cannot be split"):
        prepare_data.split_prompts(_prompts("a", "A"), 0.5, 0)


def test_cap_keeps_a_deterministic_subset_in_input_order() -> None:
    prompts = _prompts(*(f"p{i}" for i in range(20)))
    kept = prepare_data.cap(prompts, 5, seed=0)
    assert len(kept) == 5 and kept == prepare_data.cap(prompts, 5, seed=0)
    assert [p.text for p in kept] == sorted((p.text for p in kept), key=lambda t: int(t[1:]))
    assert prepare_data.cap(prompts, 0, seed=0) == prompts


def test_writer_round_trips_through_the_dataset_loader(tmp_path) -> None:
    train, test = _prompts("a cat", "a dog"), _prompts("an owl")
    written = prepare_data.write_prompt_sets(tmp_path, train, test, {"source": "files"})
    assert [p.name for p in written] == ["train.txt", "test.txt"]
    assert load_prompts(tmp_path / "train.txt") == train
    record = json.loads((tmp_path / "prepare_data.json").read_text())
    assert (record["source"], record["num_train"], record["num_test"]) == ("files", 2, 1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_data.write_prompt_sets(tmp_path, train, test, {})

    geneval = [Prompt("a photo of two cups", {"tag": "counting", "include": [{"class": "cup", "count": 2}]})]
    prepare_data.write_prompt_sets(tmp_path, geneval, geneval, {}, overwrite=True)
    assert not (tmp_path / "train.txt").exists()  # the old format does not shadow the new one
    assert load_prompts(tmp_path / "train_metadata.jsonl") == geneval


def test_prepare_data_cli_from_local_files(tmp_path) -> None:
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(f"prompt {i}" for i in range(10)) + "\nprompt 0\n")
    out = tmp_path / "out" / "mine"

    def prepare() -> tuple[list[str], list[str]]:
        prepare_data.main(["--source", "files", "--inputs", str(source), "--out", str(out.parent), "--name", "mine",
                           "--test_fraction", "0.3", "--overwrite"])
        return (out / "train.txt").read_text().splitlines(), (out / "test.txt").read_text().splitlines()

    train, test = prepare()
    assert len(test) == 3 and len(train) == 7
    assert sorted(train + test) == sorted(f"prompt {i}" for i in range(10))
    assert prepare() == (train, test)  # reproducible


# Pick-a-Pic style captions: 30 long ones (one repeated with other case and spacing), short ones.
_LONG_CAPTIONS = [f"a painting of a red fox number {i}" for i in range(30)]
_CAPTIONS = [*_LONG_CAPTIONS[:10], "A painting  of a red FOX number 3", "a cat", "five words are not enough", *_LONG_CAPTIONS[10:]]


def test_sfw_prompt_set_is_unique_long_captions_shuffled_with_the_seed() -> None:
    train, test = prepare_data.shuffle_split_captions(_CAPTIONS, seed=42, num_test=5)
    expected = [Prompt(text, {}) for text in _LONG_CAPTIONS]
    random.Random(42).shuffle(expected)
    assert test == expected[:5] and train == expected[5:]
    assert prepare_data.shuffle_split_captions(_CAPTIONS, seed=42, num_test=5) == (train, test)
    _, other_test = prepare_data.shuffle_split_captions(_CAPTIONS, seed=7, num_test=5)
    assert other_test != test
    with pytest.raises(ValueError, match="lower --test_size"):
        prepare_data.shuffle_split_captions(_CAPTIONS, seed=42, num_test=30)


def test_prepare_data_pickapic_sfw_reads_the_hub_dataset(tmp_path, monkeypatch) -> None:
    """The network path with an in-memory stand-in for `datasets.load_dataset`."""
    class Rows:
        column_names = ["caption", "image_0_uid"]

        def __getitem__(self, column: str) -> list:
            return {"caption": [*_CAPTIONS, None], "image_0_uid": ["x"] * (len(_CAPTIONS) + 1)}[column]

    requested = []

    def load_dataset(name: str, split: str) -> Rows:
        requested.append((name, split))
        return Rows()

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    prepare_data.main(["--source", "pickapic_sfw", "--out", str(tmp_path), "--test_size", "4"])
    assert requested == [("CarperAI/pickapic_v1_no_images_training_sfw", "train")]
    out = tmp_path / "pickscore_sfw"
    train, test = (out / "train.txt").read_text().splitlines(), (out / "test.txt").read_text().splitlines()
    expected_train, expected_test = prepare_data.shuffle_split_captions(_CAPTIONS, seed=42, num_test=4)
    assert (train, test) == ([p.text for p in expected_train], [p.text for p in expected_test])
    record = json.loads((out / "prepare_data.json").read_text())
    assert (record["source"], record["seed"], record["min_words"], record["num_test"]) == ("pickapic_sfw", 42, 6, 4)
    assert presets.pickscore_sd3().dataset == presets.pickscore_flux().dataset == "dataset/pickscore_sfw"
