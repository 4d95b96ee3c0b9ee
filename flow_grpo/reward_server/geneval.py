"""GenEval, a server-side scorer (see :mod:`flow_grpo.reward_server.server`).

:class:`GenEvalScorer` detects the objects of each image, classifies the colours that matter and
judges them by the rules of :mod:`flow_grpo.reward_server.geneval_rules`. Its score is the public
TP-GRPO / Flow-GRPO training score (:func:`geneval_partial`, a partial credit in [.., 1]); beside it
it returns the details of :data:`~flow_grpo.rewards.score_details.GENEVAL_DETAILS`: the strict
correctness of that code (``strict``), the official GenEval correctness (``correct``,
:func:`evaluate_geneval`) and both per task (``correct_<tag>``, ``strict_<tag>``; NaN on images of
other tasks). The client rewards ``geneval``, ``geneval_strict`` and ``geneval_correct`` train on
the score, the strict or the official correctness.

Colours are CLIP zero-shot labels ("a photo of a {color} {class}") of the object cut out by its mask
over a grey #999999 background (the crop of its box with the pixels outside the mask set to
(153, 153, 153)); detectors without masks (DETR) give plain box crops.

:func:`make_geneval_scorer` builds a scorer with a transformers detector (:mod:`flow_grpo.reward_server.detectors`) and a
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
from flow_grpo.reward_server.geneval_rules import (
    ColorOf,
    check_metadata,
    color_requests,
    evaluate_geneval,
    geneval_partial,
    relative_position,
)
from flow_grpo.rewards.options import parse_options, resolve_dtype
from flow_grpo.rewards.score_details import GENEVAL_DETAILS, GENEVAL_TASKS, SCORE_KEY
from flow_grpo.reward_server.server import ScorerInputError

__all__ = [
    "ColorOf",
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
    "geneval_partial",
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


ColorClassifier = Callable[[torch.Tensor, Detection], str]
"""``color_classifier(image (3, H, W) in [0, 1], detection) -> colour name``."""


class GenEvalScorer:
    """``scorer(images, prompts, metadata) -> {"score": (N,), detail: (N,), ...}`` float32 on the CPU.

    ``score`` is the public code's partial score (:func:`geneval_partial`); the details are
    :data:`~flow_grpo.rewards.score_details.GENEVAL_DETAILS` (0/1, per task NaN off-task).
    ``color_classifier`` is a :data:`ColorClassifier`; when it also has a batched
    ``classify(images, requests)`` method (as :class:`ClipColorClassifier`), every object of the batch
    whose colour matters is classified in one call, else one call per object.
    """

    detail_names = GENEVAL_DETAILS

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
    ) -> dict[str, torch.Tensor]:
        """``(N, 3, H, W)`` in [0, 1] -> ``{"score": (N,), detail: (N,)}`` float32 CPU."""
        try:
            for meta in metadata:
                check_metadata(meta)
        except (AttributeError, TypeError) as error:
            raise ScorerInputError(f"GenEval metadata must be JSON objects: {error!r}") from None
        detections = self.detector(images)
        if len(detections) != len(metadata):
            raise RuntimeError(f"The detector returned {len(detections)} results for {len(metadata)} images.")
        colors = self._colors(images, metadata, detections)
        rows = []
        for index, (meta, found) in enumerate(zip(metadata, detections, strict=True)):
            color_of = None if self.color_classifier is None else lambda d, i=index: colors[(i, id(d))]
            rows.append(self._judge(meta, found, color_of))
        return {key: torch.tensor([row[key] for row in rows], dtype=torch.float32) for key in (SCORE_KEY, *GENEVAL_DETAILS)}

    def _judge(self, meta: Mapping[str, Any], found: Sequence[Detection], color_of: ColorOf | None) -> dict[str, float]:
        """Score and details of one image (see :meth:`__call__`)."""
        settings = dict(
            threshold=self.threshold,
            counting_threshold=self.counting_threshold,
            position_margin=self.position_margin,
            max_objects=self.max_objects,
        )
        try:
            score, strict = geneval_partial(meta, found, color_of, **settings)
            correct, _ = evaluate_geneval(meta, found, color_of, **settings)
        except ScorerInputError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise ScorerInputError(f"Malformed GenEval metadata {meta!r}: {error!r}") from None
        row = {SCORE_KEY: score, "strict": float(strict), "correct": float(correct)}
        for task in GENEVAL_TASKS:
            on_task = meta.get("tag") == task
            row[f"correct_{task}"] = float(correct) if on_task else float("nan")
            row[f"strict_{task}"] = float(strict) if on_task else float("nan")
        return row

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
