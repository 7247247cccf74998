"""The local API keeps the real APIs' promises about structured output: forced tool calls
and JSON replies are valid against their schemas (sim: a valid example; llama: a
llama.cpp grammar), and what cannot be enforced is refused with a 400 that names it.
Driven through the official SDKs."""

from __future__ import annotations

import json

import anthropic
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from labkit.localapi import MODEL_ID
from labkit.localapi.engine import EngineError
from labkit.localapi.schema import check_schema, example

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
}
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": WEATHER_SCHEMA,
}
TIME = {
    "name": "get_time",
    "description": "Get the local time in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
ASK = [{"role": "user", "content": "What's the weather in Mumbai?"}]


class City(BaseModel):
    city: str


class Trip(BaseModel):
    origin: str
    destination: str
    nights: int
    # bounded: unbounded, the 135M model repeats list items until max_tokens
    tags: list[str] = Field(max_length=3)


def claude(api) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.base_url, api_key="test", max_retries=0)


def gpt(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.openai_base_url, api_key="test", max_retries=0)


def fn(tool: dict) -> dict:
    return {
        "type": "function",
        "function": {
            "name": tool["name"],
            "description": tool["description"],
            "parameters": tool["input_schema"],
        },
    }


# ── schemas: accepted, normalised, refused ────────────────────────────────────


@pytest.mark.parametrize(
    "schema",
    [
        City.model_json_schema(),
        Trip.model_json_schema(),
        {"type": ["string", "null"], "minLength": 3},
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
        {"type": "string", "format": "email"},
        {"type": "string", "format": "date-time"},
        {"type": "string", "pattern": r"^\d{3}-[a-z]+$"},
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/A"}},
            "$defs": {"A": {"const": 1}},
        },
    ],
)
def test_sim_example_is_valid_against_every_accepted_schema(schema):
    value = example(check_schema(schema, "schema"))
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "integer", "minimum": 1}, "schema.minimum"),
        (
            {"type": "object", "properties": {"n": {"type": "number", "maximum": 3}}},
            "properties.n.maximum",
        ),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "schema.not"),
        ({"type": "string", "format": "color"}, "format 'color'"),
        ({"type": "string", "pattern": "^a$", "minLength": 2}, "pattern and minLength"),
        ({"type": "string", "pattern": "(?=a)a"}, "lookarounds"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
    ],
)
def test_unconstrainable_schema_features_are_refused_by_name(schema, named):
    with pytest.raises(EngineError) as info:
        check_schema(schema, "schema")
    assert info.value.error_type == "invalid_request_error"
    assert named in info.value.message


def test_annotations_and_unknown_keywords_are_accepted():
    schema = {
        "type": "object",
        "title": "T",
        "description": "d",
        "properties": {"x": {"type": "string", "default": "a", "examples": ["b"], "x-ui": 1}},
        "required": ["x"],
    }
    assert check_schema(schema, "s")["properties"]["x"]["type"] == "string"


def test_refusal_reaches_both_sdks_as_a_400_naming_the_keyword(sim_api):
    bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    with pytest.raises(
        anthropic.BadRequestError, match=r"tools\.0\.input_schema\.properties\.n\.minimum"
    ):
        claude(sim_api).messages.create(
            model=MODEL_ID,
            max_tokens=20,
            messages=ASK,
            tools=[{**WEATHER, "input_schema": bad}],
            tool_choice={"type": "any"},
        )
    with pytest.raises(openai.BadRequestError, match="minimum"):
        gpt(sim_api).chat.completions.create(
            model=MODEL_ID,
            messages=ASK,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": bad}},
        )


def test_auto_tool_choice_does_not_check_schemas(sim_api):
    bad = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}
    msg = claude(sim_api).messages.create(
        model=MODEL_ID, max_tokens=5, messages=ASK, tools=[{**WEATHER, "input_schema": bad}]
    )
    assert msg.content[0].type == "text"


# ── sim engine: valid JSON on both formats ────────────────────────────────────


def test_sim_parse_gets_a_parsed_object(sim_api):
    done = gpt(sim_api).chat.completions.parse(model=MODEL_ID, messages=ASK, response_format=Trip)
    assert isinstance(done.choices[0].message.parsed, Trip)


def test_sim_json_object_needs_the_word_json_and_gives_an_object(sim_api):
    with pytest.raises(openai.BadRequestError, match="must contain the word 'json'"):
        gpt(sim_api).chat.completions.create(
            model=MODEL_ID, messages=ASK, response_format={"type": "json_object"}
        )
    done = gpt(sim_api).chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Answer in JSON: what's up?"}],
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(done.choices[0].message.content), dict)


def test_sim_anthropic_output_format_parses(sim_api):
    msg = claude(sim_api).messages.parse(
        model=MODEL_ID, max_tokens=100, messages=ASK, output_format=Trip
    )
    assert isinstance(msg.parsed_output, Trip)


# ── the field audit: implemented or 400 ───────────────────────────────────────


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"extra_body": {"foo": 1}}, "foo"),
    ],
)
def test_openai_fields_the_local_api_cannot_honour_are_400s(sim_api, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        gpt(sim_api).chat.completions.create(model=MODEL_ID, messages=ASK, **kwargs)
    assert info.value.param == param and info.value.code in (
        "unsupported_parameter",
        "unknown_parameter",
    )


def test_openai_fields_without_effect_here_are_accepted(sim_api):
    done = gpt(sim_api).chat.completions.create(
        model=MODEL_ID,
        messages=ASK,
        max_tokens=3,
        logprobs=False,
        metadata={"k": "v"},
        user="u",
        store=False,
        parallel_tool_calls=False,
        prompt_cache_key="k",
        frequency_penalty=0.5,
    )
    assert done.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"extra_body": {"foo": 1}}, "foo: Extra inputs are not permitted"),
        ({"output_config": {"effort": "low"}}, "output_config.effort"),
        ({"container": "c1"}, "container"),
    ],
)
def test_anthropic_fields_the_local_api_cannot_honour_are_400s(sim_api, kwargs, needle):
    with pytest.raises(anthropic.BadRequestError, match=needle):
        claude(sim_api).messages.create(model=MODEL_ID, max_tokens=5, messages=ASK, **kwargs)


def test_anthropic_server_tools_are_refused(sim_api):
    with pytest.raises(anthropic.BadRequestError, match="server tool"):
        claude(sim_api).messages.create(
            model=MODEL_ID,
            max_tokens=5,
            messages=ASK,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
        )


# ── llama engine: constrained decoding on the real model ──────────────────────


@pytest.mark.llama
def test_llama_named_tool_choice_gives_a_schema_valid_tool_use(llama_api):
    msg = claude(llama_api).messages.create(
        model=MODEL_ID,
        max_tokens=64,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body={"temperature": 0},
    )
    assert msg.stop_reason == "tool_use"
    (block,) = msg.content
    assert block.type == "tool_use" and block.name == "get_weather"
    jsonschema.validate(block.input, WEATHER_SCHEMA)


@pytest.mark.llama
def test_llama_any_tool_choice_streams_input_json_deltas(llama_api):
    with claude(llama_api).messages.stream(
        model=MODEL_ID,
        max_tokens=64,
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "any"},
    ) as stream:
        deltas = [e for e in stream if e.type == "input_json"]
        msg = stream.get_final_message()
    assert len(deltas) >= 2 and msg.stop_reason == "tool_use"
    block = msg.content[-1]
    assert block.name in ("get_weather", "get_time")
    jsonschema.validate(
        block.input, {"get_weather": WEATHER, "get_time": TIME}[block.name]["input_schema"]
    )


@pytest.mark.llama
def test_llama_required_tool_choice_streams_tool_call_deltas(llama_api):
    with gpt(llama_api).chat.completions.stream(
        model=MODEL_ID, messages=ASK, tools=[fn(WEATHER)], tool_choice="required", temperature=0
    ) as stream:
        pieces = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
        final = stream.get_final_completion()
    assert len(pieces) >= 2 and final.choices[0].finish_reason == "tool_calls"
    call = final.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)


@pytest.mark.llama
def test_llama_parse_gets_a_parsed_object(llama_api):
    done = gpt(llama_api).chat.completions.parse(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Plan a trip from Paris to Rome for 3 nights."}],
        response_format=Trip,
        temperature=0,
        max_tokens=120,
    )
    assert isinstance(done.choices[0].message.parsed, Trip)


@pytest.mark.llama
def test_llama_anthropic_output_format_parses(llama_api):
    msg = claude(llama_api).messages.parse(
        model=MODEL_ID,
        max_tokens=60,
        messages=[{"role": "user", "content": "Which city is the Eiffel Tower in?"}],
        output_format=City,
        extra_body={"temperature": 0},
    )
    assert isinstance(msg.parsed_output, City)


@pytest.mark.llama
def test_llama_json_cut_by_max_tokens_says_max_tokens(llama_api):
    msg = claude(llama_api).messages.create(
        model=MODEL_ID,
        max_tokens=3,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "any"},
    )
    assert msg.stop_reason == "max_tokens" and msg.content[0].type == "tool_use"


@pytest.mark.llama
def test_llama_count_tokens_counts_the_forced_tool_prompt(llama_api):
    client = claude(llama_api)
    forced = {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}
    counted = client.messages.count_tokens(model=MODEL_ID, messages=ASK, **forced).input_tokens
    plain = client.messages.count_tokens(model=MODEL_ID, messages=ASK).input_tokens
    msg = client.messages.create(
        model=MODEL_ID,
        max_tokens=30,
        messages=ASK,
        extra_headers={"x-labkit-cache": "off"},
        **forced,
    )
    assert counted > plain and counted == msg.usage.input_tokens


def test_count_tokens_refuses_what_messages_refuse(sim_api):
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        claude(sim_api).messages.count_tokens(
            model=MODEL_ID, messages=ASK, thinking={"type": "enabled", "budget_tokens": 1024}
        )
