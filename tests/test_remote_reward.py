"""Remote rewards: the HTTP client, the reward server, and the server-side GenEval / OCR / VLM scorers.

Servers run on 127.0.0.1 with a free port (``conftest.py`` blocks every other address).
"""

from __future__ import annotations

import base64
import json
import pickle
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from flow_grpo.command_flags import UserInputError
from flow_grpo.data import load_prompts
from flow_grpo.rewards import (
    RemoteReward,
    RemoteRewardBadReplyError,
    RemoteRewardError,
    RemoteRewardHTTPError,
    RemoteRewardStartError,
    RemoteRewardTimeoutError,
    RemoteRewardUnreachableError,
    build_reward,
    jpeg_compressibility,
)
from flow_grpo.reward_server.geneval import (
    GENEVAL_COLORS,
    Detection,
    GenEvalScorer,
    evaluate_geneval,
    relative_position,
)
from flow_grpo.reward_server.ocr import OcrScorer, edit_distance, exact_accuracy, exact_target
from flow_grpo.rewards.transport import decode_images, encode_images
from flow_grpo.reward_server.server import RewardServer, ScorerInputError, ServerLimits, build_scorers
from flow_grpo.testing.rewards import save_tiny_clip, save_tiny_detector
from flow_grpo.reward_server.vlm_judge import UNIFIEDREWARD_SERVER_DEFAULTS, VlmJudge

ROOT = Path(__file__).resolve().parents[1]


def _images(num: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(num, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _client_options(url: str, **overrides) -> dict:
    """Remote options with short timeouts for tests."""
    return {"url": url, "timeout": 10.0, "max_retries": 0, "backoff": 0.05, **overrides}


# ---- fakes for the server-side scorers ----

DOG_LEFT = Detection("dog", 0.95, (0.0, 10.0, 10.0, 20.0))
CAT_RIGHT = Detection("cat", 0.95, (20.0, 10.0, 30.0, 20.0))
WEAK_DOG = Detection("dog", 0.5, (12.0, 0.0, 18.0, 6.0))


def fake_detector(images: torch.Tensor) -> list[list[Detection]]:
    """Every image shows a confident dog on the left, a confident cat on the right and a doubtful dog."""
    return [[DOG_LEFT, CAT_RIGHT, WEAK_DOG] for _ in range(images.shape[0])]


def fake_colors(image: torch.Tensor, detection: Detection) -> str:
    return {"dog": "red", "cat": "blue"}[detection.label]


class CountingScorer:
    """Wraps a reward and records the batch size of every call."""

    def __init__(self, reward: Callable) -> None:
        self.reward = reward
        self.batch_sizes: list[int] = []

    def __call__(self, images, prompts, metadata):
        self.batch_sizes.append(images.shape[0])
        return self.reward(images, prompts, metadata)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_clip(tmp_path_factory.mktemp("remote-tiny-clip"))


@pytest.fixture(scope="module")
def server(tiny_clip_dir: str):
    """A reward server hosting JPEG, a tiny PickScore, GenEval and OCR (fake detector and engine)."""
    scorers = build_scorers(
        ["jpeg_compressibility", "pickscore"],
        "cpu",
        {"pickscore": {"model": tiny_clip_dir, "processor": tiny_clip_dir}},
    )
    scorers["jpeg_compressibility"] = CountingScorer(scorers["jpeg_compressibility"])
    scorers["geneval"] = GenEvalScorer(fake_detector, fake_colors)
    scorers["ocr"] = OcrScorer(lambda image: [("HELLO W0rld", 0.9)])
    scorers["ocr_exact"] = OcrScorer(lambda image: [("HELLO W0rld", 0.9)], rule="exact")
    with RewardServer(scorers, host="127.0.0.1", port=0) as running:
        yield running


class CannedServer:
    """An HTTP server on a free loopback port whose every answer comes from ``respond(handler)``."""

    def __init__(self, respond: Callable[[BaseHTTPRequestHandler], None]) -> None:
        self.requests = 0
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._handle()

            def do_POST(self):
                outer.bodies.append(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                self._handle()

            def _handle(self):
                outer.requests += 1
                respond(self)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> CannedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _answer(status: int, body: bytes) -> Callable[[BaseHTTPRequestHandler], None]:
    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return respond


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- remote scoring equals local scoring ----


def test_health_lists_hosted_scorers(server):
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        reply = json.loads(response.read())
    assert reply["status"] == "ok" and reply["protocol"] == 1
    assert reply["scorers"] == ["geneval", "jpeg_compressibility", "ocr", "ocr_exact", "pickscore"]
    assert reply["limits"] == server.limits.as_dict() and reply["limits"]["max_batch"] == 64


@pytest.mark.parametrize("image_format", ["png", "raw"])
def test_remote_jpeg_equals_local_and_is_sent_in_batches(server, image_format):
    images, prompts, metadata = _images(7), [f"p{i}" for i in range(7)], [{"i": i} for i in range(7)]
    options = _client_options(server.url, scorer="jpeg_compressibility", batch_size=3, image_format=image_format)
    counter = server.queues["jpeg_compressibility"].replicas[0]
    counter.batch_sizes.clear()
    scores = build_reward({"remote": 1.0}, "cpu", {"remote": options})(images, prompts, metadata)
    assert counter.batch_sizes == [3, 3, 1]
    assert torch.equal(scores["remote"], jpeg_compressibility(images, prompts, metadata))


def test_remote_tiny_clip_reward_equals_local(server, tiny_clip_dir):
    images, prompts, metadata = _images(5, seed=1), ["a dog", "a cat", "a dog", "b", "c"], [{}] * 5
    local = build_reward({"pickscore": 1.0}, "cpu", {"pickscore": {"model": tiny_clip_dir, "processor": tiny_clip_dir}})
    remote = build_reward({"remote": 1.0}, "cpu", {"remote": _client_options(server.url, scorer="pickscore")})
    expected = local(images, prompts, metadata)["pickscore"]
    torch.testing.assert_close(remote(images, prompts, metadata)["remote"], expected, atol=1e-6, rtol=0)
    assert expected.std() > 1e-3


def test_geneval_metadata_travels_from_the_prompt_file_to_the_server(server, tmp_path):
    lines = [
        {"prompt": "a photo of a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]},
        {
            "prompt": "a photo of two dogs",
            "tag": "counting",
            "include": [{"class": "dog", "count": 2}],
            "exclude": [{"class": "dog", "count": 3}],
        },
        {
            "prompt": "a photo of a cat right of a dog",
            "tag": "position",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["right of", 0]}],
        },
        {
            "prompt": "a photo of a cat left of a dog",
            "tag": "position",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
        },
        {"prompt": "a photo of a red dog", "tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]},
        {
            "prompt": "a photo of a blue dog",
            "tag": "colors",
            "include": [{"class": "dog", "count": 1, "color": "blue"}],
        },
        {
            "prompt": "a photo of a dog and no cat",
            "tag": "two_object",
            "include": [{"class": "dog", "count": 1}],
            "exclude": [{"class": "cat", "count": 1}],
        },
    ]
    path = tmp_path / "test_metadata.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    prompts = load_prompts(path)
    options = {name: _client_options(server.url) for name in ("geneval", "geneval_strict", "geneval_correct")}
    reward = build_reward({"geneval": 1.0, "geneval_strict": 0.0, "geneval_correct": 0.0}, "cpu", options)
    scores = reward(_images(len(prompts)), [p.text for p in prompts], [p.metadata for p in prompts])
    # Official correctness: counting uses the 0.9 threshold (the doubtful dog does not count); the last has a cat.
    correct = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
    assert scores["geneval/correct"].tolist() == correct == scores["geneval_correct"].tolist()
    # The training score: two dogs where one is asked for score 0 and fail the clause's colour / position.
    torch.testing.assert_close(scores["geneval"], torch.tensor([0.0, 0.5, 1 / 3, 1 / 3, 0.0, 0.0, 0.0]))
    assert scores["geneval/strict"].tolist() == [0.0] * 7 == scores["geneval_strict"].tolist()
    assert scores["avg"].tolist() == scores["geneval"].tolist()
    # Per task: NaN (null on the wire) on the images of other tasks.
    position = scores["geneval/correct_position"]
    assert position[2:4].tolist() == [1.0, 0.0] and torch.isnan(position[[0, 1, 4, 5, 6]]).all()
    assert scores["geneval/correct_colors"][4:6].tolist() == [1.0, 0.0]


def test_ocr_reward_through_the_server(server):
    prompts = ['A sign that says "Hello World"', "A mug", "A poster"]
    metadata = [{}, {"text": "abc"}, {"text": "hello w0rld"}]
    reward = build_reward({"ocr": 1.0}, "cpu", {"ocr": _client_options(server.url)})
    # The public rule: the first quoted text, else the whole prompt; metadata is not read.
    torch.testing.assert_close(
        reward(_images(3), prompts, metadata)["ocr"], torch.tensor([1 - 1 / 11, 1 - 4 / 5, 1 - 7 / 8])
    )
    assert reward(_images(1), ["hello w0rld"], [{}])["ocr"].item() == 1.0  # no quotes: the whole prompt
    reward = build_reward({"ocr_exact": 1.0}, "cpu", {"ocr_exact": _client_options(server.url)})
    torch.testing.assert_close(reward(_images(3), prompts, metadata)["ocr_exact"], torch.tensor([0.9, 0.0, 1.0]))
    # The whole-text rule: a prompt without a target text is the caller's mistake: 422, not retried.
    with pytest.raises(RemoteRewardHTTPError, match=r"HTTP 422.*double quotes") as error:
        reward(_images(1), ["no quotes here"], [{}])
    assert error.value.status == 422


def test_named_remote_reward_checks_the_server_hosts_its_scorer(server):
    with pytest.raises(RemoteRewardError, match=r"does not host scorer 'unifiedreward'.*; restart it with `--scorers unifiedreward`"):
        build_reward({"unifiedreward": 1.0}, "cpu", {"unifiedreward": _client_options(server.url)})
    with pytest.raises(ValueError, match=r"reward_options\.remote\.scorer is empty"):
        build_reward({"remote": 1.0}, "cpu", {"remote": _client_options(server.url)})


def test_unknown_scorer_answer_is_not_retried(server):
    client = RemoteReward(server.url, "hpsv2", max_retries=3, backoff=5.0, timeout=10.0)
    start = time.monotonic()
    with pytest.raises(RemoteRewardHTTPError, match=r"HTTP 404.*does not host scorer 'hpsv2'.*jpeg_compressibility"):
        client(_images(1), ["a"], [{}])
    assert time.monotonic() - start < 4.0  # no backoff sleep happened


# ---- failures: each produces its documented error within the configured bounds ----


def test_dead_server_is_unreachable_after_bounded_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    client = RemoteReward(url, "geneval", timeout=2.0, max_retries=2, backoff=0.05, reward_name="geneval")
    start = time.monotonic()
    with pytest.raises(RemoteRewardUnreachableError) as error:
        client(_images(2), ["a", "b"], [{}, {}])
    elapsed = time.monotonic() - start
    message = str(error.value)
    assert url in message and "reward_options.geneval.url" in message and "3 attempt(s)" in message
    assert "scripts/reward_server.py --scorers geneval" in message
    assert 0.15 <= elapsed < 2.0  # the two backoffs (0.05 + 0.1 s) and no more than a connection refusal each


def test_dead_server_fails_at_build_time_with_health_check():
    options = {"geneval": _client_options(f"http://127.0.0.1:{_free_port()}")}
    with pytest.raises(RemoteRewardStartError, match="unreachable") as error:
        build_reward({"geneval": 1.0}, "cpu", options)
    assert isinstance(error.value, UserInputError) and isinstance(error.value.__cause__, RemoteRewardUnreachableError)


def test_slow_server_times_out_within_the_bound():
    release = threading.Event()

    def slow(images, prompts, metadata):
        release.wait(timeout=20)
        return torch.zeros(len(prompts))

    with RewardServer({"slow": slow}, port=0) as slow_server:
        client = RemoteReward(slow_server.url, "slow", timeout=0.3, max_retries=1, backoff=0.05)
        start = time.monotonic()
        try:
            with pytest.raises(RemoteRewardTimeoutError, match=r"did not answer within 0\.3s.*timeout.*2 attempt"):
                client(_images(1), ["a"], [{}])
        finally:
            release.set()
        elapsed = time.monotonic() - start
    # Two attempts of 0.3 s plus one 0.05 s backoff.
    assert 0.6 <= elapsed < 2.0


def test_server_errors_are_retried_then_reported():
    body = json.dumps({"error": "CUDA out of memory"}).encode()
    with CannedServer(_answer(500, body)) as canned:
        client = RemoteReward(canned.url, "pickscore", timeout=5.0, max_retries=2, backoff=0.01)
        with pytest.raises(RemoteRewardHTTPError, match=r"HTTP 500.*CUDA out of memory.*3 attempt") as error:
            client(_images(1), ["a"], [{}])
        assert error.value.status == 500
        assert canned.requests == 3


_UNPICKLED: list[bool] = []


def _record_unpickling() -> list:
    _UNPICKLED.append(True)
    return [1.0, 2.0]


class _PickleBomb:
    def __reduce__(self):
        return (_record_unpickling, ())


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>not json</html>", "not valid JSON"),
        (json.dumps({"scores": [1.0, 2.0]}).encode(), "sent 2 scores for 3 images"),
        (json.dumps({"score": [1.0, 2.0, 3.0]}).encode(), "without a 'scores' list"),
        (b'{"scores": [1.0, NaN, 2.0]}', "not valid JSON"),
        (json.dumps({"scores": [1.0, "2", 3.0]}).encode(), "not a finite number"),
        (json.dumps([1.0, 2.0, 3.0]).encode(), "not an object"),
        (pickle.dumps(_PickleBomb()), "not valid JSON"),
    ],
)
def test_malformed_replies_are_rejected_without_retry(body, message):
    _UNPICKLED.clear()
    with CannedServer(_answer(200, body)) as canned:
        client = RemoteReward(canned.url, "x", timeout=5.0, max_retries=2, backoff=0.01)
        with pytest.raises(RemoteRewardBadReplyError, match=re.escape(message)):
            client(_images(3), ["a", "b", "c"], [{}, {}, {}])
        assert canned.requests == 1
    assert not _UNPICKLED


def test_a_service_that_does_not_speak_http_is_a_bad_reply():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def garbage() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"\x00\x01garbage\r\n\r\n")

        thread = threading.Thread(target=garbage, daemon=True)
        thread.start()
        client = RemoteReward(f"http://127.0.0.1:{listener.getsockname()[1]}", "x", timeout=5.0, max_retries=2)
        with pytest.raises(RemoteRewardBadReplyError, match="did not answer with valid HTTP"):
            client(_images(1), ["a"], [{}])
        thread.join(timeout=5)


def test_client_validates_its_options_and_metadata(server):
    with pytest.raises(ValueError, match=r"reward_options\.remote\.url is .*; give an http"):
        RemoteReward("127.0.0.1:18085", "x")
    with pytest.raises(ValueError, match="image_format"):
        build_reward({"remote": 1.0}, "cpu", {"remote": _client_options(server.url, scorer="x", image_format="jpeg")})
    with pytest.raises(ValueError, match=r"Unknown option.*'adress'"):
        build_reward({"ocr": 1.0}, "cpu", {"ocr": {"adress": "x"}})
    client = RemoteReward(server.url, "jpeg_compressibility")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        client(_images(1), ["a"], [{"tensor": torch.zeros(1)}])


# ---- the server's input checks ----


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _payload(**changes) -> bytes:
    payload = {
        "scorer": "jpeg_compressibility",
        **encode_images(_images(2), "raw"),
        "prompts": ["a", "b"],
        "metadata": [{}, {}],
    }
    payload.update(changes)
    return json.dumps(payload).encode()


def test_server_rejects_bad_requests_with_clear_errors(server):
    assert _post(server.url, _payload())[0] == 200
    cases = [
        (b"\x80\x03pickled", 400, "not valid JSON"),
        (_payload(images=["@@not base64@@", "AAAA"]), 400, "not valid base64"),
        (_payload(images=[base64.b64encode(b"abc").decode()] * 2), 400, "bytes"),
        (_payload(image_format="png"), 400, "not a PNG image"),
        (_payload(prompts=["only one"]), 400, "2 images, 1 prompts"),
        (_payload(height=100000, width=100000), 413, "over the server's max_pixels"),
        (_payload(scorer="nope"), 404, "does not host scorer 'nope'"),
    ]
    for body, status, message in cases:
        code, reply = _post(server.url, body)
        assert code == status and message in reply["error"], (message, code, reply)


def test_server_refuses_oversized_requests():
    limits = ServerLimits(max_request_bytes=1000)
    with RewardServer({"jpeg_compressibility": jpeg_compressibility}, port=0, limits=limits) as small:
        code, reply = _post(small.url, _payload())
        assert code == 413 and "exceeds 1000" in reply["error"]


def test_encode_decode_round_trip_is_exact_on_8_bit_images():
    images = (_images(3, size=20) * 255).round() / 255
    for image_format in ("png", "raw"):
        decoded = decode_images(encode_images(images, image_format))
        assert torch.equal(decoded, images)


def test_server_cannot_host_client_rewards_or_unknown_names():
    with pytest.raises(ValueError, match="remote client reward"):
        build_scorers(["remote"], "cpu")
    with pytest.raises(ValueError, match="unknown scorer 'no_such_scorer'"):
        build_scorers(["no_such_scorer"], "cpu")
    with pytest.raises(ValueError, match="not hosted"):
        build_scorers(["jpeg_compressibility"], "cpu", {"pickscore": {}})


# ---- GenEval and OCR logic ----


def test_geneval_scorer_with_a_transformers_detector_and_clip_colours(tiny_clip_dir, tmp_path):
    """The real server factory: tiny DETR detector and tiny CLIP colour model loaded from disk."""
    detector_dir = save_tiny_detector(tmp_path / "detr", labels=("dog", "cat"))
    options = {"detector": detector_dir, "color_model": tiny_clip_dir, "threshold": 0.0, "counting_threshold": 0.0}
    scorer = build_scorers(["geneval"], "cpu", {"geneval": options})["geneval"]
    images = _images(3, size=40)
    detections = scorer.detector(images)
    assert len(detections) == 3
    assert all(d.label in ("dog", "cat") and d.score >= 0.0 and len(d.box) == 4 for found in detections for d in found)
    assert scorer.color_classifier(images[0], Detection("dog", 1.0, (0.0, 0.0, 20.0, 20.0))) in GENEVAL_COLORS
    metadata = [
        {"include": [{"class": "giraffe", "count": 1}]},  # not a label of the detector
        {"include": [{"class": "dog", "count": 1, "color": "red"}]},
        {"include": [{"class": "cat", "count": 1}], "exclude": [{"class": "cat", "count": 99}]},
    ]
    scores = scorer(images, ["a", "b", "c"], metadata)
    assert scores["score"][0] == 0.0 and scores["correct"][0] == 0.0
    assert set(scores["correct"].tolist()) <= {0.0, 1.0}
    expected_last = float(any(d.label == "cat" for d in detections[2]))
    assert scores["correct"][2] == expected_last


def test_relative_position_follows_box_centres_with_a_margin():
    left, right = (0, 0, 10, 10), (20, 0, 30, 10)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 30, 10, 40)) == {"above"}
    assert relative_position((0, 30, 10, 40), (0, 0, 10, 10)) == {"below"}
    # Centres 1 px apart on boxes 10 px wide: inside the margin, no relation.
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # A diagonal offset counts for both axes.
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}


def test_evaluate_geneval_requirements():
    detections = [DOG_LEFT, CAT_RIGHT, WEAK_DOG]
    assert evaluate_geneval({"include": [{"class": "dog", "count": 2}]}, detections) == (True, "correct")
    ok, reason = evaluate_geneval({"tag": "counting", "include": [{"class": "dog", "count": 2}]}, detections)
    assert not ok and "expected 2 dog, found 1" in reason
    ok, reason = evaluate_geneval(
        {"include": [{"class": "dog", "count": 1}], "exclude": [{"class": "dog", "count": 2}]}, detections
    )
    assert not ok and "fewer than 2 dog" in reason
    assert evaluate_geneval({"include": [{"class": "Cat", "count": 1}]}, detections)[0]
    with pytest.raises(ScorerInputError, match="colour classifier"):
        evaluate_geneval({"include": [{"class": "dog", "count": 1, "color": "red"}]}, detections)
    with pytest.raises(ScorerInputError, match="'include'"):
        evaluate_geneval({"tag": "single_object"}, detections)


def test_ocr_text_helpers():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert exact_target("A shop sign reading \u201cOpen Late\u201d", {}) == "Open Late"
    assert exact_target('Two signs: "Stop" and "Go"', {}) == "Stop Go"
    assert exact_target("ignored", {"text": "From metadata"}) == "From metadata"
    assert exact_accuracy([("open", 0.9), ("  LATE", 0.0)], "Open Late") == 1.0
    assert exact_accuracy([], "Open Late") == 0.0
    assert exact_accuracy([("a completely different and much longer text", 0.9)], "Open") == 0.0
    assert exact_accuracy([("0pen Late", 0.9)], "Open Late") == pytest.approx(1 - 1 / 8)
    with pytest.raises(ScorerInputError):
        exact_target("no quotes", {})


# ---- VLM judge against a fake OpenAI-compatible endpoint ----


def test_unifiedreward_judge_through_the_server():
    answer = {"choices": [{"message": {"content": "The image matches well.\nFinal Score: 4"}}]}
    with CannedServer(_answer(200, json.dumps(answer).encode())) as judge_api:
        options = {**UNIFIEDREWARD_SERVER_DEFAULTS, "base_url": judge_api.url + "/v1", "max_workers": 2}
        with RewardServer({"unifiedreward": VlmJudge(options)}, port=0) as reward_server:
            reward = build_reward({"unifiedreward": 1.0}, "cpu", {"unifiedreward": _client_options(reward_server.url)})
            scores = reward(_images(3), ["a red bus", "a cat", "a dog"], [{}] * 3)["unifiedreward"]
        requests = [json.loads(body) for body in judge_api.bodies]
    torch.testing.assert_close(scores, torch.full((3,), 0.75))  # (4 - 1) / (5 - 1)
    assert len(requests) == 3
    assert all(r["model"] == UNIFIEDREWARD_SERVER_DEFAULTS["model"] for r in requests)
    contents = [r["messages"][0]["content"] for r in requests]
    assert all(c[0]["image_url"]["url"].startswith("data:image/png;base64,") for c in contents)
    assert sorted(c[1]["text"].rsplit("Caption: ", 1)[1] for c in contents) == ["a cat", "a dog", "a red bus"]


def test_vlm_judge_score_parsing():
    judge = VlmJudge(dict(UNIFIEDREWARD_SERVER_DEFAULTS))
    assert judge.parse_score("Final Score: **5**") == 1.0
    assert judge.parse_score("Final Score: 9") == 1.0  # clamped to the scale
    assert judge.parse_score("no number") == 0.0  # on_unparsable = "min"
    strict = VlmJudge({**UNIFIEDREWARD_SERVER_DEFAULTS, "on_unparsable": "error", "normalize": False})
    assert strict.parse_score("Final Score: 2.5") == 2.5
    with pytest.raises(RuntimeError, match="No score"):
        strict.parse_score("I refuse")


# ---- the command-line server ----


def test_reward_server_script_serves_until_stopped(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "reward_server.py"),
        "--scorers",
        "jpeg_compressibility,jpeg_incompressibility",
        "--port",
        "0",
        "--device",
        "cpu",
    ]
    process = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        found: queue.Queue[str] = queue.Queue()

        def read_address() -> None:  # in a thread, so a silent server cannot block the test past its deadline
            for line in process.stderr:
                match = re.search(r"Serving .* on (http://127\.0\.0\.1:\d+)", line)
                if match:
                    found.put(match.group(1))
                    return

        threading.Thread(target=read_address, daemon=True).start()
        try:
            url = found.get(timeout=60)
        except queue.Empty:
            pytest.fail("the server did not report its address within 60 s")
        images = _images(2, seed=3)
        reward = build_reward({"remote": 1.0}, "cpu", {"remote": _client_options(url, scorer="jpeg_incompressibility")})
        torch.testing.assert_close(
            reward(images, ["a", "b"], [{}, {}])["remote"], -jpeg_compressibility(images, ["a", "b"], [{}, {}])
        )
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_reward_server_script_reports_bad_scorers(capsys):
    from flow_grpo.commands import reward_server as script

    for flags, message in (
        (["--scorers", "remote", "--port", "0", "--device", "cpu"], "remote client reward"),
        (["--scorers", "jpeg_compressibility", "--options", "{not json", "--device", "cpu"], "JSON"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            script.main(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
