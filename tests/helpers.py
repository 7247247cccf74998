"""Helpers the tests share (imported as ``from helpers import ...``; pytest puts tests/ on
``sys.path``). Fixtures live in conftest.py; plain functions and constants live here.

1. The sim engine's options are named once: ``CHAT_SIM`` (the chat-server tests'
   upstream), ``SLOW_SIM`` (a reply slow enough to interrupt) and ``ZERO_LATENCY``
   (tests that set their ground truth per request with the ``x-labkit-sim`` header).
   The ``sim_factory`` fixture shares one running server per distinct set of options.
2. ``wait_for`` polls with a deadline: tests never sleep a fixed time and then hope.
3. ``Flood`` sends oversized requests over a raw socket and samples the memory of the
   server that receives them (the request-limit tests of both servers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai

USER = [{"role": "user", "content": "Say hello."}]

ZERO_LATENCY: dict[str, Any] = {"ttft_ms": 0, "itl_ms": 0}
CHAT_SIM: dict[str, Any] = {"ttft_ms": 5, "itl_ms": 1, "reply_tokens": 12, "seed": 7}
# 60 deltas 40 ms apart: 2.4 s of reply, time enough to press Ctrl+C or drop the connection.
SLOW_SIM: dict[str, Any] = {**CHAT_SIM, "ttft_ms": 20, "itl_ms": 40, "reply_tokens": 60}


def sim_header(**opts: object) -> dict[str, str]:
    """The ``x-labkit-sim`` header setting sim options for one request."""
    return {"x-labkit-sim": ";".join(f"{k}={v}" for k, v in opts.items())}


def anthropic_sdk(api: Any) -> anthropic.Anthropic:
    """An Anthropic client for a local API, with the SDK's retries off."""
    return anthropic.Anthropic(base_url=api.base_url, api_key="test", max_retries=0)


def openai_sdk(api: Any) -> openai.OpenAI:
    """An OpenAI client for a local API, with the SDK's retries off."""
    return openai.OpenAI(base_url=api.openai_base_url, api_key="test", max_retries=0)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, every: float = 0.02) -> bool:
    """Poll ``predicate`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(every)


class Flood:
    """Oversized requests over a raw socket, and the memory of the process that gets them.

    Each sender returns ``(status, body, seconds, bytes_sent, headers)``: the status and
    JSON body of the answer, the seconds from the first byte sent to the whole answer
    read, how many bytes of body the client got out before the server answered or
    closed, and the answer's headers (lower-case names).
    """

    CHUNK = 64 * 1024

    @staticmethod
    def rss_mb(pid: int) -> float:
        """The process's resident memory (``VmRSS`` of /proc/<pid>/status), in MiB."""
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for pid {pid}")

    @classmethod
    def peak_growth(cls, pid: int, attack, *args, **kwargs):
        """Run ``attack(*args, **kwargs)`` while sampling the RSS of ``pid`` every 5 ms;
        return ``(growth in MiB of the peak over the start, attack's result)``."""
        import threading
        import time

        before = cls.rss_mb(pid)
        peak, stop = [before], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], cls.rss_mb(pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = attack(*args, **kwargs)
            time.sleep(0.2)  # let a late allocation show
        finally:
            stop.set()
            sampler.join()
        return peak[0] - before, result

    @classmethod
    def _exchange(cls, url: str, head: bytes, chunks, *, timeout: float = 30.0):
        """Send ``head``, then the byte strings of ``chunks`` from a thread, while
        reading the answer; stop sending when the answer is in or the socket fails."""
        import json
        import socket
        import threading
        import time
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        answered, sent = threading.Event(), [0]

        def send_all() -> None:
            try:
                for chunk in chunks:
                    if answered.is_set():
                        return
                    sock.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:
                return  # the server closed the connection: what a refusal does

        t0 = time.monotonic()
        sock.sendall(head)
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        data = b""
        try:
            while True:
                if b"\r\n\r\n" in data:
                    head_part, _, rest = data.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in head_part.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(rest) >= length[0]:
                        break
                try:
                    got = sock.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    break
                if not got:
                    break
                data += got
        finally:
            seconds = time.monotonic() - t0
            answered.set()
            sock.close()
            sender.join(timeout=timeout)
        head_part, _, rest = data.partition(b"\r\n\r\n")
        status = int(head_part.split(b" ", 2)[1]) if head_part else 0
        headers = {
            k.strip().lower().decode(): v.strip().decode()
            for k, _, v in (line.partition(b":") for line in head_part.split(b"\r\n")[1:])
        }
        body = json.loads(rest) if rest.strip() else None
        return status, body, seconds, sent[0], headers

    @classmethod
    def declared(cls, url: str, path: str, size: int, headers: dict[str, str] | None = None):
        """POST a body declared (``Content-Length``) as ``size`` bytes, and send it."""

        def chunks():
            block = b"x" * cls.CHUNK
            for _ in range(size // cls.CHUNK):
                yield block

        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {size}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        return cls._exchange(url, (head + "\r\n").encode(), chunks())

    @classmethod
    def chunked(cls, url: str, path: str, headers: dict[str, str] | None = None, most: int = 2**31):
        """POST a chunked body that never ends (until ``most`` bytes, or the server stops it)."""

        def chunks():
            frame = b"%x\r\n" % cls.CHUNK + b"x" * cls.CHUNK + b"\r\n"
            yield b'%x\r\n{"message": "\r\n' % len(b'{"message": "')
            for _ in range(most // cls.CHUNK):
                yield frame

        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        return cls._exchange(url, (head + "\r\n").encode(), chunks())

    @classmethod
    def header(cls, url: str, path: str = "/health", most: int = 2**31):
        """GET with one header line that never ends (until ``most`` bytes)."""

        def chunks():
            block = b"a" * cls.CHUNK
            for _ in range(most // cls.CHUNK):
                yield block

        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ".encode()
        return cls._exchange(url, head, chunks())
