"""The reward server under hostile load: slow headers, bursts, PNG bombs and malformed headers.

Every server binds 127.0.0.1 on a free port; every loop is bounded, so a regression fails, never hangs.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flow_grpo.reward_server.server import RewardServer, ServerLimits
from flow_grpo.rewards.transport import DECODED_BYTES_PER_PIXEL, encode_images

ROOT = Path(__file__).resolve().parents[1]


def mean_pixel(images: torch.Tensor, prompts, metadata) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def _body(num: int = 1, **changes) -> bytes:
    images = torch.rand(num, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    payload = {"scorer": "s", **encode_images(images, "raw"), "prompts": ["a"] * num, "metadata": [{}] * num}
    payload.update(changes)
    return json.dumps(payload).encode()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, dict, dict[str, str]]:
    """``(status, answer, headers)`` of one POST /score."""
    connection = http.client.HTTPConnection(*_address(url), timeout=timeout)
    try:
        connection.request("POST", "/score", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        connection.close()


def _raw_answer(url: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Send raw request bytes and read until the server closes (b"" when it closed without answering)."""
    with socket.create_connection(_address(url), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data


# ---- slowloris: the whole header is bounded, not each read ----


def test_a_header_trickled_byte_by_byte_is_cut_off_within_the_read_timeout():
    read_timeout_s = 0.5
    header = b"POST /score HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 200
    with RewardServer({"s": mean_pixel}, limits=ServerLimits(read_timeout_s=read_timeout_s)) as server:
        socks = [socket.create_connection(_address(server.url), timeout=5) for _ in range(5)]
        opened = time.monotonic()
        closed_after: dict[int, float] = {}
        try:
            for byte in header[:40]:  # one byte per 0.1 s each: every read is well within the read timeout
                for index, sock in enumerate(socks):
                    if index not in closed_after:
                        try:
                            sock.sendall(bytes([byte]))
                        except OSError:
                            closed_after[index] = time.monotonic() - opened
                readable, _, _ = select.select([s for i, s in enumerate(socks) if i not in closed_after], [], [], 0.1)
                for sock in readable:
                    index = socks.index(sock)
                    try:
                        sock.recv(4096)
                    except OSError:
                        pass
                    closed_after[index] = time.monotonic() - opened
                if len(closed_after) == len(socks):
                    break
        finally:
            for sock in socks:
                sock.close()
        assert len(closed_after) == len(socks), "a connection trickling its header stayed open"
        assert max(closed_after.values()) < read_timeout_s + 1.0
        assert _post(server.url, _body())[0] == 200  # the server still serves


# ---- bursts: a bounded wait line, then 503 with Retry-After at once ----


def test_a_burst_beyond_the_wait_line_gets_503_with_retry_after_at_once():
    def slow(images, prompts, metadata):
        time.sleep(0.3)
        return torch.zeros(len(prompts))

    limits = ServerLimits(max_concurrent=4, max_queued=4, read_timeout_s=5.0, max_wait_ms=0)
    body = _body()

    def timed_post(_: int) -> tuple[int, float, dict[str, str]]:
        start = time.monotonic()
        status, _, headers = _post(server.url, body, timeout=20)
        return status, time.monotonic() - start, headers

    with RewardServer({"s": slow}, limits=limits) as server:
        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(timed_post, range(200)))  # a dropped connection raises here
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}
    assert 8 <= statuses.count(200) <= 40  # the slots and the wait line, plus slots freed during the burst
    busy = [(elapsed, headers) for status, elapsed, headers in results if status == 503]
    assert all(headers.get("Retry-After") == "1" for _, headers in busy)
    assert max(elapsed for elapsed, _ in busy) < 1.5  # at once, not after read_timeout_s


# ---- malformed headers and protocol versions ----


def test_a_content_length_of_non_ascii_digits_is_a_400():
    with RewardServer({"s": mean_pixel}) as server:
        for length in (b"\xb2", b"\xb9\xb2"):  # '²' and '¹²' in ISO-8859-1: str.isdigit() says yes, int() says no
            request = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: " + length + b"\r\n\r\n"
            answer = _raw_answer(server.url, request)
            assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
            assert b"ASCII digits" in answer
        assert _post(server.url, _body())[0] == 200


def test_an_unknown_protocol_version_is_a_400():
    with RewardServer({"s": mean_pixel}) as server:
        for protocol in (2, "1", True, None):
            status, answer, _ = _post(server.url, _body(protocol=protocol))
            assert status == 400 and "protocol" in answer["error"], (protocol, status, answer)
        assert _post(server.url, _body(protocol=1))[0] == 200
        assert _post(server.url, _body())[0] == 200  # a request that declares none is taken as protocol 1


# ---- PNG bombs: batch size first, sizes from the headers, a pixel budget per request ----


def test_the_batch_size_is_checked_before_any_image_is_decoded():
    with RewardServer({"s": mean_pixel}, limits=ServerLimits(max_batch=2)) as server:
        body = _body(3, image_format="png", images=[base64.b64encode(b"not a png").decode()] * 3)
        status, answer, _ = _post(server.url, body)
    assert status == 413 and "max_batch = 2" in answer["error"]


def _png(height: int, width: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), dtype=np.uint8)).save(buffer, format="PNG", compress_level=9)
    return base64.b64encode(buffer.getvalue()).decode()


_MEASURE = """
import json, resource, sys
from flow_grpo.rewards.transport import decode_images

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

cases, max_pixels = json.load(open(sys.argv[1])), int(sys.argv[2])
decode_images(cases["warm_up"], max_pixels)  # the lazy imports of the PNG decoder
for name in ("header_lie", "bomb", "allowed"):  # the high-water mark only rises: the largest case last
    before = peak_mib()
    try:
        decode_images(cases[name], max_pixels)
        outcome = "decoded"
    except ValueError as error:
        outcome = type(error).__name__ + ": " + str(error)
    print(json.dumps({"case": name, "growth_mib": peak_mib() - before, "outcome": outcome}))
"""


def test_png_bombs_grow_the_server_by_at_most_a_stated_multiple_of_max_pixels(tmp_path):
    max_pixels = 1024 * 1024

    def payload(images: list[str], size: int) -> dict:
        return {"image_format": "png", "height": size, "width": size, "images": images}

    small = _png(512, 512)
    cases = {
        "warm_up": payload([_png(8, 8)], 8),
        # A 2048x2048 PNG (12 KiB; 28 MiB while PIL decodes it) declared as 16x16: refused from its header.
        "header_lie": payload([_png(2048, 2048)], 16),
        # 64 PNGs of 512x512, about 1 KiB each, 48 MiB decoded: over the request's pixel budget.
        "bomb": payload([small] * 64, 512),
        # 4 x 512 x 512 = max_pixels: decoded, within the stated bound.
        "allowed": payload([small] * 4, 512),
    }
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    run = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(max_pixels)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = {row["case"]: row for row in map(json.loads, run.stdout.splitlines())}
    assert "declared" in results["header_lie"]["outcome"]
    assert results["bomb"]["outcome"].startswith("ImageBudgetError") and "max_pixels" in results["bomb"]["outcome"]
    assert results["allowed"]["outcome"] == "decoded"
    slack_mib = 8  # allocator and PIL buffers
    assert results["header_lie"]["growth_mib"] < slack_mib
    assert results["bomb"]["growth_mib"] < slack_mib
    assert results["allowed"]["growth_mib"] < DECODED_BYTES_PER_PIXEL * max_pixels / 2**20 + slack_mib


def test_the_client_sends_no_more_pixels_per_request_than_the_server_decodes():
    calls: list[int] = []

    def counting(images, prompts, metadata):
        calls.append(images.shape[0])
        return images.mean(dim=(1, 2, 3))

    from flow_grpo.rewards import RemoteReward

    with RewardServer({"s": counting}, limits=ServerLimits(max_pixels=3 * 16 * 16, max_wait_ms=0)) as server:
        client = RemoteReward(server.url, "s", timeout=10.0, max_retries=0)
        client.check()
        images = torch.randint(0, 256, (7, 3, 16, 16), generator=torch.Generator().manual_seed(1)) / 255
        scores = client(images, ["a"] * 7, [{}] * 7)
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)))
    assert max(calls) <= 3 and sum(calls) == 7

