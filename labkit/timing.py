"""Timing a streamed LLM reply: timestamps, TTFT, ITL, TPOT, e2e, tokens/s.

Wrap the official SDK stream helpers without changing how the code reads::

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
request is timed with :func:`timed_call`.

Definitions (``design.md``; every raw timestamp is kept so any other can be recomputed)
---------------------------------------------------------------------------------------
All times are ``time.perf_counter_ns()`` in this process.

- **TTFT** = first *non-empty text delta* − request sent. Time to the first byte of
  the body (``ttfb_ms``), to the first SSE event (``ttfe_ms``) and to the response
  headers (``headers_ms``) are reported separately, never called TTFT.
- **ITL** = gaps between consecutive text deltas after the first (mean, p50, p99).
  One delta is one SSE event carrying text; with these APIs it is usually one token.
- **TPOT** = (last text delta − first text delta) / (output tokens − 1): excludes TTFT.
- **e2e** = request sent → end of the stream (the SDK's iterator is exhausted).
- **output tokens/s** = output tokens / e2e; ``decode_tps`` = 1000 / TPOT.
- Output tokens come from the server's usage (``output_tokens_source="server_usage"``:
  Anthropic's ``message_delta.usage.output_tokens``, OpenAI's usage chunk); when the
  server sends none they are estimated with tiktoken cl100k (``"tiktoken_estimate"``).

How the field's tools differ (checked against their source and docs, Nov 2026):

- **vLLM ``bench serve``** (``endpoint_request_func.py``, chat): TTFT is stamped at the
  first chunk that has ``choices``, *even when its content is empty* — so OpenAI's
  role-only first chunk ends TTFT there, earlier than here. Its ITL is the gap
  between every chunk after that one; its TPOT = (latency − TTFT) / (output tokens − 1),
  excluding TTFT, as here; latency ends at the last chunk.
- **GuideLLM**: TTFT to the first token; ``inter_token_latency_ms`` =
  (last − first token) / (output tokens − 1) (this module's TPOT), but its
  ``time_per_output_token_ms`` divides the same span by *all* output tokens, i.e. it
  counts the first token in the denominator, so it is smaller than TPOT here.
- **NVIDIA AIPerf**: TTFT = first *non-empty* response − request start (as here);
  ``inter_token_latency`` = (request latency − TTFT) / (output sequence length − 1)
  with tokens counted by *its own tokenizer*, so it matches TPOT here only when its
  tokenizer agrees with the server's count; ``inter_chunk_latency`` is the per-chunk
  gap list (this module's ITL samples).

Notes:

1. Request-sent and response-headers times. Without help, :func:`timed` stamps
   "sent" just before it enters the SDK's stream manager (or calls the callable
   you pass), and "headers" when that returns — the SDKs return from ``__enter__``
   once the response headers are in. :func:`instrument` adds httpx *event hooks* to
   the SDK client's own httpx client; the ``request`` hook stamps the request as it
   leaves for the transport, the ``response`` hook stamps the headers and wraps the
   body stream to stamp the first and last body bytes. The stamps travel on the
   request's ``extensions`` dict, so concurrent requests on one client never mix.
   ``sent_source`` says which was used ("httpx_hook" or "wrapper").
2. An already-created ``Stream`` (``chat.completions.create(stream=True)``) has sent
   its request before :func:`timed` sees it: pass a callable (``lambda: ...``) or
   instrument the client; otherwise ``sent_source="late"`` and TTFT is understated.
3. Timestamps are taken when the SDK hands an event to the caller; iterate promptly.
   Events are observed through the helper's own iterator (``text_stream``,
   ``get_final_message()`` and friends drain through the wrapper first), so the SDK's
   accumulation — ``get_final_message()``, tool input parsing — works unchanged.
4. Pure parts (:func:`observe_event`, :func:`percentile`, the derived properties,
   :meth:`StreamTiming.row`) need no server and are unit-tested on their own.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AsyncTimedStream",
    "CallTiming",
    "Prompt",
    "StreamEvent",
    "StreamTiming",
    "TimedStream",
    "atimed_call",
    "instrument",
    "load_prompts",
    "measure_call",
    "measure_stream",
    "observe_event",
    "per_prompt_table",
    "percentile",
    "run_trials",
    "summarize",
    "timed",
    "timed_call",
]

_NS = 1_000_000  # ns per ms
_EXT_KEY = "labkit_timing"
_ANTHROPIC_HELPER_EVENTS = {"text", "citation", "thinking", "signature", "input_json"}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) with linear interpolation (numpy's default method,
    which vLLM ``bench serve`` uses). None for an empty sequence."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(a: int | None, b: int | None) -> float | None:
    """Milliseconds from stamp a to stamp b, or None if either is missing."""
    if a is None or b is None:
        return None
    return (b - a) / _NS


@dataclass
class StreamEvent:
    """One streamed event as the wrapper received it from the SDK."""

    t_ns: int
    """``perf_counter_ns()`` when the SDK handed the event over."""
    type: str
    """Wire event name: ``message_start``, ``content_block_delta``… (Anthropic) or
    ``chunk`` (OpenAI ``chat.completion.chunk``)."""
    kind: str
    """``"text"`` (a non-empty text delta), ``"tool_input"`` (a piece of a tool call's
    JSON input), ``"usage"`` (carries token usage) or ``"other"``."""
    text: str = ""
    """The text or JSON piece this event carried ("" if none)."""


@dataclass
class StreamTiming:
    """Raw timestamps of one streamed request and the metrics derived from them."""

    api: str = ""
    """Wire format observed: ``"anthropic"`` or ``"openai"``."""
    sent_ns: int | None = None
    """Request sent (see module note 1 for what exactly is stamped)."""
    sent_source: str = "wrapper"
    """Where ``sent_ns`` came from: ``"httpx_hook"``, ``"wrapper"`` or ``"late"``."""
    headers_ns: int | None = None
    """Response status line and headers received."""
    first_byte_ns: int | None = None
    """First body byte read (only with :func:`instrument`)."""
    last_byte_ns: int | None = None
    """Last body byte read (only with :func:`instrument`)."""
    first_event_ns: int | None = None
    """First SSE event of any kind (``message_start`` / the role chunk)."""
    first_text_ns: int | None = None
    """First non-empty text delta: the end of TTFT."""
    text_ns: list[int] = field(default_factory=list)
    """Arrival of every non-empty text delta, in order."""
    first_delta_ns: int | None = None
    """First content delta of any kind, text or tool input (TTFT for tool calls)."""
    end_ns: int | None = None
    """End of the stream: the SDK's iterator was exhausted (or failed/closed)."""
    events: list[StreamEvent] = field(default_factory=list)
    """Every event seen, with its timestamp (the raw material of all the above)."""
    text: str = ""
    """All text deltas joined."""
    output_tokens: int | None = None
    """Output tokens of the reply (see ``output_tokens_source``)."""
    output_tokens_source: str = ""
    """``"server_usage"`` or ``"tiktoken_estimate"`` (cl100k over ``text``)."""
    input_tokens: int | None = None
    """Input tokens as reported by the server's usage, if it sent them."""
    status_code: int | None = None
    """HTTP status of the response, when known."""
    error: str | None = None
    """Exception class name if the stream failed mid-way, else None."""

    # ── derived ──────────────────────────────────────────────────────────────
    @property
    def last_text_ns(self) -> int | None:
        """Arrival of the last non-empty text delta."""
        return self.text_ns[-1] if self.text_ns else None

    @property
    def ttft_ms(self) -> float | None:
        """Request sent → first non-empty text delta."""
        return _ms(self.sent_ns, self.first_text_ns)

    @property
    def ttfb_ms(self) -> float | None:
        """Request sent → first body byte."""
        return _ms(self.sent_ns, self.first_byte_ns)

    @property
    def ttfe_ms(self) -> float | None:
        """Request sent → first SSE event."""
        return _ms(self.sent_ns, self.first_event_ns)

    @property
    def headers_ms(self) -> float | None:
        """Request sent → response headers."""
        return _ms(self.sent_ns, self.headers_ns)

    @property
    def e2e_ms(self) -> float | None:
        """Request sent → end of stream."""
        return _ms(self.sent_ns, self.end_ns)

    @property
    def itl_ms(self) -> list[float]:
        """Gaps between consecutive text deltas (ms)."""
        return [(b - a) / _NS for a, b in zip(self.text_ns, self.text_ns[1:], strict=False)]

    @property
    def itl_mean_ms(self) -> float | None:
        gaps = self.itl_ms
        return sum(gaps) / len(gaps) if gaps else None

    @property
    def itl_p50_ms(self) -> float | None:
        return percentile(self.itl_ms, 50)

    @property
    def itl_p99_ms(self) -> float | None:
        return percentile(self.itl_ms, 99)

    @property
    def tpot_ms(self) -> float | None:
        """(last − first text delta) / (output tokens − 1); excludes TTFT."""
        n = self.output_tokens
        span = _ms(self.first_text_ns, self.last_text_ns)
        if span is None or n is None or n < 2:
            return None
        return span / (n - 1)

    @property
    def output_tps(self) -> float | None:
        """Output tokens / e2e seconds."""
        e2e = self.e2e_ms
        if not e2e or self.output_tokens is None:
            return None
        return self.output_tokens / (e2e / 1000)

    @property
    def decode_tps(self) -> float | None:
        """1000 / TPOT: the decode rate once text flows."""
        tpot = self.tpot_ms
        return 1000 / tpot if tpot else None

    @property
    def n_text_deltas(self) -> int:
        return len(self.text_ns)

    def row(self) -> dict[str, Any]:
        """A flat dict for one CSV row: every raw stamp (ns, relative to ``sent_ns``)
        and every derived metric (ms), so a peer's definition can be recomputed."""
        base = self.sent_ns

        def rel(ns: int | None) -> int | None:
            return None if ns is None or base is None else ns - base

        return {
            "api": self.api,
            "sent_source": self.sent_source,
            "status_code": self.status_code,
            "error": self.error or "",
            "sent_ns": self.sent_ns,
            "headers_rel_ns": rel(self.headers_ns),
            "first_byte_rel_ns": rel(self.first_byte_ns),
            "first_event_rel_ns": rel(self.first_event_ns),
            "first_text_rel_ns": rel(self.first_text_ns),
            "last_text_rel_ns": rel(self.last_text_ns),
            "last_byte_rel_ns": rel(self.last_byte_ns),
            "end_rel_ns": rel(self.end_ns),
            "text_rel_ns": " ".join(str(rel(t)) for t in self.text_ns),
            "n_events": len(self.events),
            "n_text_deltas": self.n_text_deltas,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "output_tokens_source": self.output_tokens_source,
            "headers_ms": self.headers_ms,
            "ttfb_ms": self.ttfb_ms,
            "ttfe_ms": self.ttfe_ms,
            "ttft_ms": self.ttft_ms,
            "itl_mean_ms": self.itl_mean_ms,
            "itl_p50_ms": self.itl_p50_ms,
            "itl_p99_ms": self.itl_p99_ms,
            "tpot_ms": self.tpot_ms,
            "e2e_ms": self.e2e_ms,
            "output_tps": self.output_tps,
        }

    def event_table(self) -> list[dict[str, Any]]:
        """The events as rows (``t_ms`` since request sent), for a DataFrame."""
        base = self.sent_ns if self.sent_ns is not None else (
            self.events[0].t_ns if self.events else 0)
        return [
            {"t_ms": (e.t_ns - base) / _NS, "type": e.type, "kind": e.kind, "text": e.text}
            for e in self.events
        ]


@dataclass
class CallTiming:
    """Timing of one non-streaming request."""

    sent_ns: int
    """Just before the SDK method was called."""
    end_ns: int
    """When the SDK method returned the parsed reply."""
    output_tokens: int | None = None
    """Output tokens from the reply's usage (or the tiktoken estimate)."""
    output_tokens_source: str = ""
    """``"server_usage"`` or ``"tiktoken_estimate"``."""
    input_tokens: int | None = None
    """Input tokens from the reply's usage, if present."""

    @property
    def e2e_ms(self) -> float:
        """Request sent → full reply parsed."""
        return (self.end_ns - self.sent_ns) / _NS

    @property
    def output_tps(self) -> float | None:
        if self.output_tokens is None or self.e2e_ms <= 0:
            return None
        return self.output_tokens / (self.e2e_ms / 1000)

    def row(self) -> dict[str, Any]:
        return {
            "sent_ns": self.sent_ns,
            "end_rel_ns": self.end_ns - self.sent_ns,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "output_tokens_source": self.output_tokens_source,
            "e2e_ms": self.e2e_ms,
            "output_tps": self.output_tps,
        }


# ── pure accumulation ─────────────────────────────────────────────────────────


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _classify(event: Any) -> tuple[str, str, str, dict[str, int]] | None:
    """(wire type, kind, text, usage) of an SDK event, or None for helper-only events
    that repeat a raw event already seen (Anthropic ``text``, OpenAI ``content.delta``…)."""
    etype = _get(event, "type", None)
    if etype in _ANTHROPIC_HELPER_EVENTS:
        return None
    usage: dict[str, int] = {}
    # OpenAI helper: ChunkEvent(type="chunk", chunk=ChatCompletionChunk); other helper events skip.
    if etype == "chunk":
        event = _get(event, "chunk")
        etype = None
    if etype is None:  # an OpenAI ChatCompletionChunk (object == "chat.completion.chunk")
        if _get(event, "object") != "chat.completion.chunk":
            return None
        u = _get(event, "usage")
        if u is not None:
            if _get(u, "completion_tokens") is not None:
                usage["output_tokens"] = int(_get(u, "completion_tokens"))
            if _get(u, "prompt_tokens") is not None:
                usage["input_tokens"] = int(_get(u, "prompt_tokens"))
        kind, text = ("usage" if usage else "other"), ""
        for choice in _get(event, "choices") or []:
            delta = _get(choice, "delta")
            content = _get(delta, "content") if delta is not None else None
            if content:
                kind, text = "text", text + content
            elif delta is not None and _get(delta, "tool_calls"):
                pieces = [
                    _get(_get(tc, "function"), "arguments") or ""
                    for tc in _get(delta, "tool_calls")
                    if _get(tc, "function") is not None
                ]
                if kind != "text":
                    kind, text = "tool_input", "".join(pieces)
        return "chunk", kind, text, usage
    if not isinstance(etype, str) or "." in etype or etype in _ANTHROPIC_HELPER_EVENTS:
        return None
    kind, text = "other", ""
    if etype == "content_block_delta":
        delta = _get(event, "delta")
        dtype = _get(delta, "type")
        if dtype == "text_delta" and _get(delta, "text"):
            kind, text = "text", _get(delta, "text")
        elif dtype == "input_json_delta":
            kind, text = "tool_input", _get(delta, "partial_json") or ""
    elif etype == "message_start":
        u = _get(_get(event, "message"), "usage")
        if u is not None and _get(u, "input_tokens") is not None:
            usage["input_tokens"] = int(_get(u, "input_tokens"))
            kind = "usage"
    elif etype == "message_delta":
        u = _get(event, "usage")
        if u is not None and _get(u, "output_tokens") is not None:
            usage["output_tokens"] = int(_get(u, "output_tokens"))
            kind = "usage"
    return etype, kind, text, usage


def observe_event(timing: StreamTiming, event: Any, t_ns: int) -> StreamEvent | None:
    """Record one SDK event (Anthropic raw/helper event, OpenAI chunk or helper event)
    arriving at ``t_ns`` into ``timing``. Returns the recorded event, or None when the
    event only repeats one already recorded."""
    got = _classify(event)
    if got is None:
        return None
    etype, kind, text, usage = got
    if not timing.api:
        timing.api = "openai" if etype == "chunk" else "anthropic"
    ev = StreamEvent(t_ns=t_ns, type=etype, kind=kind, text=text)
    timing.events.append(ev)
    if timing.first_event_ns is None:
        timing.first_event_ns = t_ns
    if kind in ("text", "tool_input") and text and timing.first_delta_ns is None:
        timing.first_delta_ns = t_ns
    if kind == "text":
        if timing.first_text_ns is None:
            timing.first_text_ns = t_ns
        timing.text_ns.append(t_ns)
        timing.text += text
    if "output_tokens" in usage:
        timing.output_tokens = usage["output_tokens"]
        timing.output_tokens_source = "server_usage"
    if "input_tokens" in usage:
        timing.input_tokens = usage["input_tokens"]
    return ev


def finish(timing: StreamTiming, t_ns: int, error: BaseException | None = None) -> None:
    """Close the record: stamp the end, note an error, estimate tokens if the server
    sent no usage."""
    if timing.end_ns is None:
        timing.end_ns = t_ns
    if error is not None and timing.error is None:
        timing.error = type(error).__name__
    if timing.output_tokens is None and timing.text:
        from .tokens import count_tokens

        timing.output_tokens = count_tokens(timing.text)
        timing.output_tokens_source = "tiktoken_estimate"


def summarize(values: Iterable[float | None]) -> dict[str, float | None]:
    """median, p10, p90, mean, min, max and n of the non-None values."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return {
        "n": len(xs),
        "median": percentile(xs, 50),
        "p10": percentile(xs, 10),
        "p90": percentile(xs, 90),
        "mean": sum(xs) / len(xs) if xs else None,
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
    }


# ── httpx instrumentation (module note 1) ────────────────────────────────────


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
    client, in place, once; returns the client. See module note 1."""
    http = getattr(client, "_client", None)
    if http is None or not hasattr(http, "event_hooks"):
        from .errors import ConfigurationError

        raise ConfigurationError(
            f"Cannot instrument {type(client).__name__}: it has no httpx client.",
            hint="Pass an anthropic.Anthropic/AsyncAnthropic or openai.OpenAI/AsyncOpenAI client.",
        )
    hooks = http.event_hooks
    # The SDKs use httpx (or its fork httpx2, anthropic>=2.14/openai>=3.57); both have
    # the same event-hook API. An async client's hooks must be coroutines.
    is_async = hasattr(http, "aclose")
    req_hook, resp_hook = (_aon_request, _aon_response) if is_async else (_on_request, _on_response)
    if req_hook not in hooks["request"]:
        http.event_hooks = {
            "request": [*hooks["request"], req_hook],
            "response": [*hooks["response"], resp_hook],
        }
    return client


# ── the wrappers ──────────────────────────────────────────────────────────────


def _response_of(stream: Any) -> Any:
    for name in ("response", "_response"):
        resp = getattr(stream, name, None)
        if resp is not None and hasattr(resp, "status_code"):
            return resp
    raw = getattr(stream, "_raw_stream", None)
    return getattr(raw, "response", None) if raw is not None else None


def _adopt_transport_stamps(timing: StreamTiming, stream: Any) -> dict[str, int] | None:
    resp = _response_of(stream)
    if resp is None:
        return None
    timing.status_code = getattr(resp, "status_code", None)
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
                self._finish(exc)
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
            return getattr(self._inner, name)(*args, **kwargs)

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
                self._finish(exc)
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
        return await self._inner.get_final_message()

    async def get_final_text(self) -> str:
        await self.until_done()
        return await self._inner.get_final_text()

    async def get_final_completion(self) -> Any:
        await self.until_done()
        return await self._inner.get_final_completion()

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
    already-open stream (see module note 2). The yielded object is the SDK stream
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
        stamps = _adopt_transport_stamps(self.timing, stream)
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
        stamps = _adopt_transport_stamps(self.timing, stream)
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


def _usage_of(result: Any) -> tuple[int | None, int | None]:
    u = _get(result, "usage")
    if u is None:
        return None, None
    out = _get(u, "output_tokens", None)
    if out is None:
        out = _get(u, "completion_tokens", None)
    inp = _get(u, "input_tokens", None)
    if inp is None:
        inp = _get(u, "prompt_tokens", None)
    return out, inp


def _text_of(result: Any) -> str:
    content = _get(result, "content")
    if isinstance(content, list):
        return "".join(_get(b, "text", "") or "" for b in content)
    choices = _get(result, "choices") or []
    return "".join(_get(_get(c, "message"), "content", "") or "" for c in choices)


def _call_timing(result: Any, sent: int, end: int) -> CallTiming:
    out, inp = _usage_of(result)
    t = CallTiming(sent_ns=sent, end_ns=end, input_tokens=inp)
    if out is not None:
        t.output_tokens, t.output_tokens_source = int(out), "server_usage"
    else:
        text = _text_of(result)
        if text:
            from .tokens import count_tokens

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


# ── Lab 1 runner: prompts × trials, streamed and not (used by `labkit ttft`) ─────


@dataclass
class Prompt:
    """One Lab 1 prompt."""

    id: str
    """Short name shown in tables."""
    prompt: str
    """The user message."""
    max_tokens: int
    """Cap on the reply, sized to the output length this prompt aims for."""
    system: str | None = None
    """Optional system prompt (e.g. a long shared prefix for the caching experiment)."""


def default_prompts_path() -> Path:
    """``data/lab1_prompts.jsonl`` at the top of the labkit checkout."""
    here = Path(__file__).resolve().parent.parent / "data" / "lab1_prompts.jsonl"
    if here.exists():
        return here
    from .results import results_dir

    return results_dir().parent / "data" / "lab1_prompts.jsonl"


def load_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Read a JSON-lines prompts file (``id``, ``prompt``, ``max_tokens`` per line)."""
    import json

    from .errors import ConfigurationError

    p = Path(path) if path is not None else default_prompts_path()
    if not p.exists():
        raise ConfigurationError(f"Prompts file not found: {p}",
                                 hint="Pass --prompts FILE (JSON lines: id, prompt, max_tokens).")
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            prompts.append(Prompt(str(d["id"]), str(d["prompt"]), int(d["max_tokens"]),
                                  d.get("system")))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"{p}:{n}: not a prompt line ({exc}).",
                hint='Each line must be JSON like {"id": "short", "prompt": "...", "max_tokens": 64}.',
            ) from exc
    if not prompts:
        raise ConfigurationError(f"{p} holds no prompts.", hint="Add one JSON object per line.")
    return prompts


def _request_kwargs(clients: Any, api: str, prompt: Prompt, cache: bool,
                    extra_headers: dict[str, str] | None) -> dict[str, Any]:
    headers = dict(extra_headers or {})
    if not cache and (getattr(clients, "provider", "") == "local" or getattr(clients, "base_url", None)):
        # labkit's local API honours it whichever SDK reaches it (also behind
        # LABKIT_PROVIDER=anthropic|openai with a base URL); other servers ignore it.
        headers["x-labkit-cache"] = "off"
    messages: list[dict[str, Any]] = [{"role": "user", "content": prompt.prompt}]
    kw: dict[str, Any] = {"model": clients.model, "max_tokens": prompt.max_tokens}
    if prompt.system and api == "anthropic":
        kw["system"] = prompt.system
    elif prompt.system:
        messages.insert(0, {"role": "system", "content": prompt.system})
    kw["messages"] = messages
    if headers:
        kw["extra_headers"] = headers
    if api == "anthropic":
        kw["extra_body"] = {"temperature": 0}
    else:
        kw["temperature"] = 0
    return kw


def measure_stream(clients: Any, prompt: Prompt, *, api: str = "anthropic", cache: bool = False,
                   extra_headers: dict[str, str] | None = None) -> StreamTiming:
    """One streamed request for ``prompt``; returns its :class:`StreamTiming`."""
    kw = _request_kwargs(clients, api, prompt, cache, extra_headers)
    if api == "anthropic":
        source: Any = instrument(clients.anthropic).messages.stream(**kw)
    else:
        oc = instrument(clients.openai)
        source = lambda: oc.chat.completions.create(  # noqa: E731
            stream=True, stream_options={"include_usage": True}, **kw)
    ctx = timed(source)
    try:
        with ctx as stream:
            for _ in stream.text_stream:
                pass
    except Exception as exc:  # recorded in the row (``error``); the run goes on
        finish(ctx.timing, time.perf_counter_ns(), exc)
    return ctx.timing


def measure_call(clients: Any, prompt: Prompt, *, api: str = "anthropic", cache: bool = False,
                 extra_headers: dict[str, str] | None = None) -> CallTiming:
    """One non-streaming request for ``prompt``; returns its :class:`CallTiming`."""
    kw = _request_kwargs(clients, api, prompt, cache, extra_headers)
    if api == "anthropic":
        return timed_call(clients.anthropic.messages.create, **kw)[1]
    return timed_call(clients.openai.chat.completions.create, **kw)[1]


def run_trials(
    clients: Any,
    prompts: Sequence[Prompt],
    *,
    trials: int = 3,
    warmup: int = 1,
    concurrency: int = 1,
    cache: bool = False,
    api: str | None = None,
    non_stream: bool = True,
    extra_headers: dict[str, str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every prompt ``trials`` times streamed (and, with ``non_stream``, not
    streamed), after ``warmup`` unrecorded requests; ``concurrency`` requests in
    flight at once (a closed loop of worker threads). One row per request: the
    prompt, mode, trial, settings and every field of :meth:`StreamTiming.row`."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from .errors import ConfigurationError

    if trials < 1 or warmup < 0 or concurrency < 1:
        raise ConfigurationError(
            f"trials={trials}, warmup={warmup}, concurrency={concurrency} is not a run.",
            hint="Use trials >= 1, warmup >= 0 and concurrency >= 1.")
    api = api or ("openai" if getattr(clients, "provider", "") == "openai" else "anthropic")
    for i in range(warmup):
        measure_stream(clients, prompts[i % len(prompts)], api=api, cache=cache,
                       extra_headers=extra_headers)
    jobs = [(t, p, mode) for t in range(trials) for p in prompts
            for mode in (("stream", "non_stream") if non_stream else ("stream",))]
    base = {"provider": getattr(clients, "provider", ""), "model": getattr(clients, "model", ""),
            "api": api, "cache": "on" if cache else "off", "concurrency": concurrency}

    def one(job: tuple[int, Prompt, str]) -> dict[str, Any]:
        trial, prompt, mode = job
        row: dict[str, Any] = {**base, "prompt_id": prompt.id, "max_tokens": prompt.max_tokens,
                               "trial": trial, "mode": mode, "error": ""}
        if mode == "stream":
            row.update(measure_stream(clients, prompt, api=api, cache=cache,
                                      extra_headers=extra_headers).row())
        else:
            try:
                row.update(measure_call(clients, prompt, api=api, cache=cache,
                                        extra_headers=extra_headers).row())
            except Exception as exc:
                row["error"] = type(exc).__name__
        row["api"] = api
        return row

    bar = tqdm(total=len(jobs), desc=f"ttft ×{concurrency}", disable=not progress, leave=False)
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for row in pool.map(one, jobs):
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def per_prompt_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lab 1's table from :func:`run_trials` rows: per prompt, medians and p10/p90 of
    stream TTFT, stream total and non-stream total; output tokens (median) and the
    TTFT speedup (non-stream total / stream TTFT, medians)."""
    order: list[str] = []
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("error"):
            continue
        if r["prompt_id"] not in by:
            order.append(r["prompt_id"])
        by.setdefault(r["prompt_id"], []).append(r)
    table = []
    for pid in order:
        rs = by[pid]
        stream = [r for r in rs if r["mode"] == "stream"]
        plain = [r for r in rs if r["mode"] == "non_stream"]
        ttft = summarize(r.get("ttft_ms") for r in stream)
        total = summarize(r.get("e2e_ms") for r in stream)
        nst = summarize(r.get("e2e_ms") for r in plain)
        toks = summarize(r.get("output_tokens") for r in stream)
        itl = summarize(r.get("itl_p50_ms") for r in stream)
        speedup = (nst["median"] / ttft["median"]) if nst["median"] and ttft["median"] else None
        table.append({
            "prompt": pid,
            "output_tokens": toks["median"],
            "stream_ttft_ms": ttft["median"], "stream_ttft_p10": ttft["p10"],
            "stream_ttft_p90": ttft["p90"],
            "stream_total_ms": total["median"], "stream_total_p10": total["p10"],
            "stream_total_p90": total["p90"],
            "non_stream_total_ms": nst["median"], "non_stream_total_p10": nst["p10"],
            "non_stream_total_p90": nst["p90"],
            "ttft_speedup": speedup,
            "itl_p50_ms": itl["median"],
            "n": ttft["n"],
        })
    return table
