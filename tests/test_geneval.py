"""GenEval scorer: Mask2Former detector, masked colour crops, the per-class cap, batched == per-image."""

from __future__ import annotations

import pytest
import torch

from flow_grpo.reward_server.geneval import (
    GENEVAL_COLORS,
    MASK_BACKGROUND,
    ClipColorClassifier,
    Detection,
    GenEvalScorer,
    Mask2FormerDetector,
    TransformersDetector,
    color_crop,
    color_requests,
    evaluate_geneval,
    make_geneval_scorer,
)
from flow_grpo.testing.rewards import save_tiny_clip, save_tiny_detector, save_tiny_mask2former

LABELS = ("dog", "cat")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("geneval-clip"))


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_mask2former(tmp_path_factory.mktemp("geneval-m2f"), labels=LABELS)


def _images(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator)


def _red_on_blue(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A blue image with a small red disc; returns the image (3, H, W) and the disc's mask (H, W)."""
    image = torch.zeros(3, size, size)
    image[2] = 1.0
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 <= (size / 6) ** 2
    image[:, mask] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    return image, mask


def mean_color(image: torch.Tensor, detection: Detection) -> str:
    """A colour judge that looks at every pixel of the crop: red, blue or grey by the dominant channel."""
    crop = color_crop(image, detection).reshape(3, -1).mean(dim=1)
    return "red" if crop[0] > crop[2] else "blue"


def test_masked_crop_ignores_the_background():
    image, mask = _red_on_blue()
    # A loose box (as detectors give): the disc covers a fifth of it, the rest is blue.
    box = (5.0, 5.0, 27.0, 27.0)
    masked, boxed = Detection("dog", 0.95, box, mask), Detection("dog", 0.95, box)
    crop = color_crop(image, masked)
    # Outside the disc the crop is the grey background, inside it is the image.
    inside = mask[int(box[1]) : int(box[3]), int(box[0]) : int(box[2])]
    assert torch.all(crop[:, ~inside] == MASK_BACKGROUND / 255.0)
    assert torch.all(crop[:, inside] == torch.tensor([1.0, 0.0, 0.0])[:, None])
    # The box corners are blue: the same box without the mask is judged blue, with it red.
    assert mean_color(image, boxed) == "blue"
    assert mean_color(image, masked) == "red"
    meta = {"include": [{"class": "dog", "count": 1, "color": "red"}]}
    assert evaluate_geneval(meta, [masked], lambda d: mean_color(image, d))[0]
    assert not evaluate_geneval(meta, [boxed], lambda d: mean_color(image, d))[0]


def test_at_most_max_objects_per_class_count():
    dogs = [Detection("dog", 0.5 + i / 100, (float(i), 0.0, i + 1.0, 1.0)) for i in range(20)]
    at_least_17 = {"include": [{"class": "dog", "count": 17}]}
    assert not evaluate_geneval(at_least_17, dogs)[0]
    assert evaluate_geneval(at_least_17, dogs, max_objects=20)[0]
    assert evaluate_geneval({"include": [{"class": "dog", "count": 16}]}, dogs)[0]
    # "fewer than 17 dogs" holds with the cap: only the 16 most confident are kept.
    fewer = {"include": [{"class": "dog", "count": 1}], "exclude": [{"class": "dog", "count": 17}]}
    assert evaluate_geneval(fewer, dogs)[0]
    assert not evaluate_geneval(fewer, dogs, max_objects=17)[0]
    # The kept ones are the most confident: the colour judge only sees those.
    seen: list[float] = []
    colored = {"include": [{"class": "dog", "count": 16, "color": "red"}]}
    evaluate_geneval(colored, dogs, lambda d: seen.append(d.score) or "red")
    assert sorted(seen) == sorted(d.score for d in dogs)[-16:]
    with pytest.raises(ValueError, match="max_objects"):
        GenEvalScorer(lambda images: [], max_objects=0)


def test_tiny_mask2former_postprocess_matches_transformers(mask2former_dir):
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    detector = Mask2FormerDetector(mask2former_dir, torch.device("cpu"), torch.float32, 0.0)
    images = _images(2, size=40)
    found = detector(images)
    processor = AutoImageProcessor.from_pretrained(mask2former_dir)
    model = Mask2FormerForUniversalSegmentation.from_pretrained(mask2former_dir).eval()
    pixels = [(image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for image in images]
    with torch.no_grad():
        outputs = model(**processor(images=pixels, return_tensors="pt"))
    reference = processor.post_process_instance_segmentation(
        outputs, threshold=0.0, target_sizes=[(40, 40)] * 2, return_binary_maps=True
    )
    for detections, expected in zip(found, reference, strict=True):
        assert len(detections) == len(expected["segments_info"]) > 0
        ours = sorted(detections, key=lambda d: d.score)
        order = sorted(range(len(expected["segments_info"])), key=lambda i: expected["segments_info"][i]["score"])
        for detection, i in zip(ours, order, strict=True):
            info = expected["segments_info"][i]
            assert detection.label == LABELS[info["label_id"]]
            assert detection.score == pytest.approx(info["score"], abs=1e-5)
            mask = expected["segmentation"][i].bool()
            assert torch.equal(detection.mask, mask)
            ys, xs = mask.nonzero(as_tuple=True)
            assert detection.box == (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _metadata() -> list[dict]:
    return [
        {"include": [{"class": "dog", "count": 1, "color": "red"}]},
        {"include": [{"class": "cat", "count": 1, "color": "blue"}, {"class": "dog", "count": 1, "color": "red"}]},
        {"include": [{"class": "dog", "count": 1}], "exclude": [{"class": "cat", "count": 3}]},
        {"include": [{"class": "giraffe", "count": 1}]},
        {"tag": "counting", "include": [{"class": "dog", "count": 2}]},
        {"include": [{"class": "cat", "count": 1, "color": "green"}]},
    ]


@pytest.mark.parametrize("kind", ["mask2former", "detr"])
def test_server_factory_scores_batched_as_per_image(kind, mask2former_dir, tiny_clip_dir, tmp_path):
    """The real factory (tiny Mask2Former or DETR, tiny CLIP): one batch scores as each image alone."""
    detector_dir = mask2former_dir if kind == "mask2former" else save_tiny_detector(tmp_path / "detr", labels=LABELS)
    options = {"detector": detector_dir, "color_model": tiny_clip_dir, "threshold": 0.0, "counting_threshold": 0.0}
    scorer = make_geneval_scorer(torch.device("cpu"), options)
    expected_kind = Mask2FormerDetector if kind == "mask2former" else TransformersDetector
    assert isinstance(scorer.detector, expected_kind)
    assert isinstance(scorer.color_classifier, ClipColorClassifier)
    metadata = _metadata()
    images = _images(len(metadata), size=40, seed=1)
    detections = scorer.detector(images)
    assert all(d.label in LABELS and len(d.box) == 4 for found in detections for d in found)
    assert all((d.mask is not None) == (kind == "mask2former") for found in detections for d in found)
    # Every object whose colour matters is classified in one call for the whole batch.
    wanted = sum(
        len(color_requests(meta, found, threshold=0.0, counting_threshold=0.0))
        for meta, found in zip(metadata, detections, strict=True)
    )
    calls: list[int] = []
    classify = scorer.color_classifier.classify
    scorer.color_classifier.classify = lambda imgs, requests: calls.append(len(requests)) or classify(imgs, requests)
    batched = scorer(images, [""] * len(metadata), metadata)
    assert calls == ([wanted] if wanted else [])
    alone = [scorer(images[i : i + 1], [""], metadata[i : i + 1]) for i in range(len(metadata))]
    assert set(batched) == {"score", *GenEvalScorer.detail_names}
    for key, column in batched.items():
        torch.testing.assert_close(column, torch.cat([scores[key] for scores in alone]), rtol=0, atol=0, equal_nan=True)
    assert batched["score"][3] == 0.0 == batched["correct"][3]  # not a label of the detector
    # Colour of each requested object: the batched CLIP pass equals one object at a time.
    requests = [(i, d) for i, found in enumerate(detections) for d in found[:3]]
    assert requests
    colours = classify(images, requests)
    assert colours == [scorer.color_classifier(images[i], d) for i, d in requests]
    assert set(colours) <= set(GENEVAL_COLORS)


def test_bad_metadata_is_rejected_before_detection():
    def detector(images):
        raise AssertionError("the detector must not run on bad metadata")

    scorer = GenEvalScorer(detector)
    from flow_grpo.reward_server.server import ScorerInputError

    with pytest.raises(ScorerInputError, match="'include'"):
        scorer(_images(1), [""], [{"tag": "single_object"}])
