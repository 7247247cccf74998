"""labkit.timing on recorded wire bytes: SSE transcripts of the local API (tests/data/sse,
re-recorded by tests/data/sse/record.py) replayed to the official SDKs through an httpx
``MockTransport``, as the Anthropic SDK's own tests do. No server runs; the SDKs parse
real bytes, and what labkit.timing records is checked against the transcript itself.

1. The expected values come from reading the transcript directly (event names, text
   deltas, usage), never from labkit, so a classification mistake cannot hide.
2. Replays may pause before each event. A pause is a lower bound on the gap the wrapper
   can see (the SDK asks for the next event's bytes only after it handed over the
   previous one), so these tests assert only ``>=``; how close to the truth the stamps
   are is a benchmark's claim (benchmarks/timing_accuracy.py), and the live-server tests
   in test_timing.py cover the rest end to end.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anthropic
import openai
import pytest

from labkit.timing import StreamTiming, instrument, timed

SSE = Path(__file__).parent / "data" / "sse"
MODEL = "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "Say hello."}]


# ── the transcript, read directly ─────────────────────────────────────────────


def _chunks(name: str) -> list[bytes]:
    """The transcript split into its SSE events, each with its blank-line terminator."""
    raw = (SSE / f"{name}.txt").read_bytes()
    return [block + b"\n\n" for block in raw.split(b"\n\n") if block.strip()]


def _wire(name: str) -> list[tuple[str | None, Any]]:
    """(event name, parsed data) for each SSE event; data is "[DONE]" for OpenAI's last."""
    out = []
    for chunk in _chunks(name):
        lines = chunk.decode().splitlines()
        event = next((ln[7:] for ln in lines if ln.startswith("event: ")), None)
        data = "\n".join(ln[6:] for ln in lines if ln.startswith("data: "))
        out.append((event, data if data == "[DONE]" else json.loads(data)))
    return out


def _anthropic_expected(name: str) -> dict[str, Any]:
    wire = _wire(name)
    deltas = [d["delta"] for e, d in wire if e == "content_block_delta"]
    usage = [d["usage"] for e, d in wire if e == "message_delta"]
    return {
        # the SDK passes on every event but ping, and raises on error
        "types": [e for e, _ in wire if e not in ("ping", "error")],
        "texts": [d["text"] for d in deltas if d["type"] == "text_delta"],
        "json_pieces": [d["partial_json"] for d in deltas if d["type"] == "input_json_delta"],
        "input_tokens": next(
            d["message"]["usage"]["input_tokens"] for e, d in wire if e == "message_start"
        ),
        "output_tokens": usage[-1]["output_tokens"] if usage else None,
    }


def _openai_expected(name: str) -> dict[str, Any]:
    chunks = [d for _, d in _wire(name) if d != "[DONE]"]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    return {
        "n_chunks": len(chunks),
        "texts": [t for t in texts if t],
        "first_text_chunk": next(
            i
            for i, c in enumerate(chunks)
            if c["choices"] and c["choices"][0]["delta"].get("content")
        ),
        "output_tokens": usage[-1]["completion_tokens"] if usage else None,
    }


# ── replaying it to an SDK client ─────────────────────────────────────────────


def _httpx_of(sdk: ModuleType) -> ModuleType:
    """The httpx package the SDK is built on (httpx, or its fork httpx2)."""
    for cls in sdk.DefaultHttpxClient.__mro__:
        root = cls.__module__.partition(".")[0]
        if root.startswith("httpx"):
            return importlib.import_module(root)
    raise AssertionError(f"{sdk.__name__} is not built on httpx")


def _replaying(sdk: ModuleType, name: str, *, pause_s: float = 0.0, is_async: bool = False) -> Any:
    """An instrumented SDK client whose every request is answered with the transcript,
    pausing ``pause_s`` before each event."""
    chunks = _chunks(name)
    hx = _httpx_of(sdk)

    def body():
        for chunk in chunks:
            time.sleep(pause_s)
            yield chunk

    async def abody():
        for chunk in chunks:
            await asyncio.sleep(pause_s)
            yield chunk

    def answer(request: Any) -> Any:
        return hx.Response(200, headers={"content-type": "text/event-stream"},
                           content=abody() if is_async else body())  # fmt: skip

    transport = hx.MockTransport(answer)
    http = (sdk.DefaultAsyncHttpxClient if is_async else sdk.DefaultHttpxClient)(
        transport=transport
    )
    if sdk is anthropic:
        cls, base_url = (
            (anthropic.AsyncAnthropic if is_async else anthropic.Anthropic),
            "http://replay.invalid",
        )
    else:
        cls, base_url = (
            (openai.AsyncOpenAI if is_async else openai.OpenAI),
            "http://replay.invalid/v1",
        )
    return instrument(cls(api_key="replay", base_url=base_url, http_client=http, max_retries=0))


def _stamps_in_order(t: StreamTiming) -> None:
    assert t.sent_source == "httpx_hook" and t.status_code == 200
    order = [t.sent_ns, t.headers_ns, t.first_byte_ns, t.first_event_ns, t.first_text_ns,
             t.last_text_ns, t.end_ns]  # fmt: skip
    assert None not in order and order == sorted(order)


# ── Anthropic Messages ────────────────────────────────────────────────────────


def test_anthropic_transcript_gives_its_text_usage_and_event_sequence():
    want = _anthropic_expected("anthropic_text")
    client = _replaying(anthropic, "anthropic_text")
    with timed(client.messages.stream(model=MODEL, max_tokens=50, messages=MSGS)) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    t = stream.timing
    assert texts == want["texts"] and t.text == "".join(want["texts"]) == final.content[0].text
    assert t.n_text_deltas == len(want["texts"]) == 5
    assert [e.type for e in t.events] == want["types"]
    assert [e.kind for e in t.events].count("text") == len(want["texts"])
    assert (t.input_tokens, t.output_tokens) == (want["input_tokens"], want["output_tokens"])
    assert t.output_tokens_source == "server_usage" and t.api == "anthropic" and t.error is None
    _stamps_in_order(t)


def test_anthropic_error_event_mid_stream_is_raised_and_recorded():
    want = _anthropic_expected("anthropic_error_after_2_deltas")
    client = _replaying(anthropic, "anthropic_error_after_2_deltas")
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        timed(client.messages.stream(model=MODEL, max_tokens=50, messages=MSGS)) as stream,
    ):
        for _ in stream.text_stream:
            pass
    assert "overloaded" in str(info.value).lower()
    t = stream.timing
    assert t.n_text_deltas == len(want["texts"]) == 2 and t.text == "".join(want["texts"])
    assert t.error == type(info.value).__name__ and t.end_ns is not None
    assert t.output_tokens_source == "tiktoken_estimate"  # no message_delta usage came


def test_anthropic_tool_input_is_content_but_not_text():
    want = _anthropic_expected("anthropic_tool_use")
    client = _replaying(anthropic, "anthropic_tool_use")
    with timed(client.messages.stream(model=MODEL, max_tokens=100, messages=MSGS)) as stream:
        final = stream.get_final_message()
    t = stream.timing
    pieces = [e for e in t.events if e.kind == "tool_input"]
    assert [e.text for e in pieces] == want["json_pieces"] and len(pieces) > 1
    assert t.first_delta_ns == pieces[0].t_ns and t.ttft_ms is None and t.text == ""
    tool = next(b for b in final.content if b.type == "tool_use")
    assert tool.input == json.loads("".join(want["json_pieces"]))


def test_anthropic_pauses_are_lower_bounds_of_ttft_itl_and_e2e():
    """20 ms before each event: the first text delta is the 4th event (message_start,
    ping, content_block_start, delta), so TTFT >= 80 ms; every gap >= 20 ms."""
    pause = 0.020
    n_events = len(_chunks("anthropic_text"))
    client = _replaying(anthropic, "anthropic_text", pause_s=pause)
    with timed(client.messages.stream(model=MODEL, max_tokens=50, messages=MSGS)) as stream:
        stream.until_done()
    t = stream.timing
    first_text = [e for e, _ in _wire("anthropic_text")].index("content_block_delta")
    assert t.ttft_ms >= (first_text + 1) * pause * 1000
    assert len(t.itl_ms) == 4 and min(t.itl_ms) >= pause * 1000
    assert t.tpot_ms >= pause * 1000
    assert t.e2e_ms >= n_events * pause * 1000


# ── OpenAI Chat Completions ───────────────────────────────────────────────────


def test_openai_transcript_role_chunk_is_the_first_event_not_the_first_text():
    want = _openai_expected("openai_text_with_usage")
    client = _replaying(openai, "openai_text_with_usage")
    with timed(lambda: client.chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True},
    )) as stream:  # fmt: skip
        chunks = list(stream)
    t = stream.timing
    assert len(chunks) == len(t.events) == want["n_chunks"]
    assert want["first_text_chunk"] == 1  # chunk 0 carries only the role
    assert t.first_event_ns == t.events[0].t_ns < t.first_text_ns == t.events[1].t_ns
    assert t.text == "".join(want["texts"]) and t.n_text_deltas == len(want["texts"]) == 4
    assert t.output_tokens == want["output_tokens"] and t.output_tokens_source == "server_usage"
    assert t.api == "openai"
    _stamps_in_order(t)


def test_openai_transcript_without_usage_falls_back_to_a_labelled_estimate():
    want = _openai_expected("openai_text_without_usage")
    assert want["output_tokens"] is None
    client = _replaying(openai, "openai_text_without_usage")
    with timed(
        lambda: client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    ) as stream:
        list(stream)
    t = stream.timing
    assert t.text == "".join(want["texts"])
    assert t.output_tokens_source == "tiktoken_estimate" and t.output_tokens > 0


async def test_async_openai_pauses_are_lower_bounds_of_ttft_and_itl():
    pause = 0.020
    client = _replaying(openai, "openai_text_with_usage", pause_s=pause, is_async=True)
    async with timed(lambda: client.chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True},
    )) as stream:  # fmt: skip
        texts = [text async for text in stream.text_stream]
    t = stream.timing
    assert "".join(texts) == t.text == "".join(_openai_expected("openai_text_with_usage")["texts"])
    assert t.ttft_ms >= 2 * pause * 1000  # the role chunk, then the first text
    assert len(t.itl_ms) == 3 and min(t.itl_ms) >= pause * 1000
    _stamps_in_order(t)
