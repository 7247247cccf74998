"""Injected faults and client disconnects, as the official SDKs see them."""

from __future__ import annotations

import anthropic
import httpx
import httpx2
import openai
import pytest
from helpers import USER, ZERO_LATENCY, anthropic_sdk, sim_header, wait_for

from labkit.localapi import MODEL_ID


@pytest.mark.parametrize(
    ("error_type", "exc_class", "status"),
    [
        ("rate_limit_error", anthropic.RateLimitError, 429),
        ("overloaded_error", anthropic.OverloadedError, 529),
        ("api_error", anthropic.InternalServerError, 500),
        ("not_found_error", anthropic.NotFoundError, 404),
        ("request_too_large", anthropic.ContentTooLargeError, 413),
        ("invalid_request_error", anthropic.BadRequestError, 400),
    ],
)
def test_fail_before_maps_to_the_sdk_exception(sim_api, error_type, exc_class, status):
    with (
        pytest.raises(exc_class) as info,
        anthropic_sdk(sim_api).messages.stream(
            model=MODEL_ID,
            max_tokens=5,
            messages=USER,
            extra_headers=sim_header(fail_before=error_type),
        ) as s,
    ):
        s.until_done()
    assert info.value.status_code == status
    assert info.value.body["error"]["type"] == error_type


def test_overloaded_is_an_internal_server_error(sim_api):
    with pytest.raises(anthropic.InternalServerError):
        anthropic_sdk(sim_api).messages.create(
            model=MODEL_ID,
            max_tokens=5,
            messages=USER,
            extra_headers=sim_header(fail_before="overloaded_error"),
        )


def test_mid_stream_error_event_after_n_deltas(sim_api):
    got = []
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        anthropic_sdk(sim_api).messages.stream(
            model=MODEL_ID,
            max_tokens=50,
            messages=USER,
            extra_headers=sim_header(reply_tokens=10, fail_after=3, fail_with="overloaded_error"),
        ) as s,
    ):
        got.extend(s.text_stream)
    assert len(got) == 3
    assert info.value.body["error"]["type"] == "overloaded_error"


def test_fail_after_zero_errors_before_any_text(sim_api):
    got = []
    with (
        pytest.raises(anthropic.APIStatusError),
        anthropic_sdk(sim_api).messages.stream(
            model=MODEL_ID,
            max_tokens=50,
            messages=USER,
            extra_headers=sim_header(fail_after=0, fail_with="api_error"),
        ) as s,
    ):
        got.extend(s.text_stream)
    assert got == []


def test_non_streaming_fail_after_returns_the_error_status(sim_api):
    with pytest.raises(anthropic.RateLimitError):
        anthropic_sdk(sim_api).messages.create(
            model=MODEL_ID,
            max_tokens=50,
            messages=USER,
            extra_headers=sim_header(fail_after=2, fail_with="rate_limit_error"),
        )


def test_dropped_connection_mid_stream_is_an_error_not_a_short_reply(sim_api):
    got = []
    with (
        pytest.raises((anthropic.APIConnectionError, httpx2.TransportError)),
        anthropic_sdk(sim_api).messages.stream(
            model=MODEL_ID,
            max_tokens=50,
            messages=USER,
            extra_headers=sim_header(reply_tokens=10, fail_after=4, fail_with="disconnect"),
        ) as s,
    ):
        got.extend(s.text_stream)
    assert len(got) == 4


def test_dropped_connection_non_streaming_is_a_connection_error(sim_api):
    with pytest.raises(anthropic.APIConnectionError):
        anthropic_sdk(sim_api).messages.create(
            model=MODEL_ID,
            max_tokens=5,
            messages=USER,
            extra_headers=sim_header(fail_before="disconnect"),
        )


def test_openai_dropped_connection_is_a_connection_error(sim_api):
    client = openai.OpenAI(base_url=sim_api.openai_base_url, api_key="test", max_retries=0)
    with pytest.raises(openai.APIConnectionError):
        for _ in client.chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            stream=True,
            extra_headers=sim_header(fail_after=2, fail_with="disconnect"),
        ):
            pass


def test_bad_sim_header_is_a_bad_request(sim_api):
    with pytest.raises(anthropic.BadRequestError, match="x-labkit-sim"):
        anthropic_sdk(sim_api).messages.create(
            model=MODEL_ID, max_tokens=5, messages=USER, extra_headers={"x-labkit-sim": "ttft=5"}
        )
    with pytest.raises(anthropic.BadRequestError, match="fail_before"):
        anthropic_sdk(sim_api).messages.create(
            model=MODEL_ID,
            max_tokens=5,
            messages=USER,
            extra_headers=sim_header(fail_before="oops"),
        )


def test_server_wide_faults_apply_without_headers(sim_factory):
    api = sim_factory(**ZERO_LATENCY, fail_before="rate_limit_error")
    with pytest.raises(anthropic.RateLimitError):
        anthropic_sdk(api).messages.create(model=MODEL_ID, max_tokens=5, messages=USER)
    # a request header can still override the server's fault
    ok = anthropic_sdk(api).messages.create(
        model=MODEL_ID, max_tokens=5, messages=USER, extra_headers=sim_header(fail_before="none")
    )
    assert ok.content[0].text


def test_fail_rate_fails_a_share_of_requests(sim_factory):
    api = sim_factory(**ZERO_LATENCY, fail_rate=0.5, seed=3)
    outcomes = []
    for _ in range(30):
        try:
            anthropic_sdk(api).messages.create(model=MODEL_ID, max_tokens=3, messages=USER)
            outcomes.append(True)
        except anthropic.OverloadedError:
            outcomes.append(False)
    assert 5 <= outcomes.count(False) <= 25


def _only_the_next_reply_is_generated(api, **kwargs) -> None:
    """A negative check with no fixed sleep: while the engine generates one more reply
    (kwargs make it take a while), the token counter grows by exactly that reply's
    tokens, so the abandoned stream generated nothing meanwhile."""
    generated = api.metrics()["labkit_tokens_generated_total"]
    msg = anthropic_sdk(api).messages.create(model=MODEL_ID, max_tokens=16, messages=USER, **kwargs)
    assert msg.usage.output_tokens >= 1  # the engine serves the next request normally
    assert api.metrics()["labkit_tokens_generated_total"] - generated == msg.usage.output_tokens


def test_client_disconnect_stops_generation_and_is_counted(sim_api):
    before = sim_api.metrics()
    with anthropic_sdk(sim_api).messages.stream(
        model=MODEL_ID,
        max_tokens=1000,
        messages=USER,
        extra_headers=sim_header(reply_tokens=500, itl_ms=20),
    ) as s:
        for i, _ in enumerate(s.text_stream):
            if i == 2:
                break
    assert wait_for(
        lambda: (
            sim_api.metrics()["labkit_streams_cancelled_total"]
            == before["labkit_streams_cancelled_total"] + 1
        )
    )
    m1 = sim_api.metrics()
    assert m1["labkit_active_streams"] == 0
    assert m1["labkit_tokens_generated_total"] - before["labkit_tokens_generated_total"] < 100
    _only_the_next_reply_is_generated(
        sim_api, extra_headers=sim_header(reply_tokens=15, itl_ms=20, ttft_ms=0)
    )


@pytest.mark.llama
def test_llama_disconnect_stops_decoding(llama_api):
    before = llama_api.metrics()
    with anthropic_sdk(llama_api).messages.stream(
        model=MODEL_ID,
        max_tokens=400,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
    ) as s:
        for i, _ in enumerate(s.text_stream):
            if i == 2:
                break
    cancelled = before["labkit_streams_cancelled_total"] + 1
    assert wait_for(
        lambda: (
            (m := llama_api.metrics())["labkit_engine_busy"] == 0
            and m["labkit_streams_cancelled_total"] == cancelled
        )
    )
    m1 = llama_api.metrics()
    assert m1["labkit_tokens_generated_total"] - before["labkit_tokens_generated_total"] < 200
    _only_the_next_reply_is_generated(llama_api, extra_body={"temperature": 0})


def test_metrics_endpoint_is_prometheus_text(sim_api):
    text = httpx.get(sim_api.base_url + "/metrics").text
    assert "# TYPE labkit_streams_cancelled_total counter" in text
    assert 'labkit_ttft_seconds_bucket{le="+Inf"}' in text


def test_non_streaming_request_abandoned_by_the_client_stops_the_engine(sim_api):
    before = sim_api.metrics()
    body = {"model": MODEL_ID, "max_tokens": 1000, "messages": USER}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            sim_api.base_url + "/v1/messages",
            json=body,
            timeout=0.3,
            headers=sim_header(reply_tokens=500, itl_ms=20, ttft_ms=0),
        )
    assert wait_for(
        lambda: (
            sim_api.metrics()["labkit_streams_cancelled_total"]
            == before["labkit_streams_cancelled_total"] + 1
        )
    )
    _only_the_next_reply_is_generated(
        sim_api, extra_headers=sim_header(reply_tokens=15, itl_ms=20, ttft_ms=0)
    )


def test_every_engine_error_type_has_an_http_status():
    from labkit.localapi.engine import ERROR_TYPES
    from labkit.localapi.wire import ERROR_STATUS

    assert set(ERROR_STATUS) == set(ERROR_TYPES)
    assert all(400 <= status < 600 for status in ERROR_STATUS.values())
