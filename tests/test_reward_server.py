"""The reward server under load and faults: dynamic batching, replicas, transport, deadlines, limits.

Every server binds 127.0.0.1 on a free port; every wait is bounded so a regression fails, never hangs.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from flow_grpo.reward_server.frontend import default_max_request_bytes
from flow_grpo.reward_server.server import RewardServer, ScorerInputError, ServerLimits, build_replicas
from flow_grpo.rewards import (
    RemoteReward,
    RemoteRewardHTTPError,
    RemoteRewardTimeoutError,
    jpeg_compressibility,
)
from flow_grpo.rewards.transport import encode_images


def _images(num: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(num, 3, size, size, generator=torch.Generator().manual_seed(seed))


def mean_pixel(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    """A deterministic per-image scorer: the mean of each image."""
    return images.mean(dim=(1, 2, 3))


class Recorder:
    """Wraps a scorer; records every call's batch size and optionally sleeps or fails."""

    def __init__(self, scorer: Callable = mean_pixel, delay: float = 0.0, fail: bool = False) -> None:
        self.scorer, self.delay, self.fail = scorer, delay, fail
        self.calls: list[int] = []

    def __call__(self, images, prompts, metadata):
        self.calls.append(images.shape[0])
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("replica lost its device")
        if any(p == "bad" for p in prompts):
            raise ScorerInputError("prompt 'bad' has no metadata")
        return self.scorer(images, prompts, metadata)


def _client(url: str, scorer: str = "s", **options) -> RemoteReward:
    return RemoteReward(url, scorer, **{"timeout": 10.0, "max_retries": 0, "backoff": 0.01, **options})


def _post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _body(num: int = 2, scorer: str = "s") -> bytes:
    payload = {"scorer": scorer, **encode_images(_images(num), "raw"), "prompts": ["a"] * num, "metadata": [{}] * num}
    return json.dumps(payload).encode()


def _raw_socket(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


# ---- dynamic batching ----


def test_concurrent_requests_are_batched_and_scores_equal_direct_scoring():
    recorder = Recorder()
    limits = ServerLimits(max_batch=64, max_wait_ms=300)
    batches = [(_images(n, seed=i), [f"p{i}"] * n, [{"i": i}] * n) for i, n in enumerate([1, 2, 3, 4, 5, 6])]
    with RewardServer({"s": recorder}, limits=limits) as server:
        client = _client(server.url)
        with ThreadPoolExecutor(len(batches)) as pool:
            results = list(pool.map(lambda batch: client(*batch), batches))
    for (images, prompts, metadata), scores in zip(batches, results, strict=True):
        # The server scores the 8-bit images it receives.
        expected = mean_pixel((images * 255).round() / 255, prompts, metadata)
        torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert sum(recorder.calls) == 21
    assert len(recorder.calls) < len(batches) and max(recorder.calls) > 6  # requests were merged


def test_a_lone_request_waits_at_most_max_wait_ms():
    recorder = Recorder()
    with RewardServer({"s": recorder}, limits=ServerLimits(max_batch=64, max_wait_ms=200)) as server:
        client = _client(server.url)
        client(_images(1), ["a"], [{}])  # warm-up
        start = time.monotonic()
        client(_images(2), ["a", "b"], [{}, {}])
        elapsed = time.monotonic() - start
    assert 0.15 <= elapsed < 1.0, elapsed  # waited for companions, then scored the partial batch
    assert recorder.calls == [1, 2]


def test_a_full_batch_is_scored_without_waiting():
    with RewardServer({"s": Recorder()}, limits=ServerLimits(max_batch=4, max_wait_ms=5000)) as server:
        client = _client(server.url)
        start = time.monotonic()
        client(_images(4), ["a"] * 4, [{}] * 4)
        assert time.monotonic() - start < 2.0


def test_a_slow_client_does_not_stall_other_requests():
    limits = ServerLimits(max_wait_ms=100, read_timeout_s=1.5)
    with RewardServer({"s": Recorder()}, limits=limits) as server:
        stalled = _raw_socket(server.url)
        try:
            body = _body(4)
            stalled.sendall(
                b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[: len(body) // 2]
            )
            start = time.monotonic()
            scores = _client(server.url)(_images(2), ["a", "b"], [{}, {}])
            assert time.monotonic() - start < 1.0 and scores.shape == (2,)
            # The stalled body is answered 408 once read_timeout_s has passed.
            assert _read_status(stalled) == 408
            assert time.monotonic() - start < 4.0
        finally:
            stalled.close()


def test_a_bad_request_in_a_merged_batch_fails_alone():
    recorder = Recorder()
    with RewardServer({"s": recorder}, limits=ServerLimits(max_wait_ms=300)) as server:
        client = _client(server.url)
        prompts = ["a", "bad", "b", "c"]

        def score(prompt: str):
            try:
                return client(_images(2), [prompt, prompt], [{}, {}])
            except RemoteRewardHTTPError as error:
                return error

        with ThreadPoolExecutor(4) as pool:
            results = dict(zip(prompts, pool.map(score, prompts), strict=True))
    assert isinstance(results["bad"], RemoteRewardHTTPError) and results["bad"].status == 422
    assert all(isinstance(results[p], torch.Tensor) and results[p].shape == (2,) for p in ("a", "b", "c"))
    assert max(recorder.calls) > 2  # the requests were merged before the bad one was isolated


# ---- replicas ----


def test_requests_are_balanced_across_replicas():
    replicas = [Recorder(delay=0.4), Recorder(delay=0.4)]
    with RewardServer({"s": replicas}, limits=ServerLimits(max_batch=1, max_wait_ms=0)) as server:
        client = _client(server.url)
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: client(_images(1, seed=i), ["a"], [{}]), range(4)))
        elapsed = time.monotonic() - start
        assert server.health()["replicas"] == {"s": 2}
    assert replicas[0].calls and replicas[1].calls and len(replicas[0].calls) + len(replicas[1].calls) == 4
    assert elapsed < 1.5  # two at a time (~0.8 s), not one after another (1.6 s)


def test_a_failing_replica_answers_with_an_error_not_a_hang():
    good, broken = Recorder(delay=0.2), Recorder(fail=True)
    with RewardServer({"s": [good, broken]}, limits=ServerLimits(max_batch=2, max_wait_ms=0)) as server:
        client = _client(server.url, timeout=5.0)

        def score(i: int):
            try:
                return client(_images(2, seed=i), ["a", "b"], [{}, {}])
            except RemoteRewardHTTPError as error:
                return error

        start = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(score, range(6)))
        elapsed = time.monotonic() - start
    errors = [r for r in results if isinstance(r, RemoteRewardHTTPError)]
    assert broken.calls and good.calls
    assert len(errors) == len(broken.calls) and all(e.status == 500 and "lost its device" in str(e) for e in errors)
    assert elapsed < 4.0


def test_build_replicas_makes_one_instance_per_device():
    replicas = build_replicas(["jpeg_compressibility", "jpeg_incompressibility"], ["cpu", "cpu"])
    assert {name: len(r) for name, r in replicas.items()} == {"jpeg_compressibility": 2, "jpeg_incompressibility": 2}
    with pytest.raises(ValueError, match="--devices"):
        build_replicas(["jpeg_compressibility"], [])


# ---- transport ----


def test_image_format_auto_is_raw_on_loopback_and_png_elsewhere():
    assert RemoteReward("http://127.0.0.1:1", "s").image_format == "raw"
    assert RemoteReward("http://localhost:1", "s").image_format == "raw"
    assert RemoteReward("http://reward-host.example:18085", "s").image_format == "png"
    assert RemoteReward("http://reward-host.example:18085", "s", image_format="raw").image_format == "raw"


def test_client_sends_the_whole_batch_in_one_request_within_the_server_limits():
    recorder = Recorder(jpeg_compressibility)
    with RewardServer({"s": recorder}, limits=ServerLimits(max_batch=16, max_wait_ms=0)) as server:
        client = _client(server.url, batch_size=64)
        client.check()
        assert client.batch_size == 16 and client.max_request_bytes == server.limits.max_request_bytes
        images = _images(20)
        scores = client(images, ["a"] * 20, [{}] * 20)
        assert recorder.calls == [16, 4]
        torch.testing.assert_close(scores, jpeg_compressibility(images, ["a"] * 20, [{}] * 20))
    # The byte limit caps the images per request: here 3 images of 64x64.
    limit = 65536 + 3 * (round(64 * 64 * 3 * 1.01 * 4 / 3) + 4096) + 10
    with RewardServer({"s": recorder}, limits=ServerLimits(max_request_bytes=limit, max_wait_ms=0)) as server:
        client = _client(server.url)
        client.check()
        recorder.calls.clear()
        client(_images(7, size=64), ["a"] * 7, [{}] * 7)
        assert recorder.calls == [3, 3, 1]


def test_client_halves_requests_the_server_refuses_as_too_large():
    recorder = Recorder()
    limit = len(_body(4)) + 100  # fits 4 of the 16x16 test images
    with RewardServer({"s": recorder}, limits=ServerLimits(max_request_bytes=limit, max_wait_ms=0)) as server:
        client = _client(server.url)  # no /health check: it learns the limit from the 413 answers
        images = _images(16)
        scores = client(images, ["a"] * 16, [{}] * 16)
    assert sorted(recorder.calls) == [4, 4, 4, 4] and client.batch_size == 4
    torch.testing.assert_close(scores, mean_pixel((images * 255).round() / 255, None, None), atol=1e-6, rtol=0)


# ---- the client's total deadline (issue: a trickling server once took 199 s with timeout=2) ----


def test_a_trickling_server_fails_within_the_total_deadline():
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        def trickle() -> None:
            connection, _ = listener.accept()
            with connection:
                connection.recv(1 << 20)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
                for _ in range(200):  # one byte every 50 ms for at most 10 s
                    if stop.wait(0.05):
                        return
                    try:
                        connection.sendall(b" ")
                    except OSError:
                        return

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        client = RemoteReward(f"http://127.0.0.1:{listener.getsockname()[1]}", "s", timeout=1.0, max_retries=0)
        start = time.monotonic()
        try:
            with pytest.raises(RemoteRewardTimeoutError, match=r"within 1s"):
                client(_images(1), ["a"], [{}])
        finally:
            stop.set()
            thread.join(timeout=5)
    assert time.monotonic() - start < 2.0


# ---- what one client can cost the server ----


def test_default_body_limit_is_sized_to_a_real_batch():
    limits = ServerLimits()
    assert limits.max_request_bytes == default_max_request_bytes(64) == 84_934_656
    assert limits.max_request_bytes < 512 * 1024 * 1024
    assert ServerLimits(max_batch=128).max_request_bytes > limits.max_request_bytes
    # A full batch of 512x512 images fits, with its prompts and metadata.
    one = encode_images(torch.rand(1, 3, 512, 512), "raw")
    payload = {"scorer": "s", **one, "prompts": ["p" * 300] * 64}
    payload["metadata"] = [{"tag": "counting", "include": [{"class": "dog", "count": 2}]}] * 64
    # The body with 64 images: the one-image body plus 63 more quoted base64 strings and separators.
    size = len(json.dumps(payload)) + 63 * (len(one["images"][0]) + 4)
    assert size < limits.max_request_bytes
    with pytest.raises(ValueError, match="max_concurrent"):
        ServerLimits(max_concurrent=0)


def test_requests_beyond_the_concurrency_limit_get_503():
    release = threading.Event()

    def blocking(images, prompts, metadata):
        release.wait(10)
        return torch.zeros(len(prompts))

    limits = ServerLimits(max_concurrent=1, read_timeout_s=0.3, max_wait_ms=0)
    with RewardServer({"s": blocking}, limits=limits) as server:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, server.url, _body(1))
            time.sleep(0.2)  # the first request holds the only slot
            start = time.monotonic()
            status, reply = _post(server.url, _body(1))
            waited = time.monotonic() - start
            release.set()
            assert first.result(timeout=10)[0] == 200
    assert status == 503 and "busy" in reply["error"]
    assert 0.25 <= waited < 2.0  # waited read_timeout_s for a slot, then gave up


def test_a_stalled_body_gets_408_within_the_read_timeout():
    with RewardServer({"s": Recorder()}, limits=ServerLimits(read_timeout_s=0.5)) as server:
        sock = _raw_socket(server.url)
        with sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            start = time.monotonic()
            for _ in range(3):  # trickle a few bytes, each within the per-read timeout
                time.sleep(0.2)
                try:
                    sock.sendall(b" ")
                except OSError:
                    break
            assert _read_status(sock) == 408
            assert time.monotonic() - start < 2.0


def test_deeply_nested_json_is_a_400_not_a_dropped_connection():
    with RewardServer({"s": Recorder()}) as server:
        status, reply = _post(server.url, b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and "nested too deeply" in reply["error"]
        # The server still serves.
        assert _post(server.url, _body(1))[0] == 200


def test_requests_over_max_batch_are_refused():
    with RewardServer({"s": Recorder()}, limits=ServerLimits(max_batch=2)) as server:
        status, reply = _post(server.url, _body(3))
    assert status == 413 and "max_batch = 2" in reply["error"]


# ---- OCR: batch API or worker pool, same scores as reading one image at a time ----


def _fake_read(image) -> list[tuple[str, float]]:
    """A deterministic fake OCR engine: the text depends on the image content."""
    return [[("Hello World", 0.9)], [("Hel1o", 0.8), ("Wor1d", 0.7)], [("Help", 0.5)], []][int(image.mean()) % 4]


def test_ocr_batch_engine_and_worker_pool_give_the_per_image_scores():
    from flow_grpo.reward_server.ocr import OcrScorer

    images = _images(12, size=24, seed=5) * torch.linspace(0.2, 1.0, 12).view(12, 1, 1, 1)
    prompts, metadata = ['A sign that says "Hello World"'] * 12, [{}] * 12
    expected = OcrScorer(_fake_read, num_workers=1)(images, prompts, metadata)
    assert len(set(expected.tolist())) > 1  # the fake engine reads different texts

    batch_calls: list[int] = []

    def read_batch(arrays):
        batch_calls.append(len(arrays))
        return [_fake_read(array) for array in arrays]

    assert torch.equal(OcrScorer(_fake_read, read_batch)(images, prompts, metadata), expected)
    assert batch_calls == [12]

    threads: set[str] = set()

    def read_in_pool(image) -> list[tuple[str, float]]:
        threads.add(threading.current_thread().name)
        time.sleep(0.01)
        return _fake_read(image)

    assert torch.equal(OcrScorer(read_in_pool, num_workers=4)(images, prompts, metadata), expected)
    assert len(threads) > 1 and all(name.startswith("ocr") for name in threads)
    with pytest.raises(RuntimeError, match="returned 1 readings for 12 images"):
        OcrScorer(_fake_read, lambda arrays: [[("x", 1.0)]])(images, prompts, metadata)


# ---- the throughput benchmark, short mode ----


def test_throughput_benchmark_short_mode(capsys):
    from flow_grpo.reward_server.benchmark import parse_options, run

    argv = ["--scorer", "tiny_clip", "--clients", "2", "--requests", "2", "--batch_size", "2", "--resolution", "64"]
    result = run(parse_options(argv))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f"server/in-process throughput ratio: {result['ratio']:.2f}"
    assert result["served"] > 0 and result["in_process"] > 0 and 0 < result["p50"] <= result["p95"]
    assert any(line.startswith("transport png:") for line in lines)
    assert result["raw_kb"] == 64 * 64 * 3 / 1024  # raw is exactly the pixel bytes


def test_client_splits_a_body_over_the_known_limit_before_sending():
    recorder = Recorder()
    with RewardServer({"s": recorder}, limits=ServerLimits(max_wait_ms=0)) as server:
        client = _client(server.url)
        client.check()
        client.max_request_bytes = 110_000  # as if the server had advertised this limit
        assert client.images_per_request(16, 16) == 8  # the estimate allows 8 images of 16x16 ...
        metadata = [{"note": "x" * 20_000}] * 8  # ... but their metadata makes the body about 170 kB
        client(_images(8), ["a"] * 8, metadata)
    assert recorder.calls == [4, 4]  # no request was refused: the body was split before it was sent
