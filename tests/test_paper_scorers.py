"""The table's DeQA scorer behind an OpenAI-compatible API (ImageReward and HPSv3: tests/test_preference_parity.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flow_grpo.reward_server.deqa import DEQA_SERVER_DEFAULTS, DeqaJudge, level_expectation
from flow_grpo.reward_server.server import RewardServer
from flow_grpo.rewards import build_reward
from tests.test_remote_reward import CannedServer, _answer, _client_options, _images


def _logprobs(**levels: float) -> list[dict]:
    return [{"token": token, "logprob": logprob} for token, logprob in levels.items()]


def test_level_expectation_is_the_expected_level_over_the_level_words() -> None:
    # p(good) = p(fair) = 0.4, p(",") ignored: renormalised -> (4 + 3) / 2.
    assert level_expectation(_logprobs(good=math.log(0.4), fair=math.log(0.4), **{",": math.log(0.2)})) == pytest.approx(3.5)
    # " Excellent" and "excellent" are one level (the likelier kept); p = 0.5 / 0.25 vs bad 0.25.
    candidates = [{"token": " Excellent", "logprob": math.log(0.5)}, {"token": "excellent", "logprob": math.log(0.1)},
                  {"token": "bad", "logprob": math.log(0.25)}]
    assert level_expectation(candidates) == pytest.approx((5 * 0.5 + 1 * 0.25) / 0.75)
    assert level_expectation(_logprobs(the=-0.1)) is None


def test_deqa_through_the_reward_server() -> None:
    top = _logprobs(excellent=math.log(0.5), good=math.log(0.5))
    answer = {"choices": [{"message": {"content": "excellent"}, "logprobs": {"content": [{"token": "excellent", "top_logprobs": top}]}}]}
    with CannedServer(_answer(200, json.dumps(answer).encode())) as judge_api:
        judge = DeqaJudge({**DEQA_SERVER_DEFAULTS, "base_url": judge_api.url + "/v1", "max_workers": 2})
        with RewardServer({"deqa": judge}, port=0) as reward_server:
            reward = build_reward({"deqa": 1.0}, "cpu", {"deqa": _client_options(reward_server.url)})
            scores = reward(_images(2), ["a cat", "a dog"], [{}] * 2)["deqa"]
        requests = [json.loads(body) for body in judge_api.bodies]
    torch.testing.assert_close(scores, torch.full((2,), 4.5))
    assert all(r["messages"][-1] == {"role": "assistant", "content": "The quality of the image is"} for r in requests)
    assert all(r["continue_final_message"] and r["logprobs"] and r["max_tokens"] == 1 for r in requests)
    assert all(r["messages"][0]["content"][1]["text"] == "What do you think about the quality of this image?" for r in requests)


def test_deqa_without_logprobs_says_what_the_server_must_return() -> None:
    judge = DeqaJudge(dict(DEQA_SERVER_DEFAULTS))
    with pytest.raises(RuntimeError, match="top_logprobs"):
        judge.score_reply({"choices": [{"message": {"content": "good"}}]})
