"""The chat API's SSE layer (labkit.server.sse) on a real uvicorn: what a response
promises whoever reads it — every event in order, the head with the first event, and a
client that stops reading dropped after ``send_timeout`` with the clean-up run."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from helpers import wait_for
from starlette.applications import Starlette
from starlette.routing import Route

from labkit.server.sse import encode_event, event_response


class _Server:
    """A Starlette app with one SSE route on uvicorn in a thread, on a free port."""

    def __init__(self, events: int, chunk: int, send_timeout: float) -> None:
        self.closed = threading.Event()
        self.generator_finished = threading.Event()
        self.sent = 0

        async def stream(_request):  # type: ignore[no-untyped-def]
            async def gen() -> AsyncIterator[bytes]:
                try:
                    for i in range(events):
                        yield encode_event({"i": i, "pad": "x" * chunk})
                        self.sent = i + 1
                        await asyncio.sleep(0)
                finally:
                    self.generator_finished.set()

            async def on_close() -> None:
                self.closed.set()

            return event_response(gen(), send_timeout=send_timeout, on_close=on_close)

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            Starlette(routes=[Route("/s", stream)]), log_level="warning", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        assert wait_for(lambda: self.server.started, timeout=20)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)


@pytest.fixture
def sse_server() -> Iterator[type[_Server]]:
    started: list[_Server] = []

    def make(**kw: float) -> _Server:
        server = _Server(**kw)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in started:
        server.stop()


def test_a_reader_gets_every_event_in_order_with_the_head(sse_server):
    server = sse_server(events=200, chunk=10, send_timeout=5.0)
    with httpx.stream("GET", server.url + "/s", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert [int(line.split('"i": ')[1].split(",")[0]) for line in lines] == list(range(200))
    assert wait_for(server.closed.is_set, timeout=5)


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(sse_server):
    """The client sends its request and never reads: once the socket buffers are full the
    server's send blocks; after ``send_timeout`` the response ends, the event generator is
    closed and ``on_close`` runs (the chat API releases its session lock there)."""
    server = sse_server(events=100_000, chunk=16_384, send_timeout=0.5)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(server.sock.getsockname())
    try:
        client.sendall(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        assert wait_for(server.closed.is_set, timeout=20), f"still sending ({server.sent} events)"
        assert server.generator_finished.is_set()
        assert server.sent < 100_000  # it stopped because nobody read, not because it finished
        assert time.monotonic() - t0 < 15
    finally:
        client.close()
