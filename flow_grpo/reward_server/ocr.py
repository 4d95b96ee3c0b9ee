"""OCR accuracy, a server-side scorer (see :mod:`flow_grpo.reward_server.server`).

The target text is the prompt's metadata ``"text"`` when present, else the quoted text of the prompt
(``A sign that says "Open 24 hours"`` -> ``Open 24 hours``; several quoted parts are joined with a
space). Recognised and target text are compared case-insensitively with all whitespace removed:

    accuracy = 1 - min(edit_distance(recognised, target), len(target)) / len(target)

so 1 is a perfect rendering and 0 a useless one. The OCR engine (PaddleOCR or EasyOCR) is imported
only when the scorer is built; tests and other engines plug in any ``engine(image) -> str``. A batch
is read with the engine's batch API where it has one (PaddleOCR 3.x ``predict`` on a list, EasyOCR
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
    "OCR_SERVER_DEFAULTS",
    "OcrScorer",
    "edit_distance",
    "make_ocr_scorer",
    "normalise_text",
    "ocr_accuracy",
    "target_text",
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

# Straight, curly and typographic double quotes.
_QUOTED = re.compile(r"[\"\u201c\u201d\u201e]([^\"\u201c\u201d\u201e]+)[\"\u201c\u201d\u201e]")

OcrEngine = Callable[[np.ndarray], str]
"""``engine(uint8 (H, W, 3) RGB) -> all recognised text``."""

OcrBatchEngine = Callable[[list[np.ndarray]], list[str]]
"""``batch_engine([uint8 (H, W, 3) RGB] * N) -> N recognised texts``, equal to ``engine`` per image."""


def target_text(prompt: str, metadata: Mapping[str, Any]) -> str:
    """The text an image should show (see the module docstring).

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


def ocr_accuracy(recognised: str, target: str) -> float:
    """``1 - min(distance, len(target)) / len(target)`` on normalised text, in [0, 1]."""
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
    """

    def __init__(self, engine: OcrEngine, batch_engine: OcrBatchEngine | None = None, num_workers: int = 4) -> None:
        if num_workers < 1:
            raise ValueError(f"ocr: num_workers must be positive, got {num_workers}.")
        self.engine = engine
        self.batch_engine = batch_engine
        self.num_workers = int(num_workers)
        self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="ocr") if self.num_workers > 1 else None

    def read(self, pixels: np.ndarray) -> list[str]:
        """uint8 ``(N, H, W, 3)`` -> ``N`` recognised texts (batch API, else the worker pool)."""
        arrays = list(pixels)
        if self.batch_engine is not None:
            texts = list(self.batch_engine(arrays))
            if len(texts) != len(arrays):
                raise RuntimeError(f"The OCR batch engine returned {len(texts)} texts for {len(arrays)} images.")
            return texts
        if self._pool is None or len(arrays) == 1:
            return [self.engine(array) for array in arrays]
        return list(self._pool.map(self.engine, arrays))

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> float32 ``(N,)`` CPU accuracy in [0, 1]."""
        from flow_grpo.rewards.transport import images_to_uint8

        targets = [target_text(prompt, meta) for prompt, meta in zip(prompts, metadata, strict=True)]
        texts = self.read(images_to_uint8(images))
        return torch.tensor(
            [ocr_accuracy(text, target) for text, target in zip(texts, targets, strict=True)], dtype=torch.float32
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

    def read(image: np.ndarray) -> str:
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # PaddleOCR takes OpenCV (BGR) arrays
        texts: list[str] = []
        if hasattr(reader, "predict"):
            for result in reader.predict(bgr) or []:
                texts.extend(str(t) for t in (result.get("rec_texts") or []))
        else:
            for page in reader.ocr(bgr, cls=False) or []:
                for line in page or []:
                    texts.append(str(line[1][0]))
        return " ".join(texts)

    if not hasattr(reader, "predict"):
        return read, None

    def read_batch(images: list[np.ndarray]) -> list[str]:
        # PaddleOCR 3.x reads a list of images in one call, one result per image in order.
        results = list(reader.predict([np.ascontiguousarray(image[:, :, ::-1]) for image in images]) or [])
        return [" ".join(str(t) for t in (result.get("rec_texts") or [])) for result in results]

    return read, read_batch


def _easyocr_engine(lang: str, use_gpu: bool) -> tuple[OcrEngine, OcrBatchEngine | None]:
    try:
        import easyocr
    except ImportError as error:
        raise ImportError(
            "The ocr scorer with engine 'easyocr' needs EasyOCR in the server's environment: pip install easyocr"
        ) from error
    reader = easyocr.Reader([lang], gpu=use_gpu)

    def read(image: np.ndarray) -> str:
        return " ".join(str(t) for t in reader.readtext(image, detail=0))

    def read_batch(images: list[np.ndarray]) -> list[str]:
        # readtext_batched needs images of one size; the server batches only same-size requests.
        return [" ".join(str(t) for t in page) for page in reader.readtext_batched(images, detail=0)]

    return read, read_batch


def make_ocr_scorer(device: torch.device, options: Mapping[str, Any]) -> OcrScorer:
    """Server factory of ``ocr`` with the configured engine."""
    opts = parse_options("ocr", options, OCR_SERVER_DEFAULTS, prefix="reward server --options")
    use_gpu = opts["use_gpu"] and torch.device(device).type == "cuda"
    loaders = {"paddleocr": _paddle_engine, "easyocr": _easyocr_engine}
    if opts["engine"] not in loaders:
        raise ValueError(f"Unknown OCR engine {opts['engine']!r}; choose one of {OCR_ENGINES}.")
    engine, batch_engine = loaders[opts["engine"]](opts["lang"], use_gpu)
    return OcrScorer(engine, batch_engine, num_workers=opts["num_workers"])
