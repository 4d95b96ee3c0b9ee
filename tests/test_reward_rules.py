"""The training rules of GenEval and OCR pinned on hand-made detections and readings.

Expected values are worked out by hand from the public TP-GRPO / Flow-GRPO code
(``flow_grpo/geneval_utils.py::evaluate_reward`` and ``flow_grpo/ocr.py`` of YunzeTong/TurningPoint-GRPO).
"""

from __future__ import annotations

import math

import pytest
import torch

from flow_grpo.reward_server.detectors import Detection
from flow_grpo.reward_server.geneval import GenEvalScorer
from flow_grpo.reward_server.geneval_rules import evaluate_geneval, geneval_partial
from flow_grpo.reward_server.ocr import OcrScorer, exact_accuracy, exact_target, reference_accuracy, reference_target
from flow_grpo.reward_server.server import ScorerInputError
from flow_grpo.rewards.registry import MultiReward
from flow_grpo.rewards.score_details import GENEVAL_DETAILS, GENEVAL_TASKS

LEFT, RIGHT = (0.0, 0.0, 10.0, 10.0), (40.0, 0.0, 50.0, 10.0)
SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
COUNTING = {"tag": "counting", "include": [{"class": "dog", "count": 3}], "exclude": [{"class": "dog", "count": 4}]}
RED_DOG = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]}
TWO = {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]}
DOG_LEFT_OF_CAT = {
    "tag": "position",
    "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["left of", 0]}],
}
RED_CAT_BLUE_DOG = {
    "tag": "color_attr",
    "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}],
}


def dog(score: float = 0.9, box=LEFT, color: str = "") -> Detection:
    return Detection(f"dog{'/' + color if color else ''}", score, box)


def cat(score: float = 0.9, box=RIGHT, color: str = "") -> Detection:
    return Detection(f"cat{'/' + color if color else ''}", score, box)


def judge(metadata: dict, detections: list[Detection]) -> tuple[float, bool, bool]:
    """(partial score, strict, official correct); a colour travels in the label as 'dog/red'."""
    plain = [Detection(d.label.split("/")[0], d.score, d.box) for d in detections]
    colors = {id(p): (d.label.split("/") + [""])[1] for p, d in zip(plain, detections)}
    color_of = lambda d: colors[id(d)]  # noqa: E731
    score, strict = geneval_partial(metadata, plain, color_of)
    correct, _ = evaluate_geneval(metadata, plain, color_of)
    return score, strict, correct


# case, metadata, detections, (partial score, strict, official correct)
GENEVAL_CASES = [
    ("one dog asked, one found", SINGLE, [dog()], (1.0, True, True)),
    ("one dog asked, two found", SINGLE, [dog(), dog(0.8, RIGHT)], (0.0, False, True)),
    ("one dog asked, four found: negative", SINGLE, [dog(), dog(0.8), dog(0.7), dog(0.6)], (-2.0, False, True)),
    ("nothing found", SINGLE, [], (0.0, False, False)),
    ("score equal to the threshold is not kept", SINGLE, [dog(0.3)], (0.0, False, False)),
    ("counting: 2 of 3 above 0.9", COUNTING, [dog(0.95), dog(0.95, RIGHT), dog(0.5)], (2 / 3, False, False)),
    ("counting: 4 of 3", COUNTING, [dog(0.95)] * 4, (2 / 3, False, False)),
    ("colour wrong", RED_DOG, [dog(color="blue")], (0.5, False, False)),
    ("colour clause, count unmet", RED_DOG, [dog(color="red"), dog(0.8, RIGHT, "blue")], (0.0, False, True)),
    ("two objects, one found", TWO, [cat()], (0.5, False, False)),
    ("position right", DOG_LEFT_OF_CAT, [cat(box=RIGHT), dog(box=LEFT)], (1.0, True, True)),
    ("position wrong: 0 then 1", DOG_LEFT_OF_CAT, [cat(box=LEFT), dog(box=RIGHT)], (0.75, False, False)),
    ("position target missing", DOG_LEFT_OF_CAT, [dog()], (1 / 3, False, False)),
    ("position clause, count unmet", DOG_LEFT_OF_CAT, [cat(), dog(box=LEFT), dog(0.5, RIGHT)], (1 / 3, False, True)),
    ("colour attribution, one wrong", RED_CAT_BLUE_DOG, [cat(color="red"), dog(color="red")], (0.75, False, False)),
    ("exclude is not in the score", {**SINGLE, "exclude": [{"class": "cat", "count": 1}]}, [dog(), cat()], (1.0, True, False)),
]


@pytest.mark.parametrize("metadata, detections, expected", [c[1:] for c in GENEVAL_CASES], ids=[c[0] for c in GENEVAL_CASES])
def test_geneval_partial_score_strict_and_official(metadata, detections, expected):
    score, strict, correct = judge(metadata, detections)
    assert score == pytest.approx(expected[0], abs=1e-12)
    assert (strict, correct) == expected[1:]


def test_a_failing_position_adds_one_zero_whatever_the_number_of_failing_pairs():
    two_cats = {"tag": "position", "include": [{"class": "cat", "count": 2}, DOG_LEFT_OF_CAT["include"][1]]}
    middle_dog = dog(box=(20.0, 0.0, 30.0, 10.0))
    # The dog is left of the right cat only: terms [cat 1] [dog 1, position 0, 1].
    assert judge(two_cats, [cat(box=RIGHT), cat(box=(0.0, 0.0, 6.0, 10.0)), middle_dog])[:2] == (0.75, False)
    # Right of both cats: the first failure breaks both loops, the terms are the same.
    far_dog = dog(box=(80.0, 0.0, 90.0, 10.0))
    assert judge(two_cats, [cat(box=RIGHT), cat(box=LEFT), far_dog])[:2] == (0.75, False)


def test_a_colour_and_position_clause_that_fails_its_colour_skips_the_position():
    metadata = {
        "tag": "position",
        "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "color": "red", "position": ["left of", 0]}],
    }
    # Terms: cat 1; dog count 1, colour 0; no position term.
    assert judge(metadata, [cat(box=LEFT), dog(box=RIGHT, color="blue")])[:2] == (2 / 3, False)
    # Colour right: position fails -> cat 1; dog 1, colour 1, position 0 and 1.
    assert judge(metadata, [cat(box=LEFT), dog(box=RIGHT, color="red")])[:2] == (0.8, False)


def test_position_must_point_to_an_earlier_include_entry():
    forward = {"include": [{"class": "dog", "count": 1, "position": ["left of", 1]}, {"class": "cat", "count": 1}]}
    with pytest.raises(ScorerInputError, match="earlier include entry"):
        geneval_partial(forward, [dog(), cat()])
    with pytest.raises(ScorerInputError, match="positive integer"):
        geneval_partial({"include": [{"class": "dog", "count": 0}]}, [dog()])


def test_geneval_scorer_returns_the_score_and_per_task_details():
    metadata = [SINGLE, {**DOG_LEFT_OF_CAT}, {"include": [{"class": "dog", "count": 1}]}]
    found = [[dog(), dog(0.8, RIGHT)], [cat(box=RIGHT), dog(box=LEFT)], [dog()]]
    scorer = GenEvalScorer(lambda images: found)
    scores = scorer(torch.zeros(3, 3, 8, 8), ["", "", ""], metadata)
    assert set(scores) == {"score", *GENEVAL_DETAILS}
    assert scores["score"].tolist() == [0.0, 1.0, 1.0]
    assert scores["strict"].tolist() == [0.0, 1.0, 1.0]
    assert scores["correct"].tolist() == [1.0, 1.0, 1.0]
    assert scores["correct_single_object"][0] == 1.0 and scores["strict_single_object"][0] == 0.0
    assert scores["correct_position"][1] == 1.0
    # Untagged and other-task images: NaN in every per-task column.
    for task in GENEVAL_TASKS:
        assert math.isnan(scores[f"correct_{task}"][2]) and math.isnan(scores[f"strict_{task}"][2])
    assert math.isnan(scores["correct_position"][0]) and math.isnan(scores["correct_single_object"][1])


def test_multireward_reports_details_beside_the_score_and_weights_only_the_score():
    scorer = GenEvalScorer(lambda images: [[dog(), dog(0.8, RIGHT)]])
    reward = MultiReward({"geneval": scorer}, {"geneval": 2.0})
    assert reward.detail_names == [f"geneval/{name}" for name in GENEVAL_DETAILS]
    scores = reward(torch.zeros(1, 3, 8, 8), [""], [SINGLE])
    assert set(scores) == {"geneval", "avg", *reward.detail_names}
    assert scores["geneval"].item() == 0.0 == scores["avg"].item()
    assert scores["geneval/correct"].item() == 1.0

    def undeclared(images, prompts, metadata):
        return {"score": torch.zeros(1), "extra": torch.zeros(1)}

    with pytest.raises(ValueError, match="declared detail_names"):
        MultiReward({"x": undeclared}, {"x": 1.0})(torch.zeros(1, 3, 8, 8), [""], [{}])


# ---- OCR ----

HELLO = 'A sign that says "Hello World"'

# case, prompt, reading, public value
OCR_CASES = [
    ("a piece read with confidence 0 is dropped", HELLO, [("Hello", 0.9), ("World", 0.0)], 1 - 5 / 11),
    ("the target repeated is a substring", 'A mug with "coffee" on it', [("coffee coffee coffee", 0.9)], 1.0),
    ("only the first quoted text counts", 'A poster: "Big Sale" and "50% off"', [("Big Sale", 0.9)], 1.0),
    ("no reading keeps the spaces' credit", HELLO, [], 1 - 10 / 11),
    ("curly quotes are not quotes", "A sign that says \u201cOpen\u201d", [("Open", 0.9)], 1 - 15 / 23),
    ("exact text", HELLO, [("Hello World", 0.9)], 1.0),
    ("one wrong character", HELLO, [("Hel1o World", 0.9)], 1 - 1 / 11),
    ("case and spaces are ignored", HELLO, [("HELLO", 0.8), ("world", 0.7)], 1.0),
    ("no quotes: the whole prompt", "OPEN", [("open", 0.9)], 1.0),
    ("an unrelated long text is capped", 'A sign "Open"', [("a completely different and much longer text", 0.9)], 0.0),
    ("pieces are concatenated", HELLO, [("Hello", 0.9), ("Wrld", 0.6)], 1 - 1 / 11),
    ("a piece without confidence is kept", HELLO, [("Hello World", None)], 1.0),
    ("empty quotes score 1", 'A blank sign ""', [("anything", 0.9)], 1.0),
]


@pytest.mark.parametrize("prompt, reading, expected", [c[1:] for c in OCR_CASES], ids=[c[0] for c in OCR_CASES])
def test_ocr_reference_rule(prompt, reading, expected):
    assert reference_accuracy(reading, prompt) == pytest.approx(expected, abs=1e-12)


def test_ocr_reference_target_is_the_first_straight_quote():
    assert reference_target('Two signs: "Stop" and "Go"') == "Stop"
    assert reference_target("A sign \u201cOpen\u201d") == "A sign \u201cOpen\u201d"
    assert reference_target('Half "quoted') == "quoted"


def test_ocr_exact_rule_is_the_former_whole_text_rule():
    # The cases where the rules part: every piece counts, all quoted parts and curly quotes form the target.
    assert exact_accuracy([("Hello", 0.9), ("World", 0.0)], exact_target(HELLO, {})) == 1.0
    assert exact_accuracy([("coffee coffee coffee", 0.9)], exact_target('A mug with "coffee" on it', {})) == 0.0
    big_sale = exact_target('A poster: "Big Sale" and "50% off"', {})
    assert exact_accuracy([("Big Sale", 0.9)], big_sale) == pytest.approx(1 - 6 / 13)
    assert exact_accuracy([], exact_target(HELLO, {})) == 0.0
    assert exact_accuracy([("Open", 0.9)], exact_target("A sign that says \u201cOpen\u201d", {})) == 1.0


def test_ocr_scorer_rules_by_name():
    images = torch.zeros(2, 3, 8, 8)
    prompts = [HELLO, 'A mug with "coffee" on it']
    readings = iter([[("Hello", 0.9), ("World", 0.0)], [("coffee coffee coffee", 0.9)]] * 2)
    reference = OcrScorer(lambda image: next(readings), num_workers=1)(images, prompts, [{}, {}])
    exact = OcrScorer(lambda image: next(readings), num_workers=1, rule="exact")(images, prompts, [{}, {}])
    torch.testing.assert_close(reference, torch.tensor([1 - 5 / 11, 1.0]))
    torch.testing.assert_close(exact, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="Unknown OCR rule"):
        OcrScorer(lambda image: [], rule="public")
