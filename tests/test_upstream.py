"""labkit.upstream: one request builder, one usage normaliser, one error taxonomy."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from anthropic.types import Message, TextBlock, Usage
from openai.types.chat import ChatCompletionChunk
from openai.types.chat.chat_completion_chunk import Choice, ChoiceDelta
from openai.types.completion_usage import CompletionUsage, PromptTokensDetails

from labkit import upstream
from labkit.errors import ConfigurationError, UpstreamError

MESSAGES = [{"role": "user", "content": "hi"}]
MODEL = "smollm2-135m-instruct"


def test_anthropic_request_puts_system_on_top_and_temperature_in_extra_body():
    kw = upstream.Request("m", MESSAGES, 64, system="be brief", temperature=0).kwargs("anthropic")
    assert kw == {
        "model": "m",
        "max_tokens": 64,
        "messages": MESSAGES,
        "system": "be brief",
        "extra_body": {"temperature": 0},
    }


def test_openai_request_prepends_a_system_message_and_asks_for_usage_when_streaming():
    req = upstream.Request("m", MESSAGES, 64, system="be brief", temperature=0.5)
    kw = req.kwargs("openai", stream=True)
    assert kw["messages"] == [{"role": "system", "content": "be brief"}, *MESSAGES]
    assert kw["temperature"] == 0.5 and "extra_body" not in kw
    assert kw["stream"] is True and kw["stream_options"] == {"include_usage": True}
    assert "stream" not in req.kwargs("openai")


def test_request_without_system_or_temperature_sends_neither():
    for api in ("anthropic", "openai"):
        kw = upstream.Request("m", MESSAGES).kwargs(api)
        assert "system" not in kw and "temperature" not in kw and "extra_body" not in kw
        assert kw["messages"] == MESSAGES


def test_extra_headers_are_passed_to_either_sdk():
    req = upstream.Request("m", MESSAGES, extra_headers={"x-labkit-cache": "off"})
    for api in ("anthropic", "openai"):
        assert req.kwargs(api)["extra_headers"] == {"x-labkit-cache": "off"}


def test_api_of_knows_the_sdk_clients_and_refuses_anything_else():
    assert upstream.api_of(anthropic.Anthropic(api_key="k")) == "anthropic"
    assert upstream.api_of(openai.AsyncOpenAI(api_key="k")) == "openai"
    with pytest.raises(ConfigurationError):
        upstream.api_of(object())


def test_anthropic_input_tokens_include_cache_reads_and_writes():
    msg = Message(
        id="m",
        type="message",
        role="assistant",
        model="m",
        content=[TextBlock(type="text", text="hello")],
        stop_reason="end_turn",
        usage=Usage(
            input_tokens=12,
            output_tokens=3,
            cache_read_input_tokens=164,
            cache_creation_input_tokens=4,
        ),
    )
    reply = upstream.reply_from_message(msg)
    assert (reply.text, reply.input_tokens, reply.cached_tokens) == ("hello", 180, 164)
    assert reply.output_tokens == 3 and reply.usage_reported


def _chunk(content=None, finish=None, usage=None, choices=True):
    return ChatCompletionChunk(
        id="c",
        object="chat.completion.chunk",
        created=0,
        model="m",
        choices=[Choice(index=0, delta=ChoiceDelta(content=content), finish_reason=finish)]
        if choices
        else [],
        usage=usage,
    )


def test_chunk_accumulator_ignores_empty_chunks_and_reads_the_usage_chunk():
    acc = upstream.ChunkAccumulator()
    texts = [
        acc.add(_chunk(content="")),  # role-only first chunk
        acc.add(_chunk(content="Hel")),
        acc.add(_chunk(content="lo")),
        acc.add(_chunk(content=None, finish="stop")),
        acc.add(
            _chunk(
                choices=False,
                usage=CompletionUsage(
                    prompt_tokens=50,
                    completion_tokens=2,
                    total_tokens=52,
                    prompt_tokens_details=PromptTokensDetails(cached_tokens=32),
                ),
            )
        ),
    ]
    assert texts == ["", "Hel", "lo", "", ""]
    reply = acc.reply()
    assert (reply.text, reply.stop_reason) == ("Hello", "stop")
    assert (reply.input_tokens, reply.output_tokens, reply.cached_tokens) == (50, 2, 32)


def test_a_stream_without_usage_says_so_instead_of_reporting_zero_as_measured():
    acc = upstream.ChunkAccumulator()
    acc.add(_chunk(content="hi", finish="stop"))
    reply = acc.reply()
    assert reply.usage_reported is False and reply.text == "hi"


def _status_error(sdk, status, body):
    request = httpx.Request("POST", "http://x/v1/messages")
    response = httpx.Response(status, request=request, json=body)
    return sdk.APIStatusError("failed", response=response, body=body)


@pytest.mark.parametrize(
    ("status", "body", "kind", "http"),
    [
        (
            429,
            {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
            "rate_limit",
            429,
        ),
        (
            529,
            {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
            "overloaded",
            503,
        ),
        (401, None, "authentication", 502),
        (500, {"error": {"message": "boom", "code": "server_error"}}, "api_error", 502),
        (429, {"error": {"message": "slow", "code": "rate_limit_exceeded"}}, "rate_limit", 429),
    ],
)
def test_status_errors_map_to_a_kind_and_a_relay_status(status, body, kind, http):
    for sdk in (anthropic, openai):
        err = upstream.translate(_status_error(sdk, status, body))
        assert isinstance(err, UpstreamError)
        assert (err.kind, err.status, err.upstream_status) == (kind, http, status)
        assert err.hint


def test_an_error_event_inside_a_200_stream_is_reported_as_mid_stream_not_as_200():
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    err = upstream.translate(_status_error(anthropic, 200, body))
    assert (err.kind, err.status) == ("overloaded", 503)
    assert "(200)" not in err.message and "mid-stream" in err.message
    assert "(529)" in upstream.translate(_status_error(anthropic, 529, body)).message


def test_transport_errors_and_timeouts_are_upstream_errors_with_hints():
    request = httpx.Request("POST", "http://x")
    dropped = upstream.translate(httpx.RemoteProtocolError("peer closed", request=request))
    assert (dropped.kind, dropped.status) == ("connection_error", 502)
    late = upstream.translate(anthropic.APITimeoutError(request=request))
    assert (late.kind, late.status) == ("timeout", 504)
    conn = upstream.translate(openai.APIConnectionError(request=request))
    assert conn.kind == "connection_error" and "running" in conn.hint


def test_a_connection_error_names_its_cause_even_when_the_cause_says_nothing():
    request = httpx.Request("POST", "http://x")
    for cause, told in ((httpx.ReadError(""), "(ReadError: no detail)"),
                        (httpx.ConnectError("refused"), "(ConnectError: refused)")):  # fmt: skip
        try:
            raise anthropic.APIConnectionError(request=request) from cause
        except anthropic.APIConnectionError as exc:
            assert told in upstream.translate(exc).message


def test_sdk_errors_cover_both_sdks_and_the_transport():
    errors = upstream.sdk_errors()
    assert anthropic.APIError in errors and openai.APIError in errors
    assert any(issubclass(httpx.ReadError, e) for e in errors)


# ── live: the sim local API through both SDKs ─────────────────────────────────


def _clients(api, is_async=False):
    key = "labkit-local"
    if is_async:
        return (
            anthropic.AsyncAnthropic(base_url=api.base_url, api_key=key, max_retries=0),
            openai.AsyncOpenAI(base_url=api.base_url + "/v1", api_key=key, max_retries=0),
        )
    return (
        anthropic.Anthropic(base_url=api.base_url, api_key=key, max_retries=0),
        openai.OpenAI(base_url=api.base_url + "/v1", api_key=key, max_retries=0),
    )


def _request(api, sim=""):
    headers = {"x-labkit-sim": sim} if sim else None
    return upstream.Request(MODEL, MESSAGES, 8, extra_headers=headers)


def test_stream_yields_text_and_a_reply_with_usage_on_both_wire_formats(sim_api):
    for client in _clients(sim_api):
        with upstream.stream(client, _request(sim_api, "reply_tokens=5")) as s:
            texts = list(s.text_stream)
            reply = s.reply()
        assert "".join(texts) == reply.text and reply.text
        assert reply.output_tokens == 5 and reply.input_tokens > 0 and reply.usage_reported


def test_create_returns_the_same_reply_shape_as_stream(sim_api):
    for client in _clients(sim_api):
        reply = upstream.create(client, _request(sim_api, "reply_tokens=4"))
        assert reply.text and reply.output_tokens == 4 and reply.input_tokens > 0


async def test_astream_and_acreate_on_both_wire_formats(sim_api):
    for client in _clients(sim_api, is_async=True):
        async with upstream.astream(client, _request(sim_api, "reply_tokens=3")) as s:
            texts = [t async for t in s.text_stream]
            reply = await s.reply()
        assert "".join(texts) == reply.text and reply.output_tokens == 3
        assert (await upstream.acreate(client, _request(sim_api))).text


def test_a_stream_dropped_mid_way_raises_upstream_error_with_what_arrived(sim_api):
    for client in _clients(sim_api):
        seen = []
        request = _request(sim_api, "fail_after=2;fail_with=disconnect")
        with pytest.raises(UpstreamError) as info, upstream.stream(client, request) as s:
            for text in s.text_stream:
                seen.append(text)
        assert info.value.kind == "connection_error" and info.value.status == 502
        assert len(seen) == 2


def test_an_error_before_the_stream_is_an_upstream_error_with_the_api_kind(sim_api):
    for client in _clients(sim_api):
        request = _request(sim_api, "fail_before=rate_limit_error")
        with pytest.raises(UpstreamError) as info, upstream.stream(client, request):
            pass
        assert (info.value.kind, info.value.status, info.value.upstream_status) == (
            "rate_limit",
            429,
            429,
        )


async def test_a_streamed_request_sends_the_system_prompt_temperature_and_headers(sim_api):
    """Streams go through ``client.post`` with raw JSON events (note 3): what the SDK
    method would have sent must still be sent, on both formats, sync and async."""
    request = upstream.Request(
        MODEL, MESSAGES, 8, system="Be brief.", temperature=0.25, extra_headers={"x-a": "b"}
    )
    clients = [*_clients(sim_api), *_clients(sim_api, is_async=True)]
    for client in clients:
        if client.__class__.__name__.startswith("Async"):
            async with upstream.astream(client, request) as s:
                assert (await s.reply()).text
        else:
            with upstream.stream(client, request) as s:
                assert s.reply().text
        sent = httpx.get(sim_api.base_url + "/v1/labkit/requests?limit=1").json()["requests"][0]
        body = sent["body"]
        assert body["stream"] is True and body["temperature"] == 0.25 and body["max_tokens"] == 8
        if upstream.api_of(client) == "anthropic":
            assert body["system"] == "Be brief."
        else:
            assert body["messages"][0] == {"role": "system", "content": "Be brief."}
            assert body["stream_options"] == {"include_usage": True}


def test_message_accumulator_folds_events_and_survives_a_missing_message_start():
    events = [
        {
            "type": "message_start",
            "message": {
                "usage": {"input_tokens": 7, "output_tokens": 1, "cache_read_input_tokens": 3}
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "!"}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"output_tokens": 2},
        },
        {"type": "message_stop"},
    ]
    acc = upstream.MessageAccumulator()
    assert [acc.add(e) for e in events] == ["", "", "Hi", "!", "", ""]
    reply = acc.reply()
    assert (reply.text, reply.stop_reason, reply.output_tokens) == ("Hi!", "end_turn", 2)
    assert (reply.input_tokens, reply.cached_tokens, reply.usage_reported) == (10, 3, True)
    headless = upstream.MessageAccumulator()
    for e in events[1:]:  # llama-server's stream when the first token is half a character
        headless.add(e)
    assert headless.reply().text == "Hi!" and not headless.saw_message_start
    assert headless.reply().usage_reported is False
