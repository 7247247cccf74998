"""The SSE layer of the chat API: event encoding and the streaming response.

The chat API speaks the course's wire format: one JSON object per ``data:`` line,
read by the course's browser snippet (``line.startsWith('data: ')``) and its httpx
consumer (``response.aiter_lines()``). This module is the only place that knows how
an event becomes bytes.

Notes:

1. The response class is ``sse_starlette.EventSourceResponse``, chosen by
   measurement. Three servers were run side by side on a 2-core machine (uvicorn with
   uvloop and httptools, one server process, an aiohttp client in another, 100 events
   per stream, 300 streams at 20 ms between events): a plain ``StreamingResponse``
   with hand-formatted ``data:`` lines sent 12,700 events/s (mean gap 20.8 ms),
   sse-starlette 3.7 10,200/s (23.0 ms), and FastAPI 0.165's native
   ``EventSourceResponse`` 3,700/s (76 ms, its server at 100% CPU: it runs two memory
   streams, a timeout scope and a ``sleep(0)`` per event). sse-starlette costs close
   to a plain response and adds what a plain response lacks: keep-alive pings, a send
   timeout, and a task that watches for ``http.disconnect`` and cancels the event
   generator at once (so the upstream stream is closed promptly).
   ``benchmarks/chat_api.py`` measures ``labkit serve`` against the course's plain
   ``StreamingResponse`` on your machine.
2. Events are encoded here, to bytes, by :func:`encode_event`, and handed to
   sse-starlette as bytes, which it passes through untouched. ``json.dumps`` never
   emits a raw newline (it escapes them inside strings), so one ``data:`` line per
   event is always valid SSE, and the per-event cost is one ``json.dumps``.
3. Lines end with ``\\n`` (sse-starlette's default is ``\\r\\n``). Both are valid SSE,
   but the course's browser snippet splits on ``\\n`` and would leave a ``\\r`` at the
   end of each line; ``\\n`` keeps every client in the course byte-for-byte happy.
4. Pings are SSE comments (``: ping``), which every SSE reader ignores. They keep
   proxies and load balancers from closing an idle connection while the model is
   thinking (a long prompt on the local model can take seconds before the first
   token).
5. Headers: ``Cache-Control: no-cache`` (the course's value; sse-starlette would
   send ``no-store``), ``X-Accel-Buffering: no`` (nginx must not buffer), and
   ``X-Session-Id`` when the route sets it.
6. Clean-up that must happen once per response (the chat API releases its session
   lock there) belongs to the response, not to the event generator: a generator that
   never started (the client left before the first event) never runs ``finally``.
   :class:`ChatEventResponse` runs ``on_close`` after the response ends, always.
7. The response head (status and headers) is held back until the first event, then
   written just before it: sse-starlette sends it before the first event exists, and
   that write (and the wake-up of the client it causes) would otherwise come before
   the chat API has sent its request upstream, on the path to the first token (see
   :mod:`labkit.server.service` note 9). A client sees the head at most one upstream
   round trip later; the events and their order are unchanged.
8. The send timeout is one watchdog per response, not a timer per event. sse-starlette
   wraps every send in ``anyio.move_on_after`` (a cancel scope and a loop timer: 25 µs a
   send measured here, against 0.3 µs for the send itself — a few percent of a relayed
   turn's CPU). Here a send only stamps when it started; a watchdog task that wakes every
   ``send_timeout / 4`` cancels a send pending for longer than ``send_timeout`` and turns
   the cancellation into sse-starlette's ``SendTimeoutError``, so the response ends as it
   did: the event generator is closed and ``on_close`` runs. A stuck client is dropped
   between 1 and 1.25 × ``send_timeout`` after its send started.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError

__all__ = [
    "DEFAULT_PING_SECONDS",
    "SSE_HEADERS",
    "ChatEventResponse",
    "encode_event",
    "event_response",
    "parse_data_line",
]

#: Seconds between keep-alive comments.
DEFAULT_PING_SECONDS: float = 15.0

#: Headers every chat stream carries.
SSE_HEADERS: dict[str, str] = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

_SEP = "\n"


def encode_event(payload: Mapping[str, Any]) -> bytes:
    """One SSE event carrying ``payload`` as a JSON ``data:`` line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def parse_data_line(line: str) -> dict[str, Any] | None:
    """The JSON payload of a ``data:`` line, or None for any other line (the inverse
    of :func:`encode_event`, as the course's clients read it)."""
    if not line.startswith("data:"):
        return None
    return json.loads(line[5:].lstrip(" "))


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep=_SEP)


class ChatEventResponse(EventSourceResponse):
    """sse-starlette's response plus an ``on_close`` coroutine that runs however the
    response ends: completed, failed, or the client gone (note 6)."""

    def __init__(
        self, *args: Any, on_close: Callable[[], Awaitable[None]] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_close = on_close
        self._timeout_s: float | None = self.send_timeout
        self.send_timeout = None  # note 8: the watchdog below enforces it
        self._sending_since: float | None = None
        self._sender: asyncio.Task[Any] | None = None
        self._timed_out = False

    async def _send_with_timeout(self, send: Any, message: Any) -> None:
        if self._timeout_s is None:
            await send(message)
            return
        self._sender = asyncio.current_task()
        self._sending_since = asyncio.get_running_loop().time()
        try:
            await send(message)
        except asyncio.CancelledError:
            if not self._timed_out:
                raise
            if self._sender is not None:
                self._sender.uncancel()
            raise SendTimeoutError() from None
        finally:
            self._sending_since = None

    async def _watch_sends(self, timeout_s: float) -> None:
        """Cancel a send pending for longer than ``timeout_s`` (note 8)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(timeout_s / 4)
            since = self._sending_since
            if since is not None and loop.time() - since > timeout_s and self._sender:
                self._timed_out = True
                self._sender.cancel()
                return

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        head: dict[str, Any] | None = None

        async def send_head_with_first_event(message: dict[str, Any]) -> None:
            nonlocal head
            if message["type"] == "http.response.start":
                head = message  # note 7
                return
            if head is not None:
                start, head = head, None
                await send(start)
            await send(message)

        watchdog = None
        if self._timeout_s is not None:
            watchdog = asyncio.get_running_loop().create_task(self._watch_sends(self._timeout_s))
        try:
            await super().__call__(scope, receive, send_head_with_first_event)
        finally:
            if watchdog is not None:
                watchdog.cancel()  # not awaited: that could swallow our own cancellation
            if self._on_close is not None:
                await self._on_close()


def event_response(
    events: AsyncIterator[bytes],
    *,
    headers: Mapping[str, str] | None = None,
    ping_seconds: float = DEFAULT_PING_SECONDS,
    send_timeout: float | None = 30.0,
    on_close: Callable[[], Awaitable[None]] | None = None,
) -> ChatEventResponse:
    """Stream already-encoded events with pings, disconnect detection and the chat
    API's headers. ``send_timeout`` drops a client that stops reading; ``on_close``
    runs when the response ends, whatever the reason."""
    return ChatEventResponse(
        events,
        headers={**SSE_HEADERS, **(headers or {})},
        ping=ping_seconds,
        sep=_SEP,
        ping_message_factory=_ping,
        send_timeout=send_timeout,
        on_close=on_close,
    )
