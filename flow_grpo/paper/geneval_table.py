"""GenEval's official score: per-task accuracy over images, overall = the mean of the task accuracies.

GenEval (Ghosh et al., 2023; `evaluation/summary_scores.py` of github.com/djghosh13/geneval) groups
the per-image results by the prompt's `tag` (its task), takes each task's fraction of correct
images, and reports the unweighted mean of those fractions as the overall score, with 4 images per
prompt. A mean over prompts or images instead weights each task by its number of prompts (the 553
evaluation prompts are 80 single object, 99 two objects, 80 counting, 94 colours, 100 position and
100 colour attribution), which gives a different number.

An image is correct by GenEval's official rule, the `geneval_correct` reward (the `correct` detail of
the `geneval` scorer): every `include` clause met and no `exclude` clause hit
(:mod:`flow_grpo.reward_server.geneval`); the training reward `geneval` is the partial score instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flow_grpo.command_flags import InputValueError

__all__ = [
    "CORRECT_AT",
    "GENEVAL_IMAGES_PER_PROMPT",
    "GENEVAL_TASKS",
    "GenEvalSummary",
    "TaskScore",
    "format_task_table",
    "summarize_geneval",
]

GENEVAL_TASKS: dict[str, str] = {
    "single_object": "Single object",
    "two_object": "Two objects",
    "counting": "Counting",
    "colors": "Colors",
    "position": "Position",
    "color_attr": "Color attribution",
}
"""GenEval's six task tags (the `tag` of each prompt's metadata) and their names in the paper's tables."""

GENEVAL_IMAGES_PER_PROMPT = 4
"""Images per prompt of the official protocol."""

CORRECT_AT = 1.0 - 1e-6
"""A `geneval` score at or above this counts as a correct image (the scorer's strict 1)."""


@dataclass(frozen=True)
class TaskScore:
    """One task: `correct` of `images` images right, over `prompts` prompts."""

    correct: int
    images: int
    prompts: int

    @property
    def accuracy(self) -> float:
        """Fraction of correct images."""
        return self.correct / self.images


@dataclass(frozen=True)
class GenEvalSummary:
    """The official table of one model: per-task scores and overall = mean of the task accuracies."""

    tasks: dict[str, TaskScore]

    @property
    def overall(self) -> float:
        """GenEval's overall score: the unweighted mean over tasks of each task's accuracy."""
        return sum(task.accuracy for task in self.tasks.values()) / len(self.tasks)

    @property
    def image_mean(self) -> float:
        """The mean over all images (weights tasks by their image counts; not the official score)."""
        return sum(task.correct for task in self.tasks.values()) / sum(task.images for task in self.tasks.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON form: overall, the image mean, and per task accuracy, correct, images and prompts."""
        return {
            "overall": self.overall,
            "image_mean": self.image_mean,
            "tasks": {
                tag: {"accuracy": task.accuracy, "correct": task.correct, "images": task.images, "prompts": task.prompts}
                for tag, task in self.tasks.items()
            },
        }


def summarize_geneval(records: Iterable[Mapping[str, Any]], score_key: str = "geneval") -> GenEvalSummary:
    """The official aggregation of per-image results.

    Args:
        records: one per image with `tag` (the prompt's task), `prompt_index` and `score_key`
            (the `geneval` score; correct when at least :data:`CORRECT_AT`).
        score_key: key of the score in each record.

    Returns:
        Per-task scores in GenEval's task order (other tags after them, in order of appearance).

    Raises:
        ValueError: no records.
        InputValueError: a record without a tag (the prompt set lacks GenEval's task tags; a `ValueError`).
    """
    correct: dict[str, int] = {}
    images: dict[str, int] = {}
    prompts: dict[str, set[int]] = {}
    for record in records:
        tag = record.get("tag")
        if not isinstance(tag, str) or not tag:
            raise InputValueError(
                f"GenEval result of prompt {record.get('prompt')!r} has no 'tag'; GenEval needs the task tag of every "
                "prompt (use the published dataset/geneval/test_metadata.jsonl)"
            )
        correct[tag] = correct.get(tag, 0) + int(float(record[score_key]) >= CORRECT_AT)
        images[tag] = images.get(tag, 0) + 1
        prompts.setdefault(tag, set()).add(int(record["prompt_index"]))
    if not images:
        raise ValueError("no GenEval results to summarise")
    order = [tag for tag in GENEVAL_TASKS if tag in images] + [tag for tag in images if tag not in GENEVAL_TASKS]
    return GenEvalSummary({tag: TaskScore(correct[tag], images[tag], len(prompts[tag])) for tag in order})


def format_task_table(summaries: Mapping[str, GenEvalSummary], digits: int = 4) -> str:
    """A Markdown table: one row per model, one column per task, then the overall score."""
    tags: list[str] = []
    for summary in summaries.values():
        tags += [tag for tag in summary.tasks if tag not in tags]
    header = ["Model", *(GENEVAL_TASKS.get(tag, tag) for tag in tags), "Overall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, summary in summaries.items():
        cells: Sequence[str] = [
            f"{summary.tasks[tag].accuracy:.{digits}f}" if tag in summary.tasks else "-" for tag in tags
        ]
        lines.append("| " + " | ".join([name, *cells, f"{summary.overall:.{digits}f}"]) + " |")
    return "\n".join(lines) + "\n"
