"""The paper's table: GenEval's official aggregation, the evaluation on a tiny preset, resume, the report files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flow_grpo.paper import runner
from flow_grpo.paper.geneval_table import format_task_table, summarize_geneval
from flow_grpo.rewards.score_details import GENEVAL_DETAILS
from flow_grpo.paper.report import write_report
from flow_grpo.paper.runner import Row, parse_rows, run_paper_evaluation
from flow_grpo.paper.suite import select_metrics
from flow_grpo.reward_server.server import RewardServer
from flow_grpo.rewards import build_reward
from flow_grpo.testing.preference_models import save_tiny_hpsv3, save_tiny_imagereward
from flow_grpo.testing.rewards import save_tiny_aesthetic_head, save_tiny_clip
from tests.test_tools import save_lora, tiny_config

# ------------------------------------------------------------------ GenEval aggregation


def _results(tag: str, prompts: int, correct_per_prompt: list[int], start: int) -> list[dict]:
    """4 images per prompt; prompt i has correct_per_prompt[i] correct images."""
    return [
        {"tag": tag, "prompt_index": start + p, "geneval": float(i < correct_per_prompt[p])}
        for p in range(prompts)
        for i in range(4)
    ]


def test_geneval_overall_is_the_mean_over_tasks_not_over_prompts() -> None:
    # counting: 1 prompt, all 4 images right (accuracy 1.0); position: 3 prompts, 1 of 12 right (1/12).
    records = _results("counting", 1, [4], 0) + _results("position", 3, [1, 0, 0], 1)
    summary = summarize_geneval(records)
    assert summary.tasks["counting"].accuracy == 1.0
    assert summary.tasks["position"].accuracy == pytest.approx(1 / 12)
    assert summary.tasks["position"].prompts == 3 and summary.tasks["position"].images == 12
    assert summary.overall == pytest.approx((1.0 + 1 / 12) / 2)  # 0.5417, GenEval's number
    assert summary.image_mean == pytest.approx(5 / 16)  # 0.3125, the mean over images and over prompts
    assert list(summary.tasks) == ["counting", "position"]  # GenEval's task order
    assert "| base | 1.0000 | 0.0833 | 0.5417 |" in format_task_table({"base": summary})


def test_geneval_counts_only_strict_ones_and_needs_tags() -> None:
    summary = summarize_geneval([{"tag": "colors", "prompt_index": 0, "geneval": 0.99}, {"tag": "colors", "prompt_index": 0, "geneval": 1.0}])
    assert summary.tasks["colors"].correct == 1
    with pytest.raises(ValueError, match="no 'tag'"):
        summarize_geneval([{"prompt": "a cat", "prompt_index": 0, "geneval": 1.0}])


# ---------------------------------------------------------------- the evaluation


class _FakeGenEval:
    """The GenEval scorer's reply: a partial score and its details; only images of a cat are correct."""

    detail_names = GENEVAL_DETAILS

    def __call__(self, images, prompts, metadata):
        correct = torch.tensor([1.0 if "cat" in prompt else 0.0 for prompt in prompts])
        details = {name: torch.full_like(correct, float("nan")) for name in GENEVAL_DETAILS}
        details["strict"] = details["correct"] = correct
        return {"score": 0.4 + correct / 2, **details}  # a partial score never 1: the table must not use it


def _fake_judge(images, prompts, metadata):
    return images.float().mean(dim=(1, 2, 3)) / 255


@pytest.fixture(scope="module")
def judges():
    """A reward server hosting stand-ins for the GenEval, OCR, UnifiedReward and DeQA scorers."""
    scorers = {"geneval": _FakeGenEval(), "ocr": _fake_judge, "unifiedreward": _fake_judge, "deqa": _fake_judge}
    with RewardServer(scorers, host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    """The four benchmarks in the layout `prepare_data --source published` writes, two or three prompts each."""
    root = tmp_path_factory.mktemp("published")
    for folder in ("geneval", "ocr", "pickscore_sfw", "drawbench"):
        (root / folder).mkdir()
    lines = [
        {"prompt": "a photo of a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]},
        {"prompt": "a photo of two dogs", "tag": "counting", "include": [{"class": "dog", "count": 2}]},
        {"prompt": "a photo of a cat and a dog", "tag": "counting", "include": [{"class": "cat", "count": 1}]},
    ]
    (root / "geneval" / "test_metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "ocr" / "test.txt").write_text('a sign that says "open"\na mug that says "hi"\n')
    (root / "pickscore_sfw" / "test.txt").write_text("a red bicycle\na bowl of ramen\n")
    (root / "drawbench" / "test.txt").write_text("a blue bird\na green fox\n")
    return root


@pytest.fixture(scope="module")
def reward_options(judges, tmp_path_factory) -> dict:
    clip = save_tiny_clip(tmp_path_factory.mktemp("paper-clip"))
    head = save_tiny_aesthetic_head(tmp_path_factory.mktemp("paper-head"))
    remote = {"url": judges.url}
    return {
        "pickscore": {"model": clip, "processor": clip},
        "aesthetic": {"model": clip, "head": head},
        "imagereward": save_tiny_imagereward(tmp_path_factory.mktemp("paper-imagereward")),
        "hpsv3": save_tiny_hpsv3(tmp_path_factory.mktemp("paper-hpsv3")),
        **{name: remote for name in ("geneval_correct", "ocr", "unifiedreward", "deqa")},
    }


def _config(tiny_sd3_dir: str):
    config = tiny_config(tiny_sd3_dir)
    config.sample.eval_num_steps = 2
    return config


def test_the_table_on_a_tiny_preset_and_a_resume(tiny_sd3_dir, dataset_root, reward_options, tmp_path, monkeypatch) -> None:
    lora = save_lora(tiny_sd3_dir, tmp_path / "run" / "checkpoints" / "epoch_00001" / "lora", rank=4, alpha=4)
    rows = parse_rows(["base", f"tp_grpo={lora}"])
    metrics = select_metrics("paper")
    out = tmp_path / "eval"
    results, settings = run_paper_evaluation(_config(tiny_sd3_dir), out, rows, metrics, dataset_root=dataset_root, reward_options=reward_options)
    written = write_report(out, results, metrics, settings)
    assert {path.name for path in written} == {"table.md", "table.json", "table.png", "geneval_tasks.md"}

    base = results["base"]
    assert set(base.values) == {metric.name for metric in metrics}
    # 2 of 3 GenEval prompts have a cat: single_object 1.0, counting 0.5 -> overall 0.75 (mean over prompts: 2/3).
    assert base.geneval.overall == pytest.approx(0.75) and base.geneval.tasks["counting"].images == 8
    assert base.values["geneval"] == pytest.approx(0.75)
    assert 0 < base.values["pickscore"]  # PickScore x 26
    # ImageReward and HPSv3 (tiny weights): the mean of their scores of the DrawBench images written
    drawbench = sorted((out / "base" / "drawbench" / "images").glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(file).convert("RGB"))).permute(2, 0, 1) for file in drawbench])
    preference = build_reward({"imagereward": 1.0, "hpsv3": 1.0}, "cpu", reward_options)
    scores = preference(pixels, ["a blue bird", "a green fox"], [{}, {}])
    assert [file.name for file in drawbench] == ["00000_00.png", "00001_00.png"]
    assert base.values["imagereward"] == pytest.approx(float(scores["imagereward"].mean()), abs=1e-6)
    assert base.values["hpsv3"] == pytest.approx(float(scores["hpsv3"].mean()), abs=1e-6)
    assert len(list((out / "base" / "geneval" / "images").glob("*.png"))) == 12
    assert results["base"].values["drawbench_pickscore"] != results["tp_grpo"].values["drawbench_pickscore"]

    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| Model | GenEval | OCR | PickScore | Aesthetic | DeQA | ImageReward")
    assert "| base | 0.7500 |" in table and "| tp_grpo |" in table
    data = json.loads((out / "table.json").read_text())
    assert data["rows"]["base"]["geneval"]["tasks"]["single_object"]["accuracy"] == 1.0
    assert data["settings"]["images"] == {"geneval": 12, "ocr": 2, "pickscore": 2, "drawbench": 2}
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A cut-off run: two images of one row are missing. Only those are generated again.
    kept = out / "tp_grpo" / "drawbench" / "images" / "00000_00.png"
    kept_bytes, kept_mtime = kept.read_bytes(), kept.stat().st_mtime_ns
    for name in ("00001_00.png", "00002_03.png"):
        folder = "drawbench" if name.startswith("00001") else "geneval"
        (out / "tp_grpo" / folder / "images" / name).unlink()
    generated = []
    original = runner.config_batches

    def counting_batches(adapter, jobs, sample, **options):
        generated.extend(job.filename for job in jobs)
        return original(adapter, jobs, sample, **options)

    monkeypatch.setattr(runner, "config_batches", counting_batches)
    loads = []
    original_load = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda *args, **kw: loads.append(args[2]) or original_load(*args, **kw))
    resumed, _ = run_paper_evaluation(_config(tiny_sd3_dir), out, rows, metrics, dataset_root=dataset_root, reward_options=reward_options)
    assert sorted(generated) == ["00001_00.png", "00002_03.png"]
    assert loads == [str(lora)]  # the base row had every image: its model was not loaded
    assert kept.read_bytes() == kept_bytes and kept.stat().st_mtime_ns == kept_mtime
    for name, result in results.items():
        assert resumed[name].values == pytest.approx(result.values), name


def test_a_resume_with_other_settings_is_refused(tiny_sd3_dir, dataset_root, reward_options, tmp_path) -> None:
    metrics = select_metrics("", ["drawbench_pickscore"])
    rows = [Row("base", None)]
    run_paper_evaluation(_config(tiny_sd3_dir), tmp_path, rows, metrics, dataset_root=dataset_root, reward_options=reward_options, max_prompts=1)
    changed = _config(tiny_sd3_dir)
    changed.sample.eval_num_steps = 3
    with pytest.raises(ValueError, match="num_steps = 2.*uses 3"):
        run_paper_evaluation(changed, tmp_path, rows, metrics, dataset_root=dataset_root, reward_options=reward_options)


def test_bad_input_names_what_to_change(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown metric.*'fid'"):
        select_metrics("paper", ["fid"])
    with pytest.raises(ValueError, match="unknown --suite"):
        select_metrics("table2")
    with pytest.raises(ValueError, match="at least one --checkpoint"):
        parse_rows([])
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        parse_rows([str(tmp_path)])
    with pytest.raises(ValueError, match="share a name"):
        parse_rows(["base", "base"])
    with pytest.raises(FileNotFoundError, match="prepare-data --source published"):
        runner.benchmark_jobs(tiny_config("unused"), runner.BENCHMARKS["drawbench"], tmp_path)


def test_the_command_writes_the_table(tiny_sd3_dir, dataset_root, reward_options, tmp_path) -> None:
    from tests.test_tools import ROOT, _script_env

    out = tmp_path / "table1"
    options = {name: reward_options[name] for name in ("pickscore", "geneval_correct")}
    command = [
        sys.executable, str(ROOT / "scripts" / "paper_eval.py"), "--config=config/grpo.py:tiny_tp_grpo",
        f"--config.pretrained.model={tiny_sd3_dir}", "--config.sample.eval_num_steps=2", f"--out={out}",
        "--checkpoint=base", "--metrics=geneval,drawbench_pickscore", f"--dataset_root={dataset_root}",
        "--max_prompts=2", f"--reward_options={json.dumps(options)}",
    ]
    done = subprocess.run(command, cwd=ROOT, env=_script_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| Model | GenEval | PickScore (DrawBench) |" in done.stdout
    # The first 2 GenEval prompts: a cat (single object, right) and two dogs (counting, wrong).
    assert "| base | 0.5000 |" in (out / "table.md").read_text()
    assert "| base | 1.0000 | 0.0000 | 0.5000 |" in (out / "geneval_tasks.md").read_text()
    assert json.loads((out / "table.json").read_text())["settings"]["images"] == {"geneval": 8, "drawbench": 2}
    assert (out / "table.png").is_file()
