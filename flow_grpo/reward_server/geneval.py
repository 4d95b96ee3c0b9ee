"""GenEval strict accuracy, a server-side scorer (see :mod:`flow_grpo.reward_server.server`).

A GenEval prompt carries its requirements in its metadata (``*_metadata.jsonl`` lines)::

    {"tag": "position", "include": [{"class": "dog", "count": 1},
                                    {"class": "cat", "count": 1, "position": ["left of", 0]}],
     "exclude": [{"class": "dog", "count": 2}]}

An image is correct (score 1) when every ``include`` entry is met and no ``exclude`` entry is hit:

- ``include``: at least ``count`` detections of ``class`` above the confidence threshold (a higher
  threshold for the ``counting`` tag); with ``color``, each of the ``count`` most confident ones has
  that colour; with ``position = [relation, i]``, each of them stands in ``relation`` ("left of",
  "right of", "above", "below") to each object matched by include entry ``i``.
- ``exclude``: fewer than ``count`` detections of ``class``.

Relations follow GenEval's rule: the offset between box centres, shrunk on each axis by
``position_margin`` times the sum of the two boxes' sizes, must point mostly along the relation's
direction. Colours are CLIP zero-shot labels of the box crop ("a photo of a {color} {class}").

:func:`evaluate_geneval` is pure and works on any detector's output. :func:`make_geneval_scorer`
builds a scorer with a transformers object detector (COCO classes, e.g. DETR) and a transformers
CLIP colour classifier; both are imported and loaded only then. The published GenEval numbers use
a Mask2Former detector from mmdetection, so absolute accuracies from another detector differ.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flow_grpo.rewards.options import parse_options, resolve_dtype
from flow_grpo.reward_server.server import ScorerInputError

__all__ = [
    "GENEVAL_COLORS",
    "GENEVAL_SERVER_DEFAULTS",
    "ClipColorClassifier",
    "Detection",
    "GenEvalScorer",
    "TransformersDetector",
    "evaluate_geneval",
    "make_geneval_scorer",
    "relative_position",
]

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""The colours GenEval prompts use."""

GENEVAL_SERVER_DEFAULTS: dict[str, Any] = {
    "detector": "facebook/detr-resnet-50",  # transformers object-detection model with COCO labels
    "color_model": "openai/clip-vit-large-patch14",  # CLIP model for colour classification
    "threshold": 0.3,  # detection confidence threshold
    "counting_threshold": 0.9,  # threshold for prompts tagged "counting"
    "position_margin": 0.1,  # fraction of the summed box sizes ignored when judging relations
    "dtype": "auto",  # dtype of the detector and the colour model
}
"""Server options of the ``geneval`` scorer (``--options '{"geneval": {...}}'``)."""


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, confidence and box ``(x0, y0, x1, y1)`` in pixels."""

    label: str
    score: float
    box: tuple[float, float, float, float]


ColorOf = Callable[[Detection], str]
"""Returns the colour name of a detected object (the scorer binds it to the image)."""


def relative_position(box: Sequence[float], target: Sequence[float], margin: float = 0.1) -> set[str]:
    """Relations of ``box`` to ``target`` among "left of", "right of", "above", "below".

    Args:
        box, target: ``(x0, y0, x1, y1)`` in pixels (y grows downwards).
        margin: per axis, ``margin * (size_box + size_target)`` of the centre offset is ignored.

    Returns:
        The relations whose direction the shrunk offset points along (its component on that axis is
        more than half its length); empty when the shrunk offset is zero.
    """
    center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    target_center = ((target[0] + target[2]) / 2, (target[1] + target[3]) / 2)
    sizes = (box[2] - box[0] + target[2] - target[0], box[3] - box[1] + target[3] - target[1])
    offset = [center[axis] - target_center[axis] for axis in (0, 1)]
    shrunk = [max(abs(offset[axis]) - margin * sizes[axis], 0.0) * (1 if offset[axis] > 0 else -1) for axis in (0, 1)]
    if abs(shrunk[0]) < 1e-3 and abs(shrunk[1]) < 1e-3:
        return set()
    # Direction of the shrunk offset, scaled by the raw offset's length as GenEval does.
    length = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = shrunk[0] / length, shrunk[1] / length
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def evaluate_geneval(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    color_of: ColorOf | None = None,
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_margin: float = 0.1,
) -> tuple[bool, str]:
    """Strict GenEval correctness of one image.

    Args:
        metadata: the prompt's metadata with ``include`` (and optionally ``exclude``, ``tag``).
        detections: every detection in the image (any confidence).
        color_of: colour classifier, needed when an include entry has ``color``.

    Returns:
        ``(correct, reason)``; ``reason`` names the first unmet requirement.

    Raises:
        ScorerInputError: when the metadata is not GenEval metadata.
    """
    include = metadata.get("include")
    exclude = metadata.get("exclude", [])
    if not isinstance(include, list) or not include or not isinstance(exclude, list):
        raise ScorerInputError(
            "GenEval needs the prompt metadata 'include' (a non-empty list) and optionally 'exclude'; "
            f"got keys {sorted(metadata)}. Train on the GenEval *_metadata.jsonl prompts."
        )
    for entry in [*include, *exclude]:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("class"), str):
            raise ScorerInputError(f"Every GenEval include/exclude entry needs a 'class', got {entry!r}.")
    cutoff = counting_threshold if metadata.get("tag") == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        if detection.score >= cutoff:
            by_class.setdefault(detection.label.lower(), []).append(detection)

    matched: list[list[Detection]] = []
    for entry in include:
        name, count = entry["class"].lower(), int(entry.get("count", 1))
        found = by_class.get(name, [])
        if len(found) < count:
            return False, f"expected {count} {name}, found {len(found)}"
        matched.append(found[:count])
    for entry, found in zip(include, matched, strict=True):
        if "color" in entry:
            if color_of is None:
                raise ScorerInputError("The prompt asks for colours but the scorer has no colour classifier.")
            colors = [color_of(d) for d in found]
            if any(color != entry["color"] for color in colors):
                return False, f"expected {entry['color']} {entry['class']}, found {colors}"
    for entry, found in zip(include, matched, strict=True):
        if "position" in entry:
            relation, target_index = entry["position"]
            if not 0 <= int(target_index) < len(matched):
                raise ScorerInputError(f"Position target {target_index} is not an include entry index.")
            for detection in found:
                for target in matched[int(target_index)]:
                    if relation not in relative_position(detection.box, target.box, position_margin):
                        return False, f"expected {entry['class']} {relation} {include[int(target_index)]['class']}"
    for entry in exclude:
        name, count = entry["class"].lower(), int(entry.get("count", 1))
        if len(by_class.get(name, [])) >= count:
            return False, f"expected fewer than {count} {name}"
    return True, "correct"


Detector = Callable[[torch.Tensor], list[list[Detection]]]
"""``detector(images (N, 3, H, W) in [0, 1]) -> N lists of detections``."""


class GenEvalScorer:
    """``scorer(images, prompts, metadata) -> float32 (N,)`` of 0/1 strict GenEval accuracy."""

    def __init__(
        self,
        detector: Detector,
        color_classifier: Callable[[torch.Tensor, Detection], str] | None = None,
        *,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        position_margin: float = 0.1,
    ) -> None:
        """Args: ``color_classifier(image (3, H, W), detection) -> colour``; thresholds as in the module doc."""
        self.detector = detector
        self.color_classifier = color_classifier
        self.threshold = threshold
        self.counting_threshold = counting_threshold
        self.position_margin = position_margin

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> float32 ``(N,)`` CPU with 1.0 for correct images."""
        detections = self.detector(images)
        if len(detections) != len(metadata):
            raise RuntimeError(f"The detector returned {len(detections)} results for {len(metadata)} images.")
        scores = []
        for image, meta, found in zip(images, metadata, detections, strict=True):
            color_of = None if self.color_classifier is None else functools.partial(self.color_classifier, image)
            try:
                correct, _ = evaluate_geneval(
                    meta,
                    found,
                    color_of,
                    threshold=self.threshold,
                    counting_threshold=self.counting_threshold,
                    position_margin=self.position_margin,
                )
            except ScorerInputError:
                raise
            except (KeyError, TypeError, ValueError) as error:
                raise ScorerInputError(f"Malformed GenEval metadata {meta!r}: {error!r}") from None
            scores.append(float(correct))
        return torch.tensor(scores, dtype=torch.float32)


class TransformersDetector:
    """An object detector from transformers (``AutoModelForObjectDetection``, e.g. DETR on COCO)."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, min_score: float) -> None:
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        self.processor = AutoImageProcessor.from_pretrained(model)
        self.model = AutoModelForObjectDetection.from_pretrained(model).to(device=device, dtype=dtype).eval()
        self.device, self.dtype, self.min_score = device, dtype, min_score
        self.labels = {int(k): str(v).lower() for k, v in self.model.config.id2label.items()}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        """``(N, 3, H, W)`` in [0, 1] -> N lists of detections above ``min_score``."""
        from flow_grpo.rewards.remote import images_to_uint8

        pixels = list(images_to_uint8(images))
        inputs = self.processor(images=pixels, return_tensors="pt").to(self.device)
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        outputs = self.model(**inputs)
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        results = self.processor.post_process_object_detection(outputs, threshold=self.min_score, target_sizes=sizes)
        return [
            [
                Detection(self.labels.get(int(label), str(int(label))), float(score), tuple(float(v) for v in box))
                for score, label, box in zip(result["scores"], result["labels"], result["boxes"], strict=True)
            ]
            for result in results
        ]


class ClipColorClassifier:
    """Zero-shot colour of a detected object: CLIP on the box crop against "a photo of a {color} {class}"."""

    def __init__(self, model: str, device: torch.device, dtype_name: str) -> None:
        from flow_grpo.rewards.clip_models import ClipEncoder

        try:
            self.encoder = ClipEncoder.load("geneval", model, "", device, dtype_name, batch_size=64)
        except OSError as error:
            raise OSError(
                f"Could not load the GenEval colour model {model!r} ({error}); set the server option "
                "geneval.color_model to a CLIP hub id or directory, or to '' to skip colour checks."
            ) from error
        self._text_cache: dict[str, torch.Tensor] = {}

    def __call__(self, image: torch.Tensor, detection: Detection) -> str:
        """``image (3, H, W)`` in [0, 1] and one detection -> colour name."""
        height, width = image.shape[-2:]
        x0, y0, x1, y1 = detection.box
        x0, y0 = max(int(x0), 0), max(int(y0), 0)
        x1, y1 = min(max(round(x1), x0 + 1), width), min(max(round(y1), y0 + 1), height)
        crop = image[:, y0:y1, x0:x1].unsqueeze(0)
        if detection.label not in self._text_cache:
            prompts = [f"a photo of a {color} {detection.label}" for color in GENEVAL_COLORS]
            self._text_cache[detection.label] = self.encoder.text_embeddings(prompts)
        similarity = self.encoder.image_embeddings(crop) @ self._text_cache[detection.label].T
        return GENEVAL_COLORS[int(similarity.argmax())]


def make_geneval_scorer(device: torch.device, options: Mapping[str, Any]) -> GenEvalScorer:
    """Server factory of ``geneval``: a transformers detector and CLIP colour classifier."""
    opts = parse_options("geneval", options, GENEVAL_SERVER_DEFAULTS, prefix="reward server --options")
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "The geneval scorer needs transformers (and timm for DETR) in the server's environment: "
            "pip install transformers timm"
        ) from error
    dtype = resolve_dtype(opts["dtype"], device, "geneval")
    detector = TransformersDetector(opts["detector"], device, dtype, min(opts["threshold"], opts["counting_threshold"]))
    colors = ClipColorClassifier(opts["color_model"], device, opts["dtype"]) if opts["color_model"] else None
    return GenEvalScorer(
        detector,
        colors,
        threshold=opts["threshold"],
        counting_threshold=opts["counting_threshold"],
        position_margin=opts["position_margin"],
    )
