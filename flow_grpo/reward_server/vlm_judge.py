"""A VLM judge behind an OpenAI-compatible chat API, a server-side scorer (``unifiedreward``).

Judges such as UnifiedReward (Qwen-VL fine-tuned to grade text-image pairs) or quality raters in
the DeQA style are usually served by vLLM or SGLang with an OpenAI-compatible endpoint. For each
image the judge sends one ``POST {base_url}/chat/completions`` with the PNG image as a data URL
and the instruction ``prompt_template`` (``{prompt}`` is replaced by the image's prompt), reads the
first number matched by ``score_pattern`` in the answer, clamps it to ``[min_score, max_score]``
and, with ``normalize``, maps it to ``[0, 1]``. Requests run in parallel threads.

It needs only the standard library; the served model lives in its own environment.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger
from PIL import Image

from flow_grpo.rewards.options import parse_options

__all__ = ["UNIFIEDREWARD_SERVER_DEFAULTS", "UNIFIEDREWARD_TEMPLATE", "VlmJudge", "make_unifiedreward_scorer"]

logger = get_logger(__name__)

UNIFIEDREWARD_TEMPLATE = (
    "You are shown an image generated from the caption below. Judge it on two criteria: how well it "
    "matches every element of the caption (objects, counts, attributes, relations, text), and its "
    "overall visual quality (coherence, detail, absence of artefacts). Think briefly, then give one "
    "score from 1 (poor) to 5 (excellent) on the last line as 'Final Score: <number>'.\n"
    "Caption: {prompt}"
)
"""Default instruction of the ``unifiedreward`` judge (1-5 scale, ``Final Score: x`` line)."""

UNIFIEDREWARD_SERVER_DEFAULTS: dict[str, Any] = {
    "base_url": "http://127.0.0.1:8080/v1",  # OpenAI-compatible API root of the served judge
    "model": "CodeGoat24/UnifiedReward-qwen-7b",  # model name the API serves
    "api_key_env": "OPENAI_API_KEY",  # environment variable holding the API key (unset = no key)
    "prompt_template": UNIFIEDREWARD_TEMPLATE,  # instruction; {prompt} is replaced by the image's prompt
    "score_pattern": r"Final Score:\s*\**\s*([-+]?\d+(?:\.\d+)?)",  # regex whose group 1 is the score
    "min_score": 1.0,  # lowest score of the judge's scale
    "max_score": 5.0,  # highest score of the judge's scale
    "normalize": True,  # map [min_score, max_score] to [0, 1]
    "on_unparsable": "min",  # "min": score min_score and log a warning; "error": fail the request
    "timeout": 120.0,  # seconds per judge request
    "max_workers": 8,  # parallel judge requests
    "max_tokens": 512,  # generation limit of the judge's answer
    "temperature": 0.0,  # sampling temperature of the judge
}
"""Server options of the ``unifiedreward`` scorer (``--options '{"unifiedreward": {...}}'``)."""


class VlmJudge:
    """``judge(images, prompts, metadata) -> float32 (N,)`` via an OpenAI-compatible chat API."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        """Args: ``options``: every key of :data:`UNIFIEDREWARD_SERVER_DEFAULTS`."""
        self.options = dict(options)
        if self.options["max_score"] <= self.options["min_score"]:
            raise ValueError("unifiedreward: max_score must be larger than min_score.")
        if self.options["on_unparsable"] not in ("min", "error"):
            raise ValueError("unifiedreward: on_unparsable must be 'min' or 'error'.")
        if self.options["max_workers"] < 1:
            raise ValueError("unifiedreward: max_workers must be positive.")
        self.pattern = re.compile(self.options["score_pattern"])
        if self.pattern.groups < 1:
            raise ValueError("unifiedreward: score_pattern needs a capture group around the number.")
        self.endpoint = self.options["base_url"].rstrip("/") + "/chat/completions"
        self.api_key = os.environ.get(self.options["api_key_env"], "") if self.options["api_key_env"] else ""
        from flow_grpo.rewards.transport import is_loopback_host

        host = urllib.parse.urlsplit(self.endpoint).hostname or ""
        # A judge on this machine must not be routed through the environment's proxies.
        self._opener = urllib.request.build_opener(
            *([urllib.request.ProxyHandler({})] if is_loopback_host(host) else [])
        )

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] -> float32 ``(N,)`` CPU judge scores."""
        from flow_grpo.rewards.transport import images_to_uint8

        pixels = images_to_uint8(images)
        workers = min(self.options["max_workers"], len(prompts))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm-judge") as pool:
            scores = list(pool.map(self.judge_one, pixels, prompts))
        return torch.tensor(scores, dtype=torch.float32)

    def request_body(self, data_url: str, prompt: str) -> dict[str, Any]:
        """The chat-completion request for one image (a PNG data URL) and its prompt."""
        instruction = self.options["prompt_template"].replace("{prompt}", prompt)
        return {
            "model": self.options["model"],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": instruction},
                    ],
                }
            ],
            "max_tokens": self.options["max_tokens"],
            "temperature": self.options["temperature"],
        }

    def score_reply(self, reply: Mapping[str, Any]) -> float:
        """The score of one chat-completion reply: `parse_score` of the answer's text."""
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"The judge at {self.endpoint} sent no chat completion: {str(reply)[:300]}") from None
        return self.parse_score(str(text))

    def judge_one(self, image: np.ndarray, prompt: str) -> float:
        """Score one uint8 ``(H, W, 3)`` image against its prompt."""
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
        data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        body = self.request_body(data_url, prompt)
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode("utf-8"), headers=headers)
        try:
            with self._opener.open(request, timeout=self.options["timeout"]) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            raise RuntimeError(
                f"The judge at {self.endpoint} answered HTTP {error.code}: {error.read(300)!r}"
            ) from None
        except (urllib.error.URLError, TimeoutError) as error:
            raise RuntimeError(f"The judge at {self.endpoint} is unreachable or timed out: {error}") from None
        return self.score_reply(reply)

    def parse_score(self, text: str) -> float:
        """Score from the judge's answer, clamped and (optionally) normalised."""
        low, high = self.options["min_score"], self.options["max_score"]
        match = self.pattern.search(text)
        if match is None:
            if self.options["on_unparsable"] == "error":
                raise RuntimeError(f"No score matching {self.pattern.pattern!r} in the judge's answer: {text[-300:]!r}")
            logger.warning("No score in the judge's answer, scoring %s: %r", low, text[-200:])
            value = low
        else:
            value = min(max(float(match.group(1)), low), high)
        return (value - low) / (high - low) if self.options["normalize"] else value


def make_unifiedreward_scorer(device: torch.device, options: Mapping[str, Any]) -> VlmJudge:
    """Server factory of ``unifiedreward`` (``device`` is unused: the judge runs elsewhere)."""
    return VlmJudge(
        parse_options("unifiedreward", options, UNIFIEDREWARD_SERVER_DEFAULTS, prefix="reward server --options")
    )
