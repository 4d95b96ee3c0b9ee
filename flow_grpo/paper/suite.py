"""The benchmarks and metrics of the paper's Table 1 (arXiv 2602.06422, SD3.5-M).

A *benchmark* is a prompt file (under the dataset root that `prepare_data --source published` fills)
and a number of images per prompt. A *metric* is a column of the table: a registered reward scored on
one benchmark's images, reported as the mean over images times `scale` (PickScore as the paper prints
it, ~22-25, not the training reward's score / 26), or, for GenEval, with GenEval's official
aggregation (:mod:`flow_grpo.paper.geneval_table`). As in Flow-GRPO's and the paper's tables, the
image-quality columns (Aesthetic, DeQA, ImageReward, PickScore, UnifiedReward) are scored on
DrawBench; HPSv3 (reported by the GCPO re-run) too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flow_grpo.command_flags import InputValueError
from flow_grpo.paper.geneval_table import GENEVAL_IMAGES_PER_PROMPT
from flow_grpo.rewards.clip_models import PICKSCORE_DIVISOR

__all__ = ["BENCHMARKS", "METRICS", "SUITES", "Benchmark", "Metric", "select_metrics"]


@dataclass(frozen=True)
class Benchmark:
    """A prompt file `prompts` (relative to the dataset root), sampled `images_per_prompt` times per prompt."""

    name: str
    prompts: str
    images_per_prompt: int


@dataclass(frozen=True)
class Metric:
    """A table column: reward `reward` on benchmark `benchmark`, mean times `scale` (or GenEval's official score).

    `needs` says what the reward needs to run with its real weights (for errors and the docs).
    """

    name: str
    label: str
    benchmark: str
    reward: str
    needs: str
    scale: float = 1.0
    geneval: bool = False


BENCHMARKS: dict[str, Benchmark] = {
    benchmark.name: benchmark
    for benchmark in (
        Benchmark("geneval", "geneval/test_metadata.jsonl", GENEVAL_IMAGES_PER_PROMPT),
        Benchmark("ocr", "ocr/test.txt", 1),
        Benchmark("pickscore", "pickscore_sfw/test.txt", 1),
        Benchmark("drawbench", "drawbench/test.txt", 1),
    )
}
"""The paper's evaluation prompt sets, as `prepare_data --source published` writes them."""

_SERVER = "a reward server hosting the scorer (flow-grpo-reward-server --scorers {})"

METRICS: dict[str, Metric] = {
    metric.name: metric
    for metric in (
        Metric("geneval", "GenEval", "geneval", "geneval_correct", _SERVER.format("geneval") + ": Mask2Former + CLIP", geneval=True),
        Metric("ocr", "OCR", "ocr", "ocr", _SERVER.format("ocr") + ": PaddleOCR"),
        Metric("pickscore", "PickScore", "pickscore", "pickscore", "PickScore_v1 weights", scale=PICKSCORE_DIVISOR),
        Metric("aesthetic", "Aesthetic", "drawbench", "aesthetic", "CLIP ViT-L/14 + LAION aesthetic head"),
        Metric("deqa", "DeQA", "drawbench", "deqa", _SERVER.format("deqa") + " and a served DeQA-Score VLM"),
        Metric(
            "imagereward", "ImageReward", "drawbench", "imagereward",
            "THUDM/ImageReward's ImageReward.pt and med_config.json, the bert-base-uncased tokenizer",
        ),
        Metric(
            "drawbench_pickscore", "PickScore (DrawBench)", "drawbench", "pickscore", "PickScore_v1 weights",
            scale=PICKSCORE_DIVISOR,
        ),
        Metric("unifiedreward", "UnifiedReward", "drawbench", "unifiedreward", _SERVER.format("unifiedreward") + " and a served UnifiedReward VLM"),
        Metric(
            "hpsv3", "HPSv3", "drawbench", "hpsv3",
            "MizzenAI/HPSv3's HPSv3.safetensors, Qwen2-VL-7B-Instruct's config and processor; a GPU (7B, ~17 GB in bfloat16)",
        ),
    )
}
"""Every column, in the paper's order (task metrics, then DrawBench quality metrics, then HPSv3)."""

SUITES: dict[str, tuple[str, ...]] = {
    "paper": tuple(METRICS),
    "task": ("geneval", "ocr", "pickscore"),
    "quality": ("aesthetic", "deqa", "imagereward", "drawbench_pickscore", "unifiedreward", "hpsv3"),
}
"""Named metric lists for `--suite`: the whole table, its task columns, its DrawBench columns."""


def select_metrics(suite: str, names: Sequence[str] = ()) -> list[Metric]:
    """The metrics of `names` (in the table's order), or of the suite `suite` when `names` is empty.

    Raises:
        InputValueError: an unknown suite or metric, naming the valid ones (a `ValueError`).
    """
    if not names:
        if suite not in SUITES:
            raise InputValueError(f"unknown --suite {suite!r}; suites: {', '.join(SUITES)}")
        names = SUITES[suite]
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise InputValueError(f"unknown metric(s) {unknown} in --metrics; metrics: {', '.join(METRICS)}")
    return [metric for name, metric in METRICS.items() if name in names]
