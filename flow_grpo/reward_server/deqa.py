"""DeQA-Score image quality, a server-side scorer (``deqa``) asking a served DeQA-Score VLM.

DeQA-Score (You et al., CVPR 2025; github.com/zhiyuanyou/DeQA-Score, the `zhiyuanyou/DeQA-Score-Mix3`
weights) scores an image as Q-Align does: it asks "What do you think about the quality of this
image?", lets the answer start with "The quality of the image is", and reads the model's
probabilities of the next word over the five levels excellent, good, fair, poor, bad; the score is the
expectation of 5, 4, 3, 2, 1 under those probabilities renormalised over the five words (1 to 5,
higher is better; the tables of Flow-GRPO and TP-GRPO print it on that scale).

Served behind an OpenAI-compatible API (vLLM), the scorer sends the question and the assistant's
opening words with ``continue_final_message`` (vLLM's way of continuing the assistant turn), asks for
one token with ``top_logprobs``, and takes the five level words' log-probabilities from the reply.
The prompt of the image is not used: DeQA judges quality alone. Options as the ``unifiedreward``
judge's (:data:`DEQA_SERVER_DEFAULTS`); ``top_logprobs`` sets how many candidates the server returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from flow_grpo.reward_server.vlm_judge import UNIFIEDREWARD_SERVER_DEFAULTS, VlmJudge
from flow_grpo.rewards.options import parse_options

__all__ = ["DEQA_LEVELS", "DEQA_SERVER_DEFAULTS", "DeqaJudge", "level_expectation", "make_deqa_scorer"]

DEQA_QUESTION = "What do you think about the quality of this image?"
DEQA_ANSWER_START = "The quality of the image is"
DEQA_LEVELS: dict[str, float] = {"excellent": 5.0, "good": 4.0, "fair": 3.0, "poor": 2.0, "bad": 1.0}
"""DeQA's level words and the score each stands for."""

DEQA_SERVER_DEFAULTS: dict[str, Any] = {
    **UNIFIEDREWARD_SERVER_DEFAULTS,
    "model": "zhiyuanyou/DeQA-Score-Mix3",
    "prompt_template": DEQA_QUESTION,
    "min_score": 1.0,
    "max_score": 5.0,
    "normalize": False,  # report DeQA on its own 1-5 scale, as the papers do
    "max_tokens": 1,
    "top_logprobs": 20,
}
"""Server options of the ``deqa`` scorer (``--options '{"deqa": {...}}'``); ``score_pattern`` is unused."""


def level_expectation(candidates: list[Mapping[str, Any]]) -> float | None:
    """The expected level score from `top_logprobs` candidates (`{"token", "logprob"}`); None when no level word is among them.

    Tokens are matched after stripping spaces and lower-casing; a level seen as several tokens
    (`" good"`, `"good"`) keeps its most likely one. The probabilities are renormalised over the levels found.
    """
    best: dict[str, float] = {}
    for candidate in candidates:
        word = str(candidate.get("token", "")).strip().lower()
        if word in DEQA_LEVELS:
            best[word] = max(best.get(word, -math.inf), float(candidate["logprob"]))
    if not best:
        return None
    top = max(best.values())
    weights = {word: math.exp(logprob - top) for word, logprob in best.items()}
    return sum(DEQA_LEVELS[word] * weight for word, weight in weights.items()) / sum(weights.values())


class DeqaJudge(VlmJudge):
    """``judge(images, prompts, metadata) -> float32 (N,)`` DeQA scores from a served DeQA-Score model."""

    def request_body(self, data_url: str, prompt: str) -> dict[str, Any]:
        """The quality question with the image, continued from the answer's opening words; one token with its logprobs."""
        return {
            "model": self.options["model"],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url}},
                        {"type": "text", "text": self.options["prompt_template"]},
                    ],
                },
                {"role": "assistant", "content": DEQA_ANSWER_START},
            ],
            "continue_final_message": True,
            "add_generation_prompt": False,
            "max_tokens": self.options["max_tokens"],
            "temperature": self.options["temperature"],
            "logprobs": True,
            "top_logprobs": self.options["top_logprobs"],
        }

    def score_reply(self, reply: Mapping[str, Any]) -> float:
        """The level expectation of the first generated token, clamped (and normalised with `normalize`)."""
        try:
            candidates = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(
                f"The judge at {self.endpoint} sent no token logprobs (DeQA needs a server that returns "
                f"top_logprobs, e.g. vLLM): {str(reply)[:300]}"
            ) from None
        value = level_expectation(list(candidates))
        if value is None:
            return self.parse_score("")  # no level word: on_unparsable decides (min_score or an error)
        low, high = self.options["min_score"], self.options["max_score"]
        value = min(max(value, low), high)
        return (value - low) / (high - low) if self.options["normalize"] else value


def make_deqa_scorer(device: torch.device, options: Mapping[str, Any]) -> DeqaJudge:
    """Server factory of ``deqa`` (``device`` is unused: the judge runs elsewhere)."""
    return DeqaJudge(parse_options("deqa", options, DEQA_SERVER_DEFAULTS, prefix="reward server --options"))
