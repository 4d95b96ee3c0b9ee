"""One HTTP exchange under a total deadline, for the reward-server client (:mod:`flow_grpo.rewards.remote`).

A socket timeout bounds each blocking call, not the whole exchange: a server that trickles its answer
a byte at a time could stretch it without end. :func:`exchange` arms a watchdog that shuts the socket
down at the deadline, so connect, send and receive together take at most ``timeout`` seconds.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.parse
import urllib.request

__all__ = ["MAX_REPLY_BYTES", "exchange", "open_connection"]

MAX_REPLY_BYTES = 16 * 1024 * 1024
"""Most reply bytes read; :func:`exchange` reads one more so that the caller can tell an oversized reply."""


def open_connection(url: str, timeout: float, direct: bool) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the server of ``url`` and the prefix of the request target.

    Args:
        url: the server's ``http(s)`` base URL, without a trailing slash.
        timeout: socket timeout in seconds.
        direct: skip the environment's proxy (for a loopback server).

    Returns:
        ``(connection, base)``: the request target is ``base + path``.
    """
    parsed = urllib.parse.urlsplit(url)
    https = parsed.scheme == "https"
    port = parsed.port or (443 if https else 80)
    base = parsed.path.rstrip("/")
    proxy = None if direct else urllib.request.getproxies().get(parsed.scheme)
    if proxy and urllib.request.proxy_bypass(parsed.hostname):
        proxy = None
    connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
    if not proxy:
        return connection_class(parsed.hostname, port, timeout=timeout), base
    proxy_url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    proxy_port = proxy_url.port or 80
    if https:
        connection = http.client.HTTPSConnection(proxy_url.hostname, proxy_port, timeout=timeout)
        connection.set_tunnel(parsed.hostname, port)
        return connection, base
    # A plain-HTTP proxy takes the absolute URL as the request target.
    return http.client.HTTPConnection(proxy_url.hostname, proxy_port, timeout=timeout), url


def exchange(
    url: str, method: str, path: str, body: bytes | None, *, timeout: float, direct: bool
) -> tuple[int, bytes]:
    """One HTTP exchange that completes within ``timeout`` seconds in total, or raises ``TimeoutError``.

    Args:
        url: the server's base URL (see :func:`open_connection`); ``path`` is appended to it.
        method: ``"GET"`` or ``"POST"``.
        body: the JSON request body, or ``None``.
        timeout: the deadline in seconds for connect, send and receive together.
        direct: skip the environment's proxy.

    Returns:
        ``(status, reply)``, the reply cut at ``MAX_REPLY_BYTES + 1`` bytes.

    Raises:
        TimeoutError: the deadline passed. Other ``OSError`` and ``http.client.HTTPException`` pass through.
    """
    connection, base = open_connection(url, timeout, direct)
    expired = threading.Event()

    def abort() -> None:
        expired.set()
        sock = connection.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(timeout, abort)
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        if expired.is_set():
            raise TimeoutError("connect")
        headers = {"Content-Type": "application/json", "Connection": "close"}
        connection.request(method, base + path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read(MAX_REPLY_BYTES + 1)
        status = response.status
    except (OSError, http.client.HTTPException) as error:
        if expired.is_set():
            raise TimeoutError(f"no complete answer within {timeout:g}s") from error
        raise
    finally:
        watchdog.cancel()
        connection.close()
    if expired.is_set():
        raise TimeoutError(f"no complete answer within {timeout:g}s")
    return status, data
