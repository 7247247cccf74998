"""labkit.timing: pure metric maths, event accumulation, and the stream wrapper on both
SDKs against the local API's sim engine (ground truth for the accuracy tests)."""

from __future__ import annotations

import random
import statistics

import anthropic
import numpy as np
import openai
import pytest
from anthropic.types import (
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    TextDelta,
    Usage,
)
from helpers import sim_header
from openai.types.chat import ChatCompletionChunk

from labkit.errors import ConfigurationError
from labkit.timing import (
    StreamTiming,
    atimed_call,
    finish,
    instrument,
    observe_event,
    percentile,
    summarize,
    timed,
    timed_call,
)

MODEL = "smollm2-135m-instruct"
MS = 1_000_000


# ── pure: percentile and summaries ───────────────────────────────────────────


def test_percentile_matches_numpy_linear_interpolation():
    rng = random.Random(7)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.uniform(0, 100) for _ in range(n)]
        for q in (0, 1, 10, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_percentile_of_nothing_is_none_and_bad_q_is_rejected():
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile([1.0], 101)


def test_summarize_ignores_missing_values():
    s = summarize([1.0, None, 3.0, float("nan"), 2.0])
    assert s["n"] == 3 and s["median"] == 2.0 and s["min"] == 1.0 and s["max"] == 3.0


# ── pure: accumulating SDK events ─────────────────────────────────────────────


def _anthropic_events(words: list[str], output_tokens: int | None, cached: int = 0) -> list[object]:
    usage = Usage(input_tokens=11, output_tokens=1, cache_read_input_tokens=cached)
    msg = Message(
        id="m",
        type="message",
        role="assistant",
        model=MODEL,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=usage,
    )
    events: list[object] = [
        RawMessageStartEvent(type="message_start", message=msg),
        RawContentBlockStartEvent(
            type="content_block_start", index=0, content_block=TextBlock(type="text", text="")
        ),
    ]
    for w in words:
        events.append(
            RawContentBlockDeltaEvent(
                type="content_block_delta", index=0, delta=TextDelta(type="text_delta", text=w)
            )
        )
    events.append(RawContentBlockStopEvent(type="content_block_stop", index=0))
    if output_tokens is not None:
        events.append(
            RawMessageDeltaEvent(
                type="message_delta",
                delta={"stop_reason": "end_turn", "stop_sequence": None},
                usage=MessageDeltaUsage(output_tokens=output_tokens),
            )
        )
    events.append(RawMessageStopEvent(type="message_stop"))
    return events


def _feed(events: list[object], start_ns: int, step_ns: int) -> StreamTiming:
    timing = StreamTiming(sent_ns=0)
    t = start_ns
    for ev in events:
        observe_event(timing, ev, t)
        t += step_ns
    finish(timing, t)
    return timing


def test_anthropic_events_give_ttft_itl_tpot_e2e_from_timestamps():
    # events arrive at 100 ms, 110 ms, ... : message_start, block_start, 4 deltas, ...
    timing = _feed(_anthropic_events(["A", " b", " c", " d"], output_tokens=4), 100 * MS, 10 * MS)
    assert timing.api == "anthropic"
    assert timing.ttfe_ms == 100.0
    assert timing.ttft_ms == 120.0  # third event is the first text delta
    assert timing.itl_ms == [10.0, 10.0, 10.0]
    assert timing.itl_mean_ms == timing.itl_p50_ms == timing.itl_p99_ms == 10.0
    assert timing.tpot_ms == 10.0  # (150 - 120) / (4 - 1)
    assert timing.e2e_ms == 190.0
    assert timing.output_tokens == 4 and timing.output_tokens_source == "server_usage"
    assert timing.input_tokens == 11
    assert timing.output_tps == pytest.approx(4 / 0.19)
    assert timing.text == "A b c d"


def test_openai_role_chunk_is_an_event_but_not_the_first_token():
    def chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None):
        return ChatCompletionChunk.model_validate(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": MODEL,
                "choices": []
                if usage
                else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                "usage": usage,
            }
        )

    chunks = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hi"}),
        chunk({"content": " there"}),
        chunk({}, "stop"),
        chunk({}, usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
    ]
    timing = _feed(chunks, 50 * MS, 5 * MS)
    assert timing.api == "openai"
    assert timing.ttfe_ms == 50.0  # the role chunk: where vLLM bench serve stops its TTFT
    assert timing.ttft_ms == 55.0  # the first non-empty content
    assert timing.itl_ms == [5.0]
    assert (timing.output_tokens, timing.input_tokens) == (2, 5)


def test_anthropic_input_tokens_add_back_the_prompt_cache_reads():
    # Anthropic reports cache reads apart from input_tokens (11 uncached + 164 cached).
    timing = _feed(_anthropic_events(["hi"], output_tokens=1, cached=164), 0, MS)
    assert (timing.input_tokens, timing.cached_tokens) == (175, 164)
    row = timing.row()
    assert (row["input_tokens"], row["cached_tokens"]) == (175, 164)


def test_openai_cached_tokens_are_shown_apart_within_prompt_tokens():
    chunk = ChatCompletionChunk.model_validate(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": 50,
                "completion_tokens": 2,
                "total_tokens": 52,
                "prompt_tokens_details": {"cached_tokens": 32},
            },
        }
    )
    timing = _feed([chunk], 0, MS)
    assert (timing.input_tokens, timing.cached_tokens, timing.output_tokens) == (50, 32, 2)


def test_timed_call_counts_cache_reads_in_input_tokens():
    msg = Message(
        id="m",
        type="message",
        role="assistant",
        model=MODEL,
        stop_reason="end_turn",
        content=[TextBlock(type="text", text="hello")],
        usage=Usage(input_tokens=12, output_tokens=3, cache_read_input_tokens=164),
    )
    _, t = timed_call(lambda: msg)
    assert (t.input_tokens, t.cached_tokens, t.output_tokens) == (176, 164, 3)
    assert t.row()["cached_tokens"] == 164


def test_anthropic_helper_events_are_not_counted_twice():
    events = _anthropic_events(["x", "y"], output_tokens=2)
    with_helpers: list[object] = []
    for ev in events:
        with_helpers.append(ev)
        if getattr(ev, "type", "") == "content_block_delta":
            with_helpers.append({"type": "text", "text": ev.delta.text, "snapshot": ""})
    timing = _feed(with_helpers, 0, MS)
    assert timing.n_text_deltas == 2 and timing.text == "xy"


def test_tool_input_deltas_are_content_but_not_text():
    events = _anthropic_events([], output_tokens=3)
    events[2:2] = [
        RawContentBlockDeltaEvent(
            type="content_block_delta",
            index=0,
            delta=InputJSONDelta(type="input_json_delta", partial_json='{"a"'),
        )
    ]
    timing = _feed(events, 10 * MS, MS)
    assert timing.ttft_ms is None and timing.first_delta_ns == 12 * MS
    assert [e.kind for e in timing.events].count("tool_input") == 1


def test_output_tokens_fall_back_to_a_labelled_tiktoken_estimate():
    timing = _feed(_anthropic_events(["hello", " world"], output_tokens=None), 0, MS)
    assert timing.output_tokens == 2  # cl100k: "hello world" -> [15339, 1917]
    assert timing.output_tokens_source == "tiktoken_estimate"


def test_tpot_and_itl_need_two_tokens():
    timing = _feed(_anthropic_events(["only"], output_tokens=1), 0, MS)
    assert timing.tpot_ms is None and timing.itl_mean_ms is None and timing.itl_p99_ms is None
    assert timing.ttft_ms == 2.0


def test_row_keeps_every_raw_stamp_so_peer_definitions_can_be_recomputed():
    timing = _feed(_anthropic_events(["A", " b", " c"], output_tokens=3), 100 * MS, 10 * MS)
    row = timing.row()
    for key in (
        "sent_ns",
        "headers_rel_ns",
        "first_byte_rel_ns",
        "first_event_rel_ns",
        "first_text_rel_ns",
        "last_text_rel_ns",
        "end_rel_ns",
        "text_rel_ns",
        "ttft_ms",
        "ttfb_ms",
        "ttfe_ms",
        "itl_mean_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "tpot_ms",
        "e2e_ms",
        "output_tps",
        "output_tokens",
        "output_tokens_source",
    ):
        assert key in row
    stamps = [int(x) for x in row["text_rel_ns"].split()]
    assert stamps == [120 * MS, 130 * MS, 140 * MS]
    # GuideLLM's time_per_output_token divides the same span by all tokens:
    assert (stamps[-1] - stamps[0]) / MS / row["output_tokens"] == pytest.approx(20 / 3)
    assert row["tpot_ms"] == 10.0


def test_instrument_rejects_objects_without_an_http_client():
    with pytest.raises(ConfigurationError) as info:
        instrument(object())
    assert info.value.hint


# ── the wrapper on both SDKs, against the sim engine ─────────────────────────


@pytest.fixture
def clients(sim_api):
    srv = sim_api
    return {
        "anthropic": instrument(anthropic.Anthropic(api_key="sim", base_url=srv.base_url)),
        "openai": instrument(openai.OpenAI(api_key="sim", base_url=srv.openai_base_url)),
        "async_anthropic": instrument(
            anthropic.AsyncAnthropic(api_key="sim", base_url=srv.base_url)
        ),
        "async_openai": instrument(openai.AsyncOpenAI(api_key="sim", base_url=srv.openai_base_url)),
    }


MSGS = [{"role": "user", "content": "Say something."}]


def _check_ordered(t: StreamTiming, n_tokens: int) -> None:
    assert t.sent_source == "httpx_hook"
    assert t.status_code == 200 and t.error is None
    order = [
        t.sent_ns,
        t.headers_ns,
        t.first_byte_ns,
        t.first_event_ns,
        t.first_text_ns,
        t.last_text_ns,
        t.end_ns,
    ]
    assert None not in order and order == sorted(order)
    assert t.n_text_deltas == n_tokens
    assert t.output_tokens == n_tokens and t.output_tokens_source == "server_usage"


def test_anthropic_messages_stream_text_stream_and_final_message(clients):
    client = clients["anthropic"]
    with timed(
        client.messages.stream(
            model=MODEL, max_tokens=50, messages=MSGS, extra_headers=sim_header(reply_tokens=8)
        )
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == stream.timing.text == final.content[0].text
    assert final.usage.output_tokens == 8
    _check_ordered(stream.timing, 8)
    types = [e.type for e in stream.timing.events]
    assert types[0] == "message_start" and types[-1] == "message_stop"


async def test_async_anthropic_messages_stream(clients):
    client = clients["async_anthropic"]
    async with timed(
        client.messages.stream(
            model=MODEL, max_tokens=50, messages=MSGS, extra_headers=sim_header(reply_tokens=6)
        )
    ) as stream:
        texts = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == final.content[0].text
    _check_ordered(stream.timing, 6)


def test_openai_create_stream_with_usage(clients):
    client = clients["openai"]
    with timed(
        lambda: client.chat.completions.create(
            model=MODEL,
            max_tokens=50,
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=sim_header(reply_tokens=7),
        )
    ) as stream:
        chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 7
    _check_ordered(stream.timing, 7)
    assert stream.timing.first_event_ns < stream.timing.first_text_ns  # the role chunk


def test_openai_chat_completions_stream_helper(clients):
    client = clients["openai"]
    with timed(
        client.chat.completions.stream(
            model=MODEL,
            max_tokens=50,
            messages=MSGS,
            stream_options={"include_usage": True},
            extra_headers=sim_header(reply_tokens=5),
        )
    ) as stream:
        events = [e.type for e in stream]
        completion = stream.get_final_completion()
    assert "content.delta" in events
    assert completion.choices[0].message.content == stream.timing.text
    _check_ordered(stream.timing, 5)


async def test_async_openai_create_stream(clients):
    client = clients["async_openai"]
    async with timed(
        lambda: client.chat.completions.create(
            model=MODEL,
            max_tokens=50,
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=sim_header(reply_tokens=4),
        )
    ) as stream:
        texts = [t async for t in stream.text_stream]
    assert len(texts) == 4
    _check_ordered(stream.timing, 4)


def test_uninstrumented_client_falls_back_to_wrapper_stamps(sim_api):
    client = anthropic.Anthropic(api_key="sim", base_url=sim_api.base_url)
    with timed(
        client.messages.stream(
            model=MODEL, max_tokens=50, messages=MSGS, extra_headers=sim_header(reply_tokens=3)
        )
    ) as stream:
        stream.until_done()
    t = stream.timing
    assert t.sent_source == "wrapper" and t.first_byte_ns is None
    assert t.ttft_ms is not None and t.headers_ns <= t.first_text_ns


def test_an_already_open_stream_is_labelled_late(clients):
    raw = clients["openai"].chat.completions.create(
        model=MODEL,
        max_tokens=50,
        messages=MSGS,
        stream=True,
        extra_headers=sim_header(reply_tokens=2),
    )
    with timed(raw) as stream:
        list(stream)
    # the hooks still recover the real send time from the request itself
    assert stream.timing.sent_source == "httpx_hook"
    plain = openai.OpenAI(api_key="sim", base_url=clients["openai"].base_url)
    raw = plain.chat.completions.create(
        model=MODEL,
        max_tokens=50,
        messages=MSGS,
        stream=True,
        extra_headers=sim_header(reply_tokens=2),
    )
    with timed(raw) as stream:
        list(stream)
    assert stream.timing.sent_source == "late"


def test_forced_tool_use_streams_json_pieces_and_parses(clients):
    tool = {
        "name": "get_weather",
        "description": "Weather for a city.",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
    with timed(
        clients["anthropic"].messages.stream(
            model=MODEL,
            max_tokens=100,
            messages=MSGS,
            tools=[tool],
            tool_choice={"type": "any"},
            extra_headers=sim_header(itl_ms=1),
        )
    ) as stream:
        final = stream.get_final_message()
    pieces = [e for e in stream.timing.events if e.kind == "tool_input"]
    assert len(pieces) > 1 and stream.timing.first_delta_ns == pieces[0].t_ns
    block = next(b for b in final.content if b.type == "tool_use")
    assert "city" in block.input and stream.timing.ttft_ms is None


def test_mid_stream_error_is_raised_and_recorded(clients):
    with (
        pytest.raises(anthropic.APIStatusError),
        timed(
            clients["anthropic"].messages.stream(
                model=MODEL,
                max_tokens=50,
                messages=MSGS,
                extra_headers=sim_header(reply_tokens=10, fail_after=4, fail_with="api_error"),
            )
        ) as stream,
    ):
        for _ in stream.text_stream:
            pass
    assert stream.timing.n_text_deltas == 4
    assert stream.timing.error is not None and stream.timing.end_ns is not None


def test_timed_call_reads_server_usage_on_both_sdks(clients):
    msg, t = timed_call(
        clients["anthropic"].messages.create,
        model=MODEL,
        max_tokens=50,
        messages=MSGS,
        extra_headers=sim_header(reply_tokens=9, ttft_ms=20),
    )
    assert t.output_tokens == msg.usage.output_tokens == 9
    assert t.output_tokens_source == "server_usage" and t.e2e_ms >= 20
    comp, t2 = timed_call(
        clients["openai"].chat.completions.create,
        model=MODEL,
        max_tokens=50,
        messages=MSGS,
        extra_headers=sim_header(reply_tokens=3),
    )
    assert t2.output_tokens == comp.usage.completion_tokens == 3


async def test_atimed_call(clients):
    _msg, t = await atimed_call(
        clients["async_anthropic"].messages.create,
        model=MODEL,
        max_tokens=50,
        messages=MSGS,
        extra_headers=sim_header(reply_tokens=2),
    )
    assert t.output_tokens == 2 and t.row()["e2e_ms"] == t.e2e_ms


# ── accuracy against the sim engine's ground truth ───────────────────────────
# The sim engine sends the first text delta ttft_ms after it received the request and
# one delta every itl_ms after that. Targets (idle machine): median TTFT error ≤ 2 ms,
# median ITL error ≤ 1 ms. Those targets are a benchmark's claim
# (benchmarks/timing_accuracy.py prints the actual errors), not this test's: on a shared
# 2-core machine a test can only tell right stamps from wrong ones. Wrong ones are far
# off: stamping at the end of the stream puts TTFT ~285 ms late and every gap near 0;
# stamping before the request is sent puts TTFT early.


@pytest.mark.parametrize(("ttft", "itl"), [(300, 15), (0, 0)])
def test_measured_ttft_and_itl_match_sim_ground_truth(clients, ttft, itl):
    client = clients["anthropic"]
    ttfts, itls = [], []
    for _ in range(5):
        with timed(
            client.messages.stream(
                model=MODEL,
                max_tokens=100,
                messages=MSGS,
                extra_headers=sim_header(ttft_ms=ttft, itl_ms=itl, reply_tokens=20, jitter_ms=0),
            )
        ) as stream:
            for _ in stream.text_stream:
                pass
        ttfts.append(stream.timing.ttft_ms)
        itls.append(stream.timing.itl_p50_ms)
    ttft_err = statistics.median(ttfts) - ttft
    itl_err = statistics.median(itls) - itl
    assert -1.0 <= ttft_err <= 100.0, ttfts  # never early; a loaded machine may add some
    assert -7.0 <= itl_err <= 7.0, itls
