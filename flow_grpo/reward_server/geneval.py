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
direction. At most ``max_objects`` (16) detections per class are kept, the most confident first.
Colours are CLIP zero-shot labels ("a photo of a {color} {class}") of the object cut out by its mask
over a grey #999999 background (the crop of its box with the pixels outside the mask set to
(153, 153, 153)); detectors without masks (DETR) give plain box crops.

:func:`evaluate_geneval` is pure and works on any detector's output. :func:`make_geneval_scorer`
builds a scorer with a transformers detector (:mod:`flow_grpo.reward_server.detectors`) and a
transformers CLIP colour classifier; both are imported and loaded only then. The detector kind is read from the checkpoint's config: a
Mask2Former instance-segmentation model (``model_type == "mask2former"``, the default
``facebook/mask2former-swin-small-coco-instance``, as the official evaluator's mmdetection
Mask2Former Swin-S) or any transformers object detector (DETR, boxes only). Both preprocess the
batch on the reward device; all colour crops of a batch go through CLIP together.

Server options (``--options '{"geneval": {...}}'``, defaults in :data:`GENEVAL_SERVER_DEFAULTS`):

- ``detector``: hub id or directory of the detector (Mask2Former or DETR-style, COCO labels).
- ``color_model``: hub id or directory of the CLIP colour model; ``""`` skips colour checks.
- ``threshold`` (0.3), ``counting_threshold`` (0.9), ``position_margin`` (0.1), ``max_objects``
  (16 per class): as the official evaluator.
- ``dtype``: dtype of both models (``"auto"``: float16 on CUDA, else float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from flow_grpo.reward_server.detectors import (
    Detection,
    Detector,
    Mask2FormerDetector,
    TransformersDetector,
    load_detector,
)
from flow_grpo.rewards.options import parse_options, resolve_dtype
from flow_grpo.reward_server.server import ScorerInputError

__all__ = [
    "GENEVAL_COLORS",
    "GENEVAL_SERVER_DEFAULTS",
    "MASK_BACKGROUND",
    "ClipColorClassifier",
    "Detection",
    "GenEvalScorer",
    "Mask2FormerDetector",
    "TransformersDetector",
    "color_crop",
    "color_requests",
    "evaluate_geneval",
    "load_detector",
    "make_geneval_scorer",
    "relative_position",
]

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""The colours GenEval prompts use."""

GENEVAL_SERVER_DEFAULTS: dict[str, Any] = {
    "detector": "facebook/mask2former-swin-small-coco-instance",  # Mask2Former or DETR-style, COCO labels
    "color_model": "openai/clip-vit-large-patch14",  # CLIP model for colour classification
    "threshold": 0.3,  # detection confidence threshold
    "counting_threshold": 0.9,  # threshold for prompts tagged "counting"
    "position_margin": 0.1,  # fraction of the summed box sizes ignored when judging relations
    "max_objects": 16,  # at most this many detections per class (the most confident)
    "dtype": "auto",  # dtype of the detector and the colour model
}
"""Server options of the ``geneval`` scorer (``--options '{"geneval": {...}}'``)."""


MASK_BACKGROUND = 153
"""Grey level (#999999) that replaces the pixels outside an object's mask before colour classification."""


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


def _objects_by_class(
    detections: Sequence[Detection], cutoff: float, max_objects: int
) -> dict[str, list[Detection]]:
    """Detections at or above ``cutoff`` per lower-cased class, most confident first, at most ``max_objects``."""
    by_class: dict[str, list[Detection]] = {}
    for detection in sorted(detections, key=lambda d: d.score, reverse=True):
        if detection.score >= cutoff:
            found = by_class.setdefault(detection.label.lower(), [])
            if len(found) < max_objects:
                found.append(detection)
    return by_class


def _check_metadata(metadata: Mapping[str, Any]) -> tuple[list[Any], list[Any]]:
    """``(include, exclude)`` of GenEval metadata; raises :class:`ScorerInputError` on anything else."""
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
    return include, exclude


def _matched_objects(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    threshold: float,
    counting_threshold: float,
    max_objects: int,
) -> tuple[dict[str, list[Detection]], list[list[Detection]] | str]:
    """Per-class detections and, per include entry, its ``count`` most confident objects (or why not)."""
    include, _ = _check_metadata(metadata)
    cutoff = counting_threshold if metadata.get("tag") == "counting" else threshold
    by_class = _objects_by_class(detections, cutoff, max_objects)
    matched: list[list[Detection]] = []
    for entry in include:
        name, count = entry["class"].lower(), int(entry.get("count", 1))
        found = by_class.get(name, [])
        if len(found) < count:
            return by_class, f"expected {count} {name}, found {len(found)}"
        matched.append(found[:count])
    return by_class, matched


def color_requests(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
) -> list[Detection]:
    """The detections whose colour :func:`evaluate_geneval` may ask for (empty when a count is unmet)."""
    include, _ = _check_metadata(metadata)
    _, matched = _matched_objects(metadata, detections, threshold, counting_threshold, max_objects)
    if isinstance(matched, str):
        return []
    return [d for entry, found in zip(include, matched, strict=True) if "color" in entry for d in found]


def evaluate_geneval(
    metadata: Mapping[str, Any],
    detections: Sequence[Detection],
    color_of: ColorOf | None = None,
    *,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    position_margin: float = 0.1,
    max_objects: int = 16,
) -> tuple[bool, str]:
    """Strict GenEval correctness of one image.

    Args:
        metadata: the prompt's metadata with ``include`` (and optionally ``exclude``, ``tag``).
        detections: every detection in the image (any confidence).
        color_of: colour classifier, needed when an include entry has ``color``.
        max_objects: at most this many detections per class count (the most confident).

    Returns:
        ``(correct, reason)``; ``reason`` names the first unmet requirement.

    Raises:
        ScorerInputError: when the metadata is not GenEval metadata.
    """
    include, exclude = _check_metadata(metadata)
    by_class, matched = _matched_objects(metadata, detections, threshold, counting_threshold, max_objects)
    if isinstance(matched, str):
        return False, matched
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


ColorClassifier = Callable[[torch.Tensor, Detection], str]
"""``color_classifier(image (3, H, W) in [0, 1], detection) -> colour name``."""


class GenEvalScorer:
    """``scorer(images, prompts, metadata) -> float32 (N,)`` of 0/1 strict GenEval accuracy.

    ``color_classifier`` is a :data:`ColorClassifier`; when it also has a batched
    ``classify(images, requests)`` method (as :class:`ClipColorClassifier`), every object of the batch
    whose colour matters is classified in one call, else one call per object.
    """

    def __init__(
        self,
        detector: Detector,
        color_classifier: ColorClassifier | None = None,
        *,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        position_margin: float = 0.1,
        max_objects: int = 16,
    ) -> None:
        """Args: a :data:`Detector`, a :data:`ColorClassifier`; thresholds as in the module doc."""
        if max_objects < 1:
            raise ValueError(f"geneval max_objects must be at least 1, got {max_objects}.")
        self.detector = detector
        self.color_classifier = color_classifier
        self.threshold = threshold
        self.counting_threshold = counting_threshold
        self.position_margin = position_margin
        self.max_objects = max_objects

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> float32 ``(N,)`` CPU with 1.0 for correct images."""
        try:
            for meta in metadata:
                _check_metadata(meta)
        except (AttributeError, TypeError) as error:
            raise ScorerInputError(f"GenEval metadata must be JSON objects: {error!r}") from None
        detections = self.detector(images)
        if len(detections) != len(metadata):
            raise RuntimeError(f"The detector returned {len(detections)} results for {len(metadata)} images.")
        colors = self._colors(images, metadata, detections)
        scores = []
        for index, (meta, found) in enumerate(zip(metadata, detections, strict=True)):
            try:
                correct, _ = evaluate_geneval(
                    meta,
                    found,
                    None if self.color_classifier is None else lambda d, i=index: colors[(i, id(d))],
                    threshold=self.threshold,
                    counting_threshold=self.counting_threshold,
                    position_margin=self.position_margin,
                    max_objects=self.max_objects,
                )
            except ScorerInputError:
                raise
            except (KeyError, TypeError, ValueError) as error:
                raise ScorerInputError(f"Malformed GenEval metadata {meta!r}: {error!r}") from None
            scores.append(float(correct))
        return torch.tensor(scores, dtype=torch.float32)

    def _colors(
        self,
        images: torch.Tensor,
        metadata: Sequence[Mapping[str, Any]],
        detections: Sequence[Sequence[Detection]],
    ) -> dict[tuple[int, int], str]:
        """Colour of every object whose colour the metadata may ask for, keyed ``(image, id(detection))``."""
        if self.color_classifier is None:
            return {}
        requests: list[tuple[int, Detection]] = []
        for index, (meta, found) in enumerate(zip(metadata, detections, strict=True)):
            try:
                wanted = color_requests(
                    meta,
                    found,
                    threshold=self.threshold,
                    counting_threshold=self.counting_threshold,
                    max_objects=self.max_objects,
                )
            except (KeyError, TypeError, ValueError) as error:
                raise ScorerInputError(f"Malformed GenEval metadata {meta!r}: {error!r}") from None
            requests.extend((index, detection) for detection in wanted)
        if not requests:
            return {}
        classify = getattr(self.color_classifier, "classify", None)
        if classify is not None:
            names = classify(images, requests)
        else:
            names = [self.color_classifier(images[index], detection) for index, detection in requests]
        return {(index, id(detection)): name for (index, detection), name in zip(requests, names, strict=True)}


def color_crop(image: torch.Tensor, detection: Detection) -> torch.Tensor:
    """The pixels colour is judged on: ``image (3, H, W)`` -> the box crop ``(3, h, w)``.

    With a mask, pixels of the crop outside the mask are set to grey :data:`MASK_BACKGROUND`/255.
    The box is floored at its top-left and rounded at its bottom-right, at least one pixel wide.
    """
    height, width = image.shape[-2:]
    x0, y0, x1, y1 = detection.box
    x0, y0 = min(max(int(x0), 0), width - 1), min(max(int(y0), 0), height - 1)
    x1, y1 = min(max(round(x1), x0 + 1), width), min(max(round(y1), y0 + 1), height)
    crop = image[:, y0:y1, x0:x1]
    if detection.mask is None:
        return crop
    mask = detection.mask[y0:y1, x0:x1].to(crop.device)
    return torch.where(mask, crop, torch.full_like(crop, MASK_BACKGROUND / 255.0))


class ClipColorClassifier:
    """Zero-shot colour of a detected object: CLIP on its (masked) crop against "a photo of a {color} {class}"."""

    def __init__(self, model: str, device: torch.device, dtype_name: str, batch_size: int = 256) -> None:
        from flow_grpo.rewards.clip_models import ClipEncoder

        try:
            self.encoder = ClipEncoder.load("geneval", model, "", device, dtype_name, batch_size=batch_size)
        except OSError as error:
            raise OSError(
                f"Could not load the GenEval colour model {model!r} ({error}); set the server option "
                "geneval.color_model to a CLIP hub id or directory, or to '' to skip colour checks."
            ) from error
        preprocess = self.encoder.preprocess
        if preprocess.output_size is None:
            raise ValueError(
                f"The CLIP processor of {model!r} gives images of varying size (no centre crop or fixed size); "
                "the GenEval colour model needs one output size."
            )
        # Resize and crop only (values stay k/255), so that crops of any size stack into one batch.
        self.geometry = dataclasses.replace(preprocess, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        self._text_cache: dict[str, torch.Tensor] = {}

    def _text(self, label: str) -> torch.Tensor:
        """Embeddings ``(len(GENEVAL_COLORS), D)`` of the colour prompts of ``label`` (computed once)."""
        if label not in self._text_cache:
            prompts = [f"a photo of a {color} {label}" for color in GENEVAL_COLORS]
            self._text_cache[label] = self.encoder.text_embeddings(prompts)
        return self._text_cache[label]

    @torch.no_grad()
    def classify(self, images: torch.Tensor, requests: Sequence[tuple[int, Detection]]) -> list[str]:
        """Colours of ``(image index, detection)`` requests on ``images (N, 3, H, W)``, one CLIP pass."""
        if not requests:
            return []
        images = images.to(self.encoder.device, non_blocking=True)
        crops = [self.geometry(color_crop(images[index], detection).unsqueeze(0)) for index, detection in requests]
        embeddings = self.encoder.image_embeddings(torch.cat(crops))  # (R, D)
        texts = torch.stack([self._text(detection.label) for _, detection in requests])  # (R, colours, D)
        similarity = torch.einsum("rd,rcd->rc", embeddings, texts)
        return [GENEVAL_COLORS[i] for i in similarity.argmax(dim=1).tolist()]

    def __call__(self, image: torch.Tensor, detection: Detection) -> str:
        """``image (3, H, W)`` in [0, 1] and one detection -> colour name."""
        return self.classify(image.unsqueeze(0), [(0, detection)])[0]


def make_geneval_scorer(device: torch.device, options: Mapping[str, Any]) -> GenEvalScorer:
    """Server factory of ``geneval``: a Mask2Former (or DETR-style) detector and a CLIP colour classifier."""
    opts = parse_options("geneval", options, GENEVAL_SERVER_DEFAULTS, prefix="reward server --options")
    if opts["max_objects"] < 1:
        raise ValueError(f"reward server --options geneval.max_objects must be at least 1, got {opts['max_objects']}.")
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "The geneval scorer needs transformers (and scipy for Mask2Former) in the server's environment: "
            "pip install transformers scipy"
        ) from error
    dtype = resolve_dtype(opts["dtype"], device, "geneval")
    detector = load_detector(opts["detector"], device, dtype, min(opts["threshold"], opts["counting_threshold"]))
    colors = ClipColorClassifier(opts["color_model"], device, opts["dtype"]) if opts["color_model"] else None
    return GenEvalScorer(
        detector,
        colors,
        threshold=opts["threshold"],
        counting_threshold=opts["counting_threshold"],
        position_margin=opts["position_margin"],
        max_objects=opts["max_objects"],
    )
