"""The sim engine's instruments for checkers: a known gap between the first event and the
first text, a configurable context window, and the record of received requests."""

from __future__ import annotations

import time
import uuid

import anthropic
import httpx
import pytest
from helpers import ZERO_LATENCY

from labkit.errors import ConfigurationError
from labkit.localapi.app import REQUEST_LOG_SIZE
from labkit.localapi.sim import SimOptions

MODEL = "smollm2-135m-instruct"


def _client(api, header: str | None = None) -> anthropic.Anthropic:
    headers = {"x-labkit-sim": header} if header else None
    return anthropic.Anthropic(
        base_url=api.base_url, api_key="x", max_retries=0, default_headers=headers
    )


def _times(api, header: str) -> tuple[float, float, float]:
    """(headers in, first event, first text) in ms after the request was sent."""
    client = _client(api, header)
    warm = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    with _client(api, "ttft_ms=0;itl_ms=0").messages.stream(**warm) as stream:
        stream.get_final_message()  # the SDK's first use of its event models is slow
    first_event = first_text = None
    t0 = time.perf_counter()
    with client.messages.stream(
        model=MODEL, max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        headers = time.perf_counter()
        for event in stream:
            now = time.perf_counter()
            first_event = first_event or now
            if event.type == "content_block_delta":
                first_text = now
                break
    return (headers - t0) * 1000, (first_event - t0) * 1000, (first_text - t0) * 1000


def test_first_text_gap_holds_the_first_event_until_the_gap_before_the_text(sim_api):
    headers, first_event, first_text = _times(
        sim_api, "ttft_ms=300;first_text_gap_ms=120;itl_ms=5;reply_tokens=3"
    )
    # Lower bounds are exact (nothing is early); upper ones would only measure the
    # machine's load, so the first event is placed relative to the text instead.
    assert headers >= 175 and first_event >= 175  # held back 180 ms, not sent at once
    assert first_text >= 295
    assert first_text - first_event >= 60  # ahead of the text by the 120 ms gap (half kept)


def test_without_a_gap_the_first_event_leaves_at_once(sim_api):
    _, first_event, first_text = _times(sim_api, "ttft_ms=400;itl_ms=5;reply_tokens=3")
    assert first_event < 250 and first_text >= 395  # at once, not with the text (400 ms)


def test_a_gap_larger_than_the_ttft_sends_the_first_event_at_once(sim_api):
    _, first_event, first_text = _times(
        sim_api, "ttft_ms=400;first_text_gap_ms=1000;itl_ms=5;reply_tokens=3"
    )
    assert first_event < 250 and first_text >= 395  # at once, not with the text (400 ms)


def test_the_context_window_is_a_server_option_not_a_per_request_one(sim_api):
    assert SimOptions().context_window == 8192
    with pytest.raises(anthropic.BadRequestError, match="server option"):
        _client(sim_api, "context_window=100").messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(ConfigurationError, match="context_window"):
        SimOptions(context_window=0).validate()


def test_a_wider_context_window_admits_a_long_prompt(sim_factory):
    long = " a" * 12_000
    api = sim_factory(**ZERO_LATENCY, context_window=50_000)
    reply = _client(api).messages.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": long}]
    )
    assert reply.usage.input_tokens > 12_000
    assert httpx.get(api.base_url + "/health").json()["context_window"] == 50_000


def test_received_requests_are_recorded_newest_last_with_their_bodies(sim_api):
    marker = uuid.uuid4().hex
    client = _client(sim_api, "ttft_ms=0;itl_ms=0;reply_tokens=2")
    for i in range(3):
        client.messages.create(
            model=MODEL,
            max_tokens=5,
            system="be brief",
            messages=[{"role": "user", "content": f"{marker} {i}"}],
        )
    entries = sim_api.requests(limit=3)
    assert [e["body"]["messages"][0]["content"] for e in entries] == [
        f"{marker} {i}" for i in range(3)
    ]
    last = entries[-1]
    assert last["path"] == "/v1/messages" and last["method"] == "POST"
    assert last["body"]["system"] == "be brief"
    assert last["headers"]["x-labkit-sim"].startswith("ttft_ms=0")
    assert last["body_bytes"] > 0 and last["received_at"] <= time.time()


def test_the_request_record_is_bounded(sim_api):
    client = _client(sim_api, "ttft_ms=0;itl_ms=0;reply_tokens=1")
    for i in range(REQUEST_LOG_SIZE + 5):
        client.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": str(i)}])
    body = httpx.get(sim_api.base_url + "/v1/labkit/requests").json()
    assert body["capacity"] == REQUEST_LOG_SIZE
    assert len(body["requests"]) == REQUEST_LOG_SIZE
    assert body["requests"][-1]["body"]["messages"][0]["content"] == str(REQUEST_LOG_SIZE + 4)
