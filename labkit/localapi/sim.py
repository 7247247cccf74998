"""The ``sim`` engine: deterministic text at a requested latency, with injectable faults.

It exists for what a real API cannot do on demand: known latency (ground truth for
the timing harness), mid-stream errors, rate limits, dropped connections, load. Its
options (:class:`SimOptions`) are the server's ``--ttft-ms …`` flags and, per request,
the keys of the ``x-labkit-sim`` header.

Notes on deliberate choices:

1. The sim engine sleeps to absolute ``perf_counter`` deadlines measured from the
   request's arrival (never cumulative sleeps), and, while few streams are active,
   spends the last 2 ms before a deadline yielding to the loop instead of trusting
   the loop's millisecond timer, so the first delta leaves on time.
2. Each field of :class:`SimOptions` carries its own help (``metadata["help"]``): the
   command line builds its sim flags from those fields, so a new option is added here
   once and appears as a flag, a header key and a ``LocalAPIServer`` keyword.
3. Its token counts are cl100k tokens of the ChatML rendering: the sim has no model of
   its own, and counts only need to be stable and plausible.
4. ``first_text_gap_ms`` holds :class:`Started` — and with it the response headers and
   the first SSE event (``message_start``, OpenAI's role-only chunk) — until
   ``ttft_ms - first_text_gap_ms`` after arrival, so the gap between the first event and
   the first text is known. A client that times the first event, or starts its clock once
   the stream is open, then measures a number different from the TTFT by a known amount
   (``labkit.exercises.check_ttft`` relies on it). Unset, the first event leaves at once.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..errors import ConfigurationError
from .constants import CONTEXT_WINDOW
from .engine import (
    ERROR_TYPES,
    DropConnection,
    EngineError,
    Event,
    Finished,
    GenerationRequest,
    Started,
    TextPiece,
    ToolInput,
    ToolStart,
    render_chatml,
)
from .metrics import Metrics
from .schema import example

__all__ = ["SimEngine", "SimOptions", "parse_sim_header", "sim_tool_input"]

#: What an injected error says (the sim engine's faults carry no message of their own).
_INJECTED_MESSAGES = {
    "invalid_request_error": "Invalid request (injected by the sim engine).",
    "authentication_error": "invalid x-api-key (injected by the sim engine)",
    "billing_error": "Your credit balance is too low (injected by the sim engine).",
    "permission_error": "Your API key does not have permission (injected by the sim engine).",
    "not_found_error": "Not found (injected by the sim engine).",
    "request_too_large": "Request exceeds the maximum allowed size (injected by the sim engine).",
    "rate_limit_error": "Rate limit exceeded (injected by the sim engine).",
    "api_error": "Internal server error (injected by the sim engine).",
    "timeout_error": "Request timed out (injected by the sim engine).",
    "overloaded_error": "Overloaded (injected by the sim engine).",
}


def _option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class SimOptions:
    """Latency and faults of the sim engine (server flags, overridable per request; note 2)."""

    ttft_ms: float = _option(
        200.0, "Time from the request's arrival to the first text delta, in ms."
    )
    itl_ms: float = _option(20.0, "Gap between text deltas, in ms.")
    jitter_ms: float = _option(
        0.0, "Each delta is late by a uniform random 0..J ms (deadlines stay monotonic)."
    )
    reply_tokens: int = _option(
        40, "Text deltas (one token each) in a reply, before max_tokens caps it."
    )
    seed: int = _option(0, "Seed of the text, the jitter and fail_rate.")
    fail_before: str | None = _option(
        None,
        "Fail every request before any byte of the body with this error type (an HTTP error status: "
        "rate_limit_error, overloaded_error, api_error, ...); 'disconnect' closes the connection "
        "right after the response headers.",
    )
    fail_after: int | None = _option(None, "Fail every stream after N text deltas (see fail_with).")
    fail_with: str = _option(
        "api_error", "The mid-stream failure: an error type (an SSE error event) or 'disconnect'."
    )
    fail_rate: float = _option(
        0.0,
        "Apply the fault to this share (0..1) of requests only (overloaded_error before any byte if no fault is set).",
    )
    first_text_gap_ms: float | None = _option(
        None,
        "Hold the response and its first event until this long before the first text delta "
        "(note 4); none sends them at once.",
    )
    context_window: int = _option(
        CONTEXT_WINDOW,
        "Context window the engine enforces, in tokens (a server option: not per request).",
    )

    def merged(self, overrides: dict[str, str]) -> SimOptions:
        """These options with per-request ``overrides`` applied (validated)."""
        if not overrides:
            return self
        types = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, raw in overrides.items():
            if key in _SERVER_ONLY:
                raise EngineError(
                    "invalid_request_error",
                    f"x-labkit-sim: {key} is a server option (--{key.replace('_', '-')}), "
                    "not a per-request one.",
                )
            if key not in types:
                raise EngineError(
                    "invalid_request_error",
                    f"x-labkit-sim: unknown key {key!r}; known keys: {', '.join(types)}.",
                )
            try:
                changes[key] = _convert(types[key], raw)
            except ValueError:
                raise EngineError(
                    "invalid_request_error", f"x-labkit-sim: {key}={raw!r} is not a valid value."
                ) from None
        opts = replace(self, **changes)
        opts.validate(
            error=lambda msg: EngineError("invalid_request_error", f"x-labkit-sim: {msg}")
        )
        return opts

    def validate(self, error: Callable[[str], Exception] | None = None) -> None:
        """Raise ``error(msg)`` (default ConfigurationError) if an option is out of range."""

        def fail(msg: str) -> None:
            raise (
                error(msg)
                if error
                else ConfigurationError(msg, hint="See `labkit local-api --help`.")
            )

        for name in ("ttft_ms", "itl_ms", "jitter_ms"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0.")
        if self.reply_tokens < 0:
            fail("reply_tokens must be >= 0.")
        if not 0.0 <= self.fail_rate <= 1.0:
            fail("fail_rate must be between 0 and 1.")
        if self.fail_after is not None and self.fail_after < 0:
            fail("fail_after must be >= 0.")
        if self.first_text_gap_ms is not None and self.first_text_gap_ms < 0:
            fail("first_text_gap_ms must be >= 0.")
        if self.context_window < 1:
            fail("context_window must be >= 1.")
        for name in ("fail_before", "fail_with"):
            value = getattr(self, name)
            if value is not None and value != "disconnect" and value not in ERROR_TYPES:
                fail(f"{name}={value!r}: use one of {', '.join(ERROR_TYPES)} or 'disconnect'.")


#: Options that apply to the whole server (the app checks the window before the engine runs).
_SERVER_ONLY = ("context_window",)


def _convert(type_name: Any, raw: str) -> Any:
    t = str(type_name)
    if raw.lower() in ("none", "null", "") and "None" in t:
        return None
    if t.startswith("float"):
        return float(raw)
    if t.startswith("int"):
        return int(raw)
    return raw


def parse_sim_header(value: str | None) -> dict[str, str]:
    """``"ttft_ms=300;itl_ms=15"`` → ``{"ttft_ms": "300", "itl_ms": "15"}``."""
    out: dict[str, str] = {}
    if not value:
        return out
    for part in value.replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep:
            raise EngineError(
                "invalid_request_error", f"x-labkit-sim: expected key=value, got {part!r}."
            )
        out[key.strip()] = val.strip()
    return out


_TEXT = (
    "the stream carries tokens as they arrive so a reader sees words early while the model "
    "keeps writing each event is a small frame of text sent over one open connection and "
    "latency is measured from the request to the first frame then between frames until the "
    "last one closes the message with its usage"
)
_WORDS = _TEXT.split()

_SPIN_S = 0.002  # last stretch before a deadline spent yielding, not sleeping (note 1)
_PRECISE_MAX_STREAMS = 4


async def _sleep_until(deadline: float, precise: bool) -> None:
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        return
    if not precise:
        await asyncio.sleep(remaining)
        return
    if remaining > _SPIN_S:
        await asyncio.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0)


def sim_tool_input(schema: dict[str, Any]) -> Any:
    """A deterministic value valid against ``schema`` (checked by ``schema.check_schema``)."""
    return example(schema)


def _pieces(payload: str, n: int = 4) -> list[str]:
    size = max(1, -(-len(payload) // n))
    return [payload[i : i + size] for i in range(0, len(payload), size)]


class SimEngine:
    """Deterministic text at a requested latency, with injectable faults."""

    name = "sim"
    #: The sim engine has no prompt cache: ``x-labkit-cache`` is always echoed as off.
    prefix_cache = False

    def __init__(
        self, options: SimOptions | None = None, *, metrics: Metrics | None = None
    ) -> None:
        self.options = options or SimOptions()
        self.options.validate()
        self.metrics = metrics or Metrics()
        self._fault_rng = random.Random(self.options.seed)
        from ..tokens import get_encoding

        get_encoding("cl100k_base")  # load it now, not on the first request

    @property
    def context_window(self) -> int:
        """The window the app enforces (``SimOptions.context_window``)."""
        return self.options.context_window

    def count_tokens(self, req: GenerationRequest) -> int:
        """cl100k tokens of the ChatML rendering (note 3)."""
        text = render_chatml(req.system, req.messages, req.prefill)
        from ..tokens import encode

        return len(encode(text, "cl100k_base"))

    def _fault(self, opts: SimOptions) -> tuple[str | None, int | None, str]:
        before, after, with_ = opts.fail_before, opts.fail_after, opts.fail_with
        if opts.fail_rate > 0:
            if self._fault_rng.random() < opts.fail_rate:
                if before is None and after is None:
                    before = "overloaded_error"
            else:
                before, after = None, None
        return before, after, with_

    @staticmethod
    def _raise(kind: str) -> None:
        if kind == "disconnect":
            raise DropConnection()
        raise EngineError(kind, _INJECTED_MESSAGES[kind])

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Event]:
        opts = self.options.merged(req.sim)
        before, after, with_ = self._fault(opts)
        if before is not None:
            self._raise(before)
        if opts.first_text_gap_ms is not None:  # note 4
            hold = max(0.0, opts.ttft_ms - opts.first_text_gap_ms) / 1000
            await _sleep_until(req.t0 + hold, self.metrics.active_streams <= _PRECISE_MAX_STREAMS)
        yield Started(input_tokens=self.count_tokens(req))
        last_user = req.messages[-1].text if req.messages else ""
        rng = random.Random(opts.seed * 1_000_003 + zlib.crc32(last_user.encode()))
        t_first = req.t0 + opts.ttft_ms / 1000
        itl = opts.itl_ms / 1000
        jitter = opts.jitter_ms / 1000
        last_deadline = 0.0

        def deadline(i: int) -> float:
            nonlocal last_deadline
            d = t_first + i * itl + (rng.random() * jitter if jitter else 0.0)
            last_deadline = max(last_deadline, d)
            return last_deadline

        def precise() -> bool:
            return self.metrics.active_streams <= _PRECISE_MAX_STREAMS

        forced = None
        if req.tools and req.tool_choice in ("any", "tool"):
            forced = next((t for t in req.tools if t.name == req.tool_name), req.tools[0])
        if forced is not None:
            pieces = _pieces(json.dumps(sim_tool_input(forced.input_schema)))
            await _sleep_until(deadline(0), precise())
            yield ToolStart(id="toolu_sim" + f"{rng.getrandbits(64):016x}", name=forced.name)
            for i, piece in enumerate(pieces):
                if i:
                    await _sleep_until(deadline(i), precise())
                if after is not None and i == after:
                    self._raise(with_)
                self.metrics.tokens_generated += 1
                yield ToolInput(partial_json=piece)
            if after is not None and after >= len(pieces):
                self._raise(with_)
            yield Finished(stop_reason="tool_use", output_tokens=len(pieces))
            return

        if req.json_schema is not None:  # a JSON reply: a valid example, in pieces
            pieces = _pieces(json.dumps(example(req.json_schema)))
            n = min(len(pieces), req.max_tokens)
            for i in range(n):
                await _sleep_until(deadline(i), precise())
                if after is not None and i == after:
                    self._raise(with_)
                self.metrics.tokens_generated += 1
                yield TextPiece(text=pieces[i])
            if after is not None and after >= n:
                self._raise(with_)
            yield Finished(
                stop_reason="end_turn" if n == len(pieces) else "max_tokens", output_tokens=n
            )
            return

        n = min(opts.reply_tokens, req.max_tokens)
        for i in range(n):
            await _sleep_until(deadline(i), precise())
            if after is not None and i == after:
                self._raise(with_)
            word = _WORDS[rng.randrange(len(_WORDS))]
            text = word.capitalize() if i == 0 and not req.prefill else " " + word
            self.metrics.tokens_generated += 1
            yield TextPiece(text=text + ("." if i == n - 1 else ""))
        if after is not None and after >= n:
            self._raise(with_)
        reason = "max_tokens" if opts.reply_tokens > req.max_tokens else "end_turn"
        yield Finished(stop_reason=reason, output_tokens=n)
