"""GenEval detectors: what :class:`flow_grpo.reward_server.geneval.GenEvalScorer` sees in an image.

A detector maps images ``(N, 3, H, W)`` in [0, 1] to one list of :class:`Detection` per image.
:func:`load_detector` reads the checkpoint's config and builds a :class:`Mask2FormerDetector`
(instance segmentation: boxes, scores and masks) or a :class:`TransformersDetector` (any
transformers object detector such as DETR: boxes only). transformers is imported only when a
detector is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger

__all__ = ["Detection", "Detector", "Mask2FormerDetector", "TransformersDetector", "load_detector"]

logger = get_logger(__name__)


@dataclass(frozen=True)
class Detection:
    """One detected object: class name, confidence, box ``(x0, y0, x1, y1)`` in pixels, optional mask.

    ``mask`` is a bool ``(H, W)`` tensor over the whole image (``None`` for box-only detectors).
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)


Detector = Callable[[torch.Tensor], list[list[Detection]]]
"""``detector(images (N, 3, H, W) in [0, 1]) -> N lists of detections``."""


class _TransformersModel:
    """A transformers vision model and its image processor, loaded on ``device`` in ``dtype`` (eval mode)."""

    def __init__(self, model_class: Any, model: str, device: torch.device, dtype: torch.dtype, min_score: float) -> None:
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model)
        self.model = model_class.from_pretrained(model).to(device=device, dtype=dtype).eval()
        self.device, self.dtype, self.min_score = torch.device(device), dtype, min_score
        self.labels = {int(k): str(v).lower() for k, v in self.model.config.id2label.items()}

    def _inputs(self, images: torch.Tensor) -> Any:
        """The processor's model inputs on the device for float ``(N, 3, H, W)`` in [0, 1] (as rounded, clamped uint8)."""
        images = images.detach().to(self.device, non_blocking=True)
        pixels = images.float().mul(255.0).nan_to_num_(0.0).round_().clamp_(0, 255).to(torch.uint8)
        return self.processor(images=pixels, return_tensors="pt", device=self.device).to(self.device)


class TransformersDetector(_TransformersModel):
    """A box-only object detector from transformers (``AutoModelForObjectDetection``, e.g. DETR on COCO)."""

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, min_score: float) -> None:
        from transformers import AutoModelForObjectDetection

        super().__init__(AutoModelForObjectDetection, model, device, dtype, min_score)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        """``(N, 3, H, W)`` in [0, 1] -> N lists of detections above ``min_score`` (no masks)."""
        inputs = self._inputs(images)
        inputs = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        outputs = self.model(**inputs)
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        results = self.processor.post_process_object_detection(outputs, threshold=self.min_score, target_sizes=sizes)
        return [
            [
                Detection(self.labels.get(int(label), str(int(label))), float(score), tuple(float(v) for v in box))
                for score, label, box in zip(
                    result["scores"].tolist(), result["labels"].tolist(), result["boxes"].float().tolist(), strict=True
                )
            ]
            for result in results
        ]


class Mask2FormerDetector(_TransformersModel):
    """A transformers Mask2Former instance-segmentation model (COCO): boxes, scores and masks.

    Post-processing is ``Mask2FormerImageProcessor.post_process_instance_segmentation`` with
    ``return_binary_maps=True`` (masks may overlap), done for the whole batch on the device; a box
    is the extent of its mask, ``(x_min, y_min, x_max + 1, y_max + 1)``.
    """

    # post_process_instance_segmentation first resizes the mask logits to this size.
    MASK_SIZE = (384, 384)

    def __init__(self, model: str, device: torch.device, dtype: torch.dtype, min_score: float) -> None:
        from transformers import Mask2FormerForUniversalSegmentation

        super().__init__(Mask2FormerForUniversalSegmentation, model, device, dtype, min_score)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        """``(N, 3, H, W)`` in [0, 1] -> N lists of detections above ``min_score``, with full-image masks."""
        inputs = self._inputs(images)
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.dtype), pixel_mask=inputs.get("pixel_mask"))
        return self.postprocess(outputs.class_queries_logits, outputs.masks_queries_logits, tuple(images.shape[-2:]))

    def postprocess(
        self, class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]
    ) -> list[list[Detection]]:
        """Detections from ``class_logits (N, Q, C + 1)`` and ``mask_logits (N, Q, h, w)`` at image ``size``."""
        num_queries, num_classes = class_logits.shape[1], class_logits.shape[2] - 1
        mask_logits = F.interpolate(mask_logits.float(), size=self.MASK_SIZE, mode="bilinear", align_corners=False)
        probs = class_logits.float().softmax(-1)[..., :-1].flatten(1)  # (N, Q * C)
        class_scores, top = probs.topk(num_queries, dim=1)  # (N, Q)
        labels, queries = top % num_classes, torch.div(top, num_classes, rounding_mode="floor")
        logits = torch.gather(mask_logits, 1, queries[..., None, None].expand(-1, -1, *self.MASK_SIZE))
        binary = (logits > 0).float()
        mask_scores = (logits.sigmoid() * binary).flatten(2).sum(-1) / (binary.flatten(2).sum(-1) + 1e-6)
        scores = class_scores * mask_scores  # (N, Q)
        masks = F.interpolate(binary, size=size, mode="nearest") > 0.5  # (N, Q, H, W)
        rows, cols = masks.any(dim=3), masks.any(dim=2)  # (N, Q, H), (N, Q, W)
        keep = rows.any(-1) & (scores >= self.min_score)
        positions_y = torch.arange(size[0], device=masks.device)
        positions_x = torch.arange(size[1], device=masks.device)
        y0 = torch.where(rows, positions_y, size[0]).amin(-1)
        y1 = torch.where(rows, positions_y, -1).amax(-1) + 1
        x0 = torch.where(cols, positions_x, size[1]).amin(-1)
        x1 = torch.where(cols, positions_x, -1).amax(-1) + 1
        boxes = torch.stack([x0, y0, x1, y1], dim=-1).tolist()
        scores_list, labels_list, keep_list = scores.tolist(), labels.tolist(), keep.tolist()
        results = []
        for image in range(masks.shape[0]):
            results.append(
                [
                    Detection(
                        self.labels.get(labels_list[image][q], str(labels_list[image][q])),
                        round(scores_list[image][q], 6),
                        tuple(float(v) for v in boxes[image][q]),
                        masks[image, q],
                    )
                    for q in range(num_queries)
                    if keep_list[image][q]
                ]
            )
        return results


def load_detector(model: str, device: torch.device, dtype: torch.dtype, min_score: float) -> Detector:
    """A :class:`Mask2FormerDetector` when ``model``'s config is a Mask2Former, else a :class:`TransformersDetector`."""
    from transformers import AutoConfig

    try:
        model_type = AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as error:
        raise OSError(
            f"Could not load the GenEval detector config from {model!r} ({error}); set the server option "
            "geneval.detector to a Mask2Former instance-segmentation or DETR-style checkpoint (hub id or directory)."
        ) from error
    kind = Mask2FormerDetector if model_type == "mask2former" else TransformersDetector
    detector = kind(model, device, dtype, min_score)
    logger.info(f"Loaded GenEval detector {model!r} ({kind.__name__}, {dtype}) on {device}", main_process_only=False)
    return detector
