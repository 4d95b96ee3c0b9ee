"""OCR accuracy, server-side scorers (see :mod:`flow_grpo.reward_server.server`).

An OCR engine reads an image into pieces of text with their confidences. Two rules score them:

- ``ocr`` (:func:`reference_accuracy`), the rule of the public Flow-GRPO scorer (``flow_grpo/ocr.py``
  of YunzeTong/TurningPoint-GRPO), which the TP-GRPO OCR runs follow. The target is the text
  between the first pair of straight double quotes (the whole prompt when it has none); the
  recognised text is every piece with confidence > 0 (or none given), concatenated. Both lose their
  spaces and are lower-cased; the distance is 0 when the target is a substring of the recognised
  text, else their Levenshtein distance, at most the normalised target's length; and::

      accuracy = 1 - distance / len(target as written, spaces included)

  so a perfect rendering scores 1 and an image without text ``spaces / len(target)`` (0.0909 for
  "Hello World"); an empty target scores 1.
- ``ocr_exact`` (:func:`exact_accuracy`), a whole-text rule: the target is the metadata ``"text"``
  when present, else every quoted part (straight or curly quotes) joined with a space; every piece is
  read whatever its confidence; the text must match as a whole (no credit for a repeated target) and
  ``accuracy = 1 - min(distance, len(t)) / len(t)`` on the normalised target ``t``, in [0, 1].

The OCR engine (PaddleOCR or EasyOCR) is imported only when the scorer is built; tests and other
engines plug in any ``engine(image) -> [(text, confidence), ...]``. A batch is read with the
engine's batch API where it has one (PaddleOCR 3.x ``predict`` on a list, EasyOCR
``readtext_batched``), otherwise by ``num_workers`` threads; the scores are those of reading each
image alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from flow_grpo.rewards.options import parse_options
from flow_grpo.reward_server.server import ScorerInputError

__all__ = [
    "OCR_ENGINES",
    "OCR_RULES",
    "OCR_SERVER_DEFAULTS",
    "OcrScorer",
    "Reading",
    "edit_distance",
    "exact_accuracy",
    "exact_target",
    "make_ocr_exact_scorer",
    "make_ocr_scorer",
    "normalise_text",
    "reference_accuracy",
    "reference_target",
]

OCR_SERVER_DEFAULTS: dict[str, Any] = {
    "engine": "paddleocr",  # "paddleocr" or "easyocr"
    "lang": "en",  # engine language code
    "use_gpu": True,  # let the engine use the GPU when the server's device is CUDA
    "num_workers": 4,  # threads reading images when the engine has no batch API
}
"""Server options of the ``ocr`` scorer (``--options '{"ocr": {...}}'``)."""

OCR_ENGINES = ("paddleocr", "easyocr")
"""Engines :func:`make_ocr_scorer` can load."""

OCR_RULES = ("reference", "exact")
"""Rules of :class:`OcrScorer`: the public Flow-GRPO rule (scorer ``ocr``) and the whole-text rule (``ocr_exact``)."""

# Straight, curly and typographic double quotes.
_QUOTED = re.compile(r"[\"\u201c\u201d\u201e]([^\"\u201c\u201d\u201e]+)[\"\u201c\u201d\u201e]")

Reading = list[tuple[str, float | None]]
"""What an engine read in one image: ``(text, confidence)`` per piece, in reading order (None: no confidence)."""

OcrEngine = Callable[[np.ndarray], Reading]
"""``engine(uint8 (H, W, 3) RGB) -> the pieces of text it recognised``."""

OcrBatchEngine = Callable[[list[np.ndarray]], list[Reading]]
"""``batch_engine([uint8 (H, W, 3) RGB] * N) -> N readings``, equal to ``engine`` per image."""


def reference_target(prompt: str) -> str:
    """The public rule's target: the text after the first straight double quote, up to the next one.

    The whole prompt when it has no straight double quote; curly quotes are ordinary characters.
    """
    return prompt.split('"')[1] if '"' in prompt else prompt


def reference_accuracy(reading: Reading, prompt: str) -> float:
    """The public Flow-GRPO OCR reward of one image (see the module docstring), in [0, 1]."""
    target = reference_target(prompt)
    recognised = "".join(text for text, confidence in reading if confidence is None or confidence > 0)
    recognised_norm, target_norm = recognised.replace(" ", "").lower(), target.replace(" ", "").lower()
    distance = 0 if target_norm in recognised_norm else edit_distance(recognised_norm, target_norm)
    distance = min(distance, len(target_norm))
    return 1.0 - distance / max(len(target), 1)


def exact_target(prompt: str, metadata: Mapping[str, Any]) -> str:
    """The whole-text rule's target: metadata ``"text"``, else every quoted part (see the module docstring).

    Raises:
        ScorerInputError: when neither metadata ``"text"`` nor quoted text exists.
    """
    text = metadata.get("text")
    if isinstance(text, str) and text.strip():
        return text
    quoted = [part.strip() for part in _QUOTED.findall(prompt) if part.strip()]
    if not quoted:
        raise ScorerInputError(
            f"No target text for OCR in prompt {prompt!r}: put the text in double quotes or in metadata 'text'."
        )
    return " ".join(quoted)


def normalise_text(text: str) -> str:
    """Lower case with all whitespace removed."""
    return "".join(text.lower().split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (unit-cost insertions, deletions, substitutions)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def exact_accuracy(reading: Reading, target: str) -> float:
    """The whole-text rule: ``1 - min(distance, len(t)) / len(t)`` on the normalised target ``t``, in [0, 1]."""
    recognised = " ".join(text for text, _ in reading)
    target_norm = normalise_text(target)
    if not target_norm:
        raise ScorerInputError(f"The OCR target text {target!r} is empty after removing whitespace.")
    distance = min(edit_distance(normalise_text(recognised), target_norm), len(target_norm))
    return 1.0 - distance / len(target_norm)


class OcrScorer:
    """``scorer(images, prompts, metadata) -> float32 (N,)`` OCR accuracy per image.

    Args:
        engine: reads one image.
        batch_engine: reads a list of images in one call (the engine's batch API), if it has one.
        num_workers: threads calling ``engine`` when there is no ``batch_engine`` (1 = in order, no pool).
        rule: ``"reference"`` (:func:`reference_accuracy`) or ``"exact"`` (:func:`exact_accuracy`).
    """

    def __init__(
        self,
        engine: OcrEngine,
        batch_engine: OcrBatchEngine | None = None,
        num_workers: int = 4,
        rule: str = "reference",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"ocr: num_workers must be positive, got {num_workers}.")
        if rule not in OCR_RULES:
            raise ValueError(f"Unknown OCR rule {rule!r}; choose one of {OCR_RULES}.")
        self.engine = engine
        self.batch_engine = batch_engine
        self.num_workers = int(num_workers)
        self.rule = rule
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="ocr") if self.num_workers > 1 else None

    def read(self, pixels: np.ndarray) -> list[Reading]:
        """uint8 ``(N, H, W, 3)`` -> ``N`` readings (batch API, else the worker pool)."""
        arrays = list(pixels)
        if self.batch_engine is not None:
            readings = list(self.batch_engine(arrays))
            if len(readings) != len(arrays):
                raise RuntimeError(f"The OCR batch engine returned {len(readings)} readings for {len(arrays)} images.")
            return readings
        if self._pool is None or len(arrays) == 1:
            return [self.engine(array) for array in arrays]
        return list(self._pool.map(self.engine, arrays))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> float32 ``(N,)`` CPU accuracy in [0, 1]."""
        from flow_grpo.rewards.transport import images_to_uint8

        if self.rule == "exact":
            targets = [exact_target(prompt, meta) for prompt, meta in zip(prompts, metadata, strict=True)]
            score = exact_accuracy
        else:
            targets, score = list(prompts), reference_accuracy
        readings = self.read(images_to_uint8(images))
        return torch.tensor(
            [score(reading, target) for reading, target in zip(readings, targets, strict=True)], dtype=torch.float32
        )


def _paddle_engine(lang: str, use_gpu: bool) -> tuple[OcrEngine, OcrBatchEngine | None]:
    try:
        from paddleocr import PaddleOCR
    except ImportError as error:
        raise ImportError(
            "The ocr scorer with engine 'paddleocr' needs PaddleOCR in the server's environment: "
            "pip install paddlepaddle paddleocr (or paddlepaddle-gpu), or start the server with "
            '--options \'{"ocr": {"engine": "easyocr"}}\'.'
        ) from error
    try:  # PaddleOCR 2.x
        reader = PaddleOCR(use_angle_cls=False, lang=lang, use_gpu=use_gpu, show_log=False)
    except (TypeError, ValueError):  # PaddleOCR 3.x dropped those arguments
        reader = PaddleOCR(lang=lang, use_textline_orientation=False)

    def read(image: np.ndarray) -> Reading:
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # PaddleOCR takes OpenCV (BGR) arrays
        if hasattr(reader, "predict"):
            return [piece for result in reader.predict(bgr) or [] for piece in _paddle_pieces(result)]
        # PaddleOCR 2.x: per page a list of [box, (text, confidence)].
        return [(str(line[1][0]), float(line[1][1])) for page in reader.ocr(bgr, cls=False) or [] for line in page or []]

    if not hasattr(reader, "predict"):
        return read, None

    def read_batch(images: list[np.ndarray]) -> list[Reading]:
        # PaddleOCR 3.x reads a list of images in one call, one result per image in order.
        results = list(reader.predict([np.ascontiguousarray(image[:, :, ::-1]) for image in images]) or [])
        return [_paddle_pieces(result) for result in results]

    return read, read_batch


def _paddle_pieces(result: Mapping[str, Any]) -> Reading:
    """The pieces of one PaddleOCR 3.x result: ``rec_texts`` with their ``rec_scores`` (None past the scores)."""
    texts, scores = list(result.get("rec_texts") or []), list(result.get("rec_scores") or [])
    return [(str(text), float(scores[i]) if i < len(scores) else None) for i, text in enumerate(texts)]


def _easyocr_engine(lang: str, use_gpu: bool) -> tuple[OcrEngine, OcrBatchEngine | None]:
    try:
        import easyocr
    except ImportError as error:
        raise ImportError(
            "The ocr scorer with engine 'easyocr' needs EasyOCR in the server's environment: pip install easyocr"
        ) from error
    reader = easyocr.Reader([lang], gpu=use_gpu)

    def read(image: np.ndarray) -> Reading:
        # detail=1: one (box, text, confidence) per piece.
        return [(str(text), float(confidence)) for _, text, confidence in reader.readtext(image, detail=1)]

    def read_batch(images: list[np.ndarray]) -> list[Reading]:
        # readtext_batched needs images of one size; the server batches only same-size requests.
        pages = reader.readtext_batched(images, detail=1)
        return [[(str(text), float(confidence)) for _, text, confidence in page] for page in pages]

    return read, read_batch


def make_ocr_scorer(device: torch.device, options: Mapping[str, Any]) -> OcrScorer:
    """Server factory of ``ocr`` (the public Flow-GRPO rule) with the configured engine."""
    return _make_scorer("ocr", "reference", device, options)


def make_ocr_exact_scorer(device: torch.device, options: Mapping[str, Any]) -> OcrScorer:
    """Server factory of ``ocr_exact`` (the whole-text rule) with the configured engine."""
    return _make_scorer("ocr_exact", "exact", device, options)


def _make_scorer(name: str, rule: str, device: torch.device, options: Mapping[str, Any]) -> OcrScorer:
    opts = parse_options(name, options, OCR_SERVER_DEFAULTS, prefix="reward server --options")
    use_gpu = opts["use_gpu"] and torch.device(device).type == "cuda"
    loaders = {"paddleocr": _paddle_engine, "easyocr": _easyocr_engine}
    if opts["engine"] not in loaders:
        raise ValueError(f"Unknown OCR engine {opts['engine']!r}; choose one of {OCR_ENGINES}.")
    engine, batch_engine = loaders[opts["engine"]](opts["lang"], use_gpu)
    return OcrScorer(engine, batch_engine, num_workers=opts["num_workers"], rule=rule)
