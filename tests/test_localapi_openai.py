"""The local API's OpenAI Chat Completions wire format, driven through the official SDK."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from helpers import USER, openai_sdk, sim_header

from labkit.localapi import MODEL_ID


def test_stream_role_chunk_first_then_content_then_usage(sim_api):
    chunks = list(
        openai_sdk(sim_api).chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=sim_header(reply_tokens=5),
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens > 0
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 5


def test_stream_without_include_usage_has_no_usage_chunk(sim_api):
    chunks = list(
        openai_sdk(sim_api).chat.completions.create(
            model=MODEL_ID, messages=USER, stream=True, extra_headers=sim_header(reply_tokens=2)
        )
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_raw_stream_ends_with_done(sim_api):
    body = {"model": MODEL_ID, "messages": USER, "stream": True}
    r = httpx.post(
        sim_api.openai_base_url + "/chat/completions", json=body, headers=sim_header(reply_tokens=2)
    )
    lines = [ln for ln in r.text.splitlines() if ln.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0].removeprefix("data: "))["object"] == "chat.completion.chunk"


def test_stream_helper_gives_final_completion(sim_api):
    with openai_sdk(sim_api).chat.completions.stream(
        model=MODEL_ID,
        messages=USER,
        max_tokens=50,
        stream_options={"include_usage": True},
        extra_headers=sim_header(reply_tokens=4),
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "".join(deltas)
    assert final.usage.completion_tokens == 4


def test_stream_helper_raises_length_error_at_max_tokens(sim_api):
    with (
        pytest.raises(openai.LengthFinishReasonError),
        openai_sdk(sim_api).chat.completions.stream(
            model=MODEL_ID, messages=USER, max_tokens=3, extra_headers=sim_header(reply_tokens=10)
        ) as stream,
    ):
        for _ in stream:
            pass
        stream.get_final_completion()


def test_create_non_streaming(sim_api):
    done = openai_sdk(sim_api).chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": "Be brief."}, *USER],
        max_tokens=3,
        extra_headers=sim_header(reply_tokens=10),
    )
    assert done.object == "chat.completion" and done.choices[0].finish_reason == "length"
    assert (
        done.usage.completion_tokens == 3
        and done.usage.total_tokens == done.usage.prompt_tokens + 3
    )


def test_required_tool_choice_streams_tool_call_deltas(sim_api):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {
                    "type": "object",
                    "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
                    "required": ["query", "limit"],
                },
            },
        }
    ]
    with openai_sdk(sim_api).chat.completions.stream(
        model=MODEL_ID, messages=USER, tools=tools, tool_choice="required"
    ) as stream:
        pieces = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert len(pieces) >= 3
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and set(json.loads(call.function.arguments)) == {
        "query",
        "limit",
    }
    assert final.choices[0].finish_reason == "tool_calls"


def test_unknown_model_is_not_found(sim_api):
    with pytest.raises(openai.NotFoundError) as info:
        openai_sdk(sim_api).chat.completions.create(model="nope", messages=USER)
    assert info.value.code == "model_not_found"


def test_context_overflow_is_a_bad_request(sim_api):
    with pytest.raises(openai.BadRequestError) as info:
        openai_sdk(sim_api).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "word " * 9000}]
        )
    assert info.value.code == "context_length_exceeded"


def test_unknown_role_and_empty_messages_are_bad_requests(sim_api):
    with pytest.raises(openai.BadRequestError, match="role"):
        openai_sdk(sim_api).chat.completions.create(
            model=MODEL_ID, messages=[{"role": "robot", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError, match="at least one"):
        openai_sdk(sim_api).chat.completions.create(model=MODEL_ID, messages=[])


def test_rate_limit_and_overload_map_to_sdk_errors(sim_api):
    with pytest.raises(openai.RateLimitError):
        openai_sdk(sim_api).chat.completions.create(
            model=MODEL_ID, messages=USER, extra_headers=sim_header(fail_before="rate_limit_error")
        )
    with pytest.raises(openai.InternalServerError):
        openai_sdk(sim_api).chat.completions.create(
            model=MODEL_ID, messages=USER, extra_headers=sim_header(fail_before="overloaded_error")
        )


def test_mid_stream_error_surfaces_as_api_error(sim_api):
    got = []
    with pytest.raises(openai.APIError, match="Overloaded"):
        for chunk in openai_sdk(sim_api).chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            stream=True,
            extra_headers=sim_header(reply_tokens=10, fail_after=2, fail_with="overloaded_error"),
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert len(got) == 2


def test_models_list(sim_api):
    assert [m.id for m in openai_sdk(sim_api).models.list()] == [MODEL_ID]


@pytest.mark.llama
def test_llama_stream_with_usage_and_cached_tokens(llama_api):
    client = openai_sdk(llama_api)
    kwargs = {
        "model": MODEL_ID,
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a fruit."},
        ],
    }
    first = list(client.chat.completions.create(**kwargs))
    second = list(client.chat.completions.create(**kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in first if c.choices)
    assert text.strip()
    assert first[-1].usage.completion_tokens <= 12
    assert second[-1].usage.prompt_tokens_details.cached_tokens > 0
    assert second[-1].usage.prompt_tokens == first[-1].usage.prompt_tokens
