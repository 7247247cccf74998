"""Transport hooks: stamp the request leaving and the response's headers and bytes.

:func:`instrument` adds httpx *event hooks* to an SDK client's own httpx client; the
``request`` hook stamps the request as it leaves for the transport, the ``response``
hook stamps the headers and wraps the body stream to stamp the first and last body
bytes. :func:`adopt_transport_stamps` moves those stamps into a
:class:`~labkit.timing.records.StreamTiming` once a stream is open.

Notes:

1. The stamps travel on the request's ``extensions`` dict, so concurrent requests on
   one client never mix.
2. Without :func:`instrument`, the wrappers stamp "sent" just before they enter the
   SDK's stream manager (or call the callable given), and "headers" when that returns
   (the SDKs return from ``__enter__`` once the response headers are in);
   ``StreamTiming.sent_source`` says which was used (``"httpx_hook"`` or ``"wrapper"``).
3. The SDKs use httpx (or its fork httpx2, anthropic>=2.14/openai>=3.57); both have
   the same event-hook API. The body wrapper subclasses the response's own package's
   byte-stream class so ``Response.close()`` accepts it.
"""

from __future__ import annotations

import functools
import importlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ..errors import ConfigurationError
from .records import StreamTiming

__all__ = ["adopt_transport_stamps", "instrument"]

_EXT_KEY = "labkit_timing"


class _StampedSyncBody:
    """Wraps a response's byte stream to stamp the first and last body bytes."""

    def __init__(self, inner: Any, stamps: dict[str, int]) -> None:
        self._inner = inner
        self._stamps = stamps

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            now = time.perf_counter_ns()
            if chunk:
                self._stamps.setdefault("first_byte_ns", now)
                self._stamps["last_byte_ns"] = now
            yield chunk

    def close(self) -> None:
        self._inner.close()


class _StampedAsyncBody:
    """Async twin of :class:`_StampedSyncBody`."""

    def __init__(self, inner: Any, stamps: dict[str, int]) -> None:
        self._inner = inner
        self._stamps = stamps

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            now = time.perf_counter_ns()
            if chunk:
                self._stamps.setdefault("first_byte_ns", now)
                self._stamps["last_byte_ns"] = now
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


@functools.cache
def _body_class(package: str, is_async: bool) -> type:
    """The stamping body wrapper, subclassing the response's own package's
    Sync/AsyncByteStream (httpx or httpx2) so ``Response.close()`` accepts it."""
    mod = importlib.import_module(package)
    if is_async:
        return type("StampedAsyncBody", (_StampedAsyncBody, mod.AsyncByteStream), {})
    return type("StampedSyncBody", (_StampedSyncBody, mod.SyncByteStream), {})


def _wrap_body(response: Any, is_async: bool) -> None:
    stamps = response.request.extensions.get(_EXT_KEY)
    if stamps is None:
        return
    stamps["headers_ns"] = time.perf_counter_ns()
    cls = _body_class(type(response).__module__.partition(".")[0], is_async)
    response.stream = cls(response.stream, stamps)


def _on_request(request: Any) -> None:
    request.extensions[_EXT_KEY] = {"sent_ns": time.perf_counter_ns()}


def _on_response(response: Any) -> None:
    _wrap_body(response, False)


async def _aon_request(request: Any) -> None:
    _on_request(request)


async def _aon_response(response: Any) -> None:
    _wrap_body(response, True)


def instrument(client: Any) -> Any:
    """Add timing hooks to an ``anthropic``/``openai`` (sync or async) client's httpx
    client, in place, once; returns the client (notes 1 and 3)."""
    http = getattr(client, "_client", None)
    if http is None or not hasattr(http, "event_hooks"):
        raise ConfigurationError(
            f"Cannot instrument {type(client).__name__}: it has no httpx client.",
            hint="Pass an anthropic.Anthropic/AsyncAnthropic or openai.OpenAI/AsyncOpenAI client.",
        )
    hooks = http.event_hooks
    # An async client's hooks must be coroutines (note 3).
    is_async = hasattr(http, "aclose")
    req_hook, resp_hook = (_aon_request, _aon_response) if is_async else (_on_request, _on_response)
    if req_hook not in hooks["request"]:
        http.event_hooks = {
            "request": [*hooks["request"], req_hook],
            "response": [*hooks["response"], resp_hook],
        }
    return client


def _response_of(stream: Any) -> Any:
    for name in ("response", "_response"):
        resp = getattr(stream, name, None)
        if resp is not None and hasattr(resp, "status_code"):
            return resp
    raw = getattr(stream, "_raw_stream", None)
    return getattr(raw, "response", None) if raw is not None else None


def adopt_transport_stamps(timing: StreamTiming, stream: Any) -> dict[str, int] | None:
    resp = _response_of(stream)
    if resp is None:
        return None
    timing.status_code = getattr(resp, "status_code", None)
    headers = getattr(resp, "headers", None)
    if headers is not None:
        timing.server_cache = headers.get("x-labkit-cache")
    try:
        stamps = resp.request.extensions.get(_EXT_KEY)
    except (AttributeError, RuntimeError):
        return None
    if stamps and "sent_ns" in stamps:
        timing.sent_ns = stamps["sent_ns"]
        timing.sent_source = "httpx_hook"
        timing.headers_ns = stamps.get("headers_ns", timing.headers_ns)
        return stamps
    return None
