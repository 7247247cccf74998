"""Timing records and their maths: raw timestamps in, TTFT, ITL, TPOT, e2e, tokens/s out.

Definitions (the README's "Words"; every raw timestamp is kept so any other can be
recomputed). All times are ``time.perf_counter_ns()`` in this process.

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
- **Input tokens** are every prompt token the server read, cached or not (as
  :mod:`labkit.upstream` counts them, its note 2); ``cached_tokens`` is the part a
  prompt cache served. Anthropic reports cache reads apart from ``input_tokens``, so
  they are added back here: the figure is the size of the prompt sent, whether or not
  a cache was warm.

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

Everything here is pure (no server, no SDK) and unit-tested on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallTiming", "StreamEvent", "StreamTiming", "percentile", "summarize"]

_NS = 1_000_000  # ns per ms


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
    """Request sent (see :mod:`labkit.timing.transport` for what exactly is stamped)."""
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
    """Every prompt token the server read, cached or not (from its usage, if it sent any)."""
    cached_tokens: int | None = None
    """Of ``input_tokens``, those served from the server's prompt cache (None: not reported)."""
    status_code: int | None = None
    """HTTP status of the response, when known."""
    server_cache: str | None = None
    """The prompt-cache state the server says it applied (its ``x-labkit-cache`` response
    header: ``"on"``/``"off"``, sent by labkit's local API); None when it did not say."""
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
            "server_cache": self.server_cache or "",
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
            "cached_tokens": self.cached_tokens,
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
        base = (
            self.sent_ns
            if self.sent_ns is not None
            else (self.events[0].t_ns if self.events else 0)
        )
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
    """Every prompt token the server read, cached or not (from the reply's usage, if present)."""
    cached_tokens: int | None = None
    """Of ``input_tokens``, those served from the server's prompt cache (None: not reported)."""

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
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "output_tokens_source": self.output_tokens_source,
            "e2e_ms": self.e2e_ms,
            "output_tps": self.output_tps,
        }


def summarize(values: Iterable[float | None]) -> dict[str, float | None]:
    """median, p10, p90, mean, min, max and n of the non-None values."""
    xs = [
        float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))
    ]
    return {
        "n": len(xs),
        "median": percentile(xs, 50),
        "p10": percentile(xs, 10),
        "p90": percentile(xs, 90),
        "mean": sum(xs) / len(xs) if xs else None,
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
    }
