"""The ``timed`` wrappers: time an official SDK stream without changing how the code reads.

::

    with timed(client.messages.stream(model=m, max_tokens=200, messages=msgs)) as stream:
        for text in stream.text_stream:
            print(text, end="")
    stream.timing.ttft_ms, stream.timing.itl_p50_ms, stream.timing.output_tokens

    with timed(client.chat.completions.stream(model=m, messages=msgs)) as stream:
        for event in stream: ...
    with timed(lambda: client.chat.completions.create(model=m, messages=msgs, stream=True,
                                                     stream_options={"include_usage": True})) as s:
        for chunk in s: ...

``async with timed(...)`` works the same with the async clients. A non-streaming
request is timed with :func:`timed_call` / :func:`atimed_call`.

Notes:

1. An already-created ``Stream`` (``chat.completions.create(stream=True)``) has sent
   its request before :func:`timed` sees it: pass a callable (``lambda: ...``) or
   instrument the client (:func:`labkit.timing.transport.instrument`); otherwise
   ``sent_source="late"`` and TTFT is understated.
2. Timestamps are taken when the SDK hands an event to the caller; iterate promptly.
   Events are observed through the helper's own iterator (``text_stream``,
   ``get_final_message()`` and friends drain through the wrapper first), so the SDK's
   accumulation — ``get_final_message()``, tool input parsing — works unchanged.
3. The yielded object is the SDK stream itself behind a thin proxy: every attribute
   the wrapper does not define falls through to the SDK's stream.
4. A server that breaks the Anthropic streaming protocol is named as such. Every
   Messages stream starts with ``message_start``; a server that starts with
   ``content_block_start`` instead (llama.cpp's ``llama-server`` does in some streams)
   makes the SDK fail with a bare ``AssertionError`` from ``get_final_message()`` (the
   text deltas still arrive), or with ``RuntimeError("Unexpected event order...")``
   while iterating. The wrapper raises an :class:`~labkit.errors.UpstreamError`
   (``kind="protocol_error"``) that says the server sent no ``message_start`` instead,
   and records it in ``timing.error``.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..errors import UpstreamError
from ..tokens import count_tokens
from .events import _get, finish, observe_event, usage_counts
from .records import CallTiming, StreamEvent, StreamTiming
from .transport import adopt_transport_stamps

__all__ = ["AsyncTimedStream", "TimedStream", "atimed_call", "timed", "timed_call"]


def protocol_error(exc: BaseException, inner: Any, timing: StreamTiming) -> UpstreamError | None:
    """An UpstreamError naming the broken protocol, when ``exc`` is the SDK's reaction to
    an Anthropic stream without ``message_start`` (note 4); else None."""
    if not type(inner).__module__.startswith("anthropic"):
        return None
    if any(e.type == "message_start" for e in timing.events):
        return None
    said = str(exc)
    if not (
        isinstance(exc, AssertionError)
        or (isinstance(exc, RuntimeError) and "message_start" in said)
    ):
        return None
    got = re.search(r"got (\w+)", said)
    first = got.group(1) if got else timing.events[0].type if timing.events else "its events"
    return UpstreamError(
        f"The server broke the Anthropic streaming protocol: it sent {first} before any "
        "message_start (every Messages stream starts with message_start).",
        hint="That is the server's bug (llama.cpp's llama-server does it in some streams): "
        "resend the request, or use a server that keeps the protocol (labkit local-api).",
        kind="protocol_error",
        status=502,
    )


class _TimedBase:
    """Shared by the sync and async proxies: attributes fall through to the SDK stream."""

    _FINALIZERS: tuple[str, ...] = ()

    def __init__(self, inner: Any, timing: StreamTiming, stamps: dict[str, int] | None) -> None:
        self._inner = inner
        self.timing = timing
        self._stamps = stamps
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _broken(self, exc: AssertionError) -> None:
        """Raise the protocol error ``exc`` stands for (note 4), recorded; else return."""
        broken = protocol_error(exc, self._inner, self.timing)
        if broken is not None:
            self.timing.error = type(broken).__name__
            raise broken from exc

    def _finish(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        now = time.perf_counter_ns()
        if self._stamps:
            self.timing.first_byte_ns = self._stamps.get("first_byte_ns")
            self.timing.last_byte_ns = self._stamps.get("last_byte_ns")
        finish(self.timing, now, error)


class TimedStream(_TimedBase):
    """A sync SDK stream whose events are timed as they are consumed."""

    def _observed(self) -> Iterator[tuple[Any, StreamEvent | None]]:
        it = iter(self._inner)
        timing = self.timing
        while True:
            try:
                event = next(it)
            except StopIteration:
                self._finish()
                return
            except BaseException as exc:
                broken = protocol_error(exc, self._inner, timing)
                self._finish(broken or exc)
                if broken is not None:
                    raise broken from exc
                raise
            yield event, observe_event(timing, event, time.perf_counter_ns())

    def __iter__(self) -> Iterator[Any]:
        for event, _ in self._observed():
            yield event

    @property
    def text_stream(self) -> Iterator[str]:
        """The text deltas, as the SDK's ``text_stream`` yields them, but timed."""
        for _, rec in self._observed():
            if rec is not None and rec.kind == "text":
                yield rec.text

    def until_done(self) -> Any:
        for _ in self:
            pass
        return self

    def _drained(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.until_done()
            try:
                return getattr(self._inner, name)(*args, **kwargs)
            except AssertionError as exc:
                self._broken(exc)
                raise

        return call

    def get_final_message(self) -> Any:
        return self._drained("get_final_message")()

    def get_final_text(self) -> str:
        return self._drained("get_final_text")()

    def get_final_completion(self) -> Any:
        return self._drained("get_final_completion")()

    def close(self) -> None:
        if hasattr(self._inner, "close"):
            self._inner.close()
        self._finish()


class AsyncTimedStream(_TimedBase):
    """An async SDK stream whose events are timed as they are consumed."""

    async def _observed(self) -> AsyncIterator[tuple[Any, StreamEvent | None]]:
        it = self._inner.__aiter__()
        timing = self.timing
        while True:
            try:
                event = await it.__anext__()
            except StopAsyncIteration:
                self._finish()
                return
            except BaseException as exc:
                broken = protocol_error(exc, self._inner, timing)
                self._finish(broken or exc)
                if broken is not None:
                    raise broken from exc
                raise
            yield event, observe_event(timing, event, time.perf_counter_ns())

    async def __aiter__(self) -> AsyncIterator[Any]:
        async for event, _ in self._observed():
            yield event

    @property
    def text_stream(self) -> AsyncIterator[str]:
        """The text deltas, as the SDK's ``text_stream`` yields them, but timed."""

        async def gen() -> AsyncIterator[str]:
            async for _, rec in self._observed():
                if rec is not None and rec.kind == "text":
                    yield rec.text

        return gen()

    async def until_done(self) -> Any:
        async for _ in self:
            pass
        return self

    async def get_final_message(self) -> Any:
        await self.until_done()
        try:
            return await self._inner.get_final_message()
        except AssertionError as exc:
            self._broken(exc)
            raise

    async def get_final_text(self) -> str:
        await self.until_done()
        try:
            return await self._inner.get_final_text()
        except AssertionError as exc:
            self._broken(exc)
            raise

    async def get_final_completion(self) -> Any:
        await self.until_done()
        try:
            return await self._inner.get_final_completion()
        except AssertionError as exc:
            self._broken(exc)
            raise

    async def close(self) -> None:
        closer = getattr(self._inner, "close", None) or getattr(self._inner, "aclose", None)
        if closer is not None:
            res = closer()
            if inspect.isawaitable(res):
                await res
        self._finish()


class timed:
    """Time a stream: ``with timed(client.messages.stream(...)) as stream`` (or
    ``async with``). Accepts an SDK stream manager (Anthropic ``messages.stream``,
    OpenAI ``chat.completions.stream``), a zero-argument callable returning a stream
    or manager (``lambda: client.chat.completions.create(..., stream=True)``), or an
    already-open stream (see note 1 of this module). The yielded object is the SDK stream
    with ``.timing`` (a :class:`StreamTiming`) and timed iteration."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self._manager: Any = None
        self._proxy: Any = None
        self.timing = StreamTiming()

    def _open_sync(self) -> Any:
        src = self._source
        sent = time.perf_counter_ns()
        late = False
        if callable(src) and not hasattr(src, "__enter__") and not hasattr(src, "__iter__"):
            src = src()
        if hasattr(src, "__enter__") and not hasattr(src, "__iter__"):
            self._manager = src
            stream = src.__enter__()
        else:
            stream = src
            late = src is self._source
        self.timing.sent_ns, self.timing.headers_ns = sent, time.perf_counter_ns()
        self.timing.sent_source = "late" if late else "wrapper"
        stamps = adopt_transport_stamps(self.timing, stream)
        return TimedStream(stream, self.timing, stamps)

    async def _open_async(self) -> Any:
        src = self._source
        sent = time.perf_counter_ns()
        late = False
        if callable(src) and not hasattr(src, "__aenter__") and not hasattr(src, "__aiter__"):
            src = src()
        if inspect.isawaitable(src):
            src = await src
        if hasattr(src, "__aenter__") and not hasattr(src, "__aiter__"):
            self._manager = src
            stream = await src.__aenter__()
        else:
            stream = src
            late = src is self._source
        self.timing.sent_ns, self.timing.headers_ns = sent, time.perf_counter_ns()
        self.timing.sent_source = "late" if late else "wrapper"
        stamps = adopt_transport_stamps(self.timing, stream)
        return AsyncTimedStream(stream, self.timing, stamps)

    def __enter__(self) -> TimedStream:
        self._proxy = self._open_sync()
        return self._proxy

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if self._manager is not None:
                self._manager.__exit__(exc_type, exc, tb)
            elif hasattr(self._proxy._inner, "close"):
                self._proxy._inner.close()
        finally:
            self._proxy._finish(exc)

    async def __aenter__(self) -> AsyncTimedStream:
        self._proxy = await self._open_async()
        return self._proxy

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            if self._manager is not None:
                await self._manager.__aexit__(exc_type, exc, tb)
            else:
                closer = getattr(self._proxy._inner, "close", None)
                if closer is not None:
                    res = closer()
                    if inspect.isawaitable(res):
                        await res
        finally:
            self._proxy._finish(exc)


def _text_of(result: Any) -> str:
    content = _get(result, "content")
    if isinstance(content, list):
        return "".join(_get(b, "text", "") or "" for b in content)
    choices = _get(result, "choices") or []
    return "".join(_get(_get(c, "message"), "content", "") or "" for c in choices)


def _call_timing(result: Any, sent: int, end: int) -> CallTiming:
    usage = usage_counts(_get(result, "usage"))
    t = CallTiming(
        sent_ns=sent,
        end_ns=end,
        input_tokens=usage.get("input_tokens"),
        cached_tokens=usage.get("cached_tokens"),
    )
    if "output_tokens" in usage:
        t.output_tokens, t.output_tokens_source = usage["output_tokens"], "server_usage"
    else:
        text = _text_of(result)
        if text:
            t.output_tokens, t.output_tokens_source = count_tokens(text), "tiktoken_estimate"
    return t


def timed_call(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> tuple[Any, CallTiming]:
    """Call a non-streaming SDK method (``client.messages.create``…) and time it:
    returns ``(result, CallTiming)``."""
    sent = time.perf_counter_ns()
    result = func(*args, **kwargs)
    end = time.perf_counter_ns()
    return result, _call_timing(result, sent, end)


async def atimed_call(
    func: Callable[..., Any], /, *args: Any, **kwargs: Any
) -> tuple[Any, CallTiming]:
    """Async :func:`timed_call` for the async clients."""
    sent = time.perf_counter_ns()
    result = await func(*args, **kwargs)
    end = time.perf_counter_ns()
    return result, _call_timing(result, sent, end)
