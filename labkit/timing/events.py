"""Reading SDK stream events: which carry text, tool input or usage, and recording them.

:func:`observe_event` takes one event as an SDK hands it over (an Anthropic raw or
helper event, an OpenAI ``ChatCompletionChunk`` or helper ``ChunkEvent``) and its
arrival time, and updates a :class:`~labkit.timing.records.StreamTiming`;
:func:`finish` closes the record. Both are pure: tests feed them recorded events.

Notes:

1. Helper events that repeat a raw event already seen (Anthropic ``text``,
   ``input_json``...; OpenAI ``content.delta``...) are skipped, so nothing is counted
   twice whichever iterator the caller uses.
2. Usage is read as :mod:`labkit.upstream` reads it (its note 2): input tokens are the
   whole prompt, Anthropic's cache reads and writes added back, and the cached part is
   kept apart (:func:`usage_counts`). Anthropic's ``message_start`` placeholder
   ``output_tokens`` is ignored; the count comes from ``message_delta``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from .. import upstream
from ..tokens import count_tokens
from .records import StreamEvent, StreamTiming

__all__ = ["finish", "observe_event", "usage_counts"]

_ANTHROPIC_HELPER_EVENTS = {"text", "citation", "thinking", "signature", "input_json"}


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def usage_counts(usage: Any) -> dict[str, int]:
    """``input_tokens`` (the whole prompt), ``cached_tokens`` and ``output_tokens`` of an
    Anthropic or OpenAI usage object (or dict), as far as it reports them (note 2)."""
    out: dict[str, int] = {}
    if usage is None:
        return out
    if _get(usage, "prompt_tokens") is not None or _get(usage, "completion_tokens") is not None:
        if _get(usage, "prompt_tokens") is not None:  # OpenAI: already the whole prompt
            out["input_tokens"] = int(_get(usage, "prompt_tokens"))
            details = _get(usage, "prompt_tokens_details")
            out["cached_tokens"] = int(_get(details, "cached_tokens") or 0)
        if _get(usage, "completion_tokens") is not None:
            out["output_tokens"] = int(_get(usage, "completion_tokens"))
        return out
    if _get(usage, "input_tokens") is not None:
        attrs = SimpleNamespace(**usage) if isinstance(usage, dict) else usage
        out["input_tokens"], out["cached_tokens"] = upstream.anthropic_input(attrs)
    if _get(usage, "output_tokens") is not None:
        out["output_tokens"] = int(_get(usage, "output_tokens"))
    return out


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
        usage = usage_counts(_get(event, "usage"))
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
        usage = usage_counts(_get(_get(event, "message"), "usage"))
        usage.pop("output_tokens", None)  # a placeholder here (note 2)
        if usage:
            kind = "usage"
    elif etype == "message_delta":
        usage = usage_counts(_get(event, "usage"))
        if usage:
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
        timing.cached_tokens = usage.get("cached_tokens", 0)
    return ev


def finish(timing: StreamTiming, t_ns: int, error: BaseException | None = None) -> None:
    """Close the record: stamp the end, note an error, estimate tokens if the server
    sent no usage."""
    if timing.end_ns is None:
        timing.end_ns = t_ns
    if error is not None and timing.error is None:
        timing.error = type(error).__name__
    if timing.output_tokens is None and timing.text:
        timing.output_tokens = count_tokens(timing.text)
        timing.output_tokens_source = "tiktoken_estimate"
