"""labkit.providers: SDK clients for local, Anthropic and OpenAI."""

from __future__ import annotations

import pytest
from helpers import USER

from labkit.errors import ConfigurationError, UpstreamError
from labkit.localapi import MODEL_ID
from labkit.providers import DEFAULT_MODELS, client, score_candidates


@pytest.fixture
def clean_env(monkeypatch):
    for var in (
        "LABKIT_PROVIDER",
        "LABKIT_MODEL",
        "ANTHROPIC_API_KEY",
        "OPENAI_API_KEY",
        "ANTHROPIC_BASE_URL",
        "OPENAI_BASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_local_sim_is_started_once_and_reused(clean_env):
    a = client(engine="sim")
    b = client("local", engine="sim")
    assert a.provider == "local" and a.model == MODEL_ID and a.engine == "sim"
    assert a.base_url == b.base_url and a.base_url.startswith("http://127.0.0.1:")
    assert a.describe() == {
        "provider": "local",
        "model": MODEL_ID,
        "engine": "sim",
        "base_url": a.base_url,
    }
    msg = a.anthropic.messages.create(model=a.model, max_tokens=3, messages=USER)
    assert msg.content[0].text
    chunks = list(
        a.openai.chat.completions.create(model=a.model, messages=USER, stream=True, max_tokens=3)
    )
    assert chunks[0].choices[0].delta.role == "assistant"


async def test_local_async_clients_work(clean_env, sim_api):
    c = client("local", base_url=sim_api.base_url, engine="sim")
    msg = await c.async_anthropic.messages.create(model=c.model, max_tokens=3, messages=USER)
    done = await c.async_openai.chat.completions.create(model=c.model, max_tokens=3, messages=USER)
    assert msg.usage.output_tokens == 3 and done.usage.completion_tokens == 3


def test_local_base_url_is_used_as_given_and_v1_is_tolerated(clean_env, sim_api):
    c = client("local", base_url=sim_api.openai_base_url)
    assert c.base_url == sim_api.base_url
    assert c.openai.base_url.host == "127.0.0.1"


def test_paid_provider_without_key_says_what_is_missing(clean_env):
    with pytest.raises(ConfigurationError, match="ANTHROPIC_API_KEY") as info:
        client("anthropic")
    assert "export ANTHROPIC_API_KEY" in info.value.hint
    with pytest.raises(ConfigurationError, match="OPENAI_API_KEY"):
        client("openai")


def test_provider_comes_from_env_and_model_override(clean_env):
    clean_env.setenv("LABKIT_PROVIDER", "openai")
    clean_env.setenv("OPENAI_API_KEY", "sk-test")
    c = client()
    assert c.provider == "openai" and c.model == DEFAULT_MODELS["openai"]
    clean_env.setenv("LABKIT_MODEL", "gpt-custom")
    assert client().model == "gpt-custom"
    assert client(model="explicit").model == "explicit"


def test_wrong_wire_format_raises_configuration_error(clean_env):
    clean_env.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    clean_env.setenv("OPENAI_API_KEY", "sk-test")
    with pytest.raises(ConfigurationError, match="openai API"):
        _ = client("anthropic").openai
    with pytest.raises(ConfigurationError, match="anthropic API"):
        _ = client("openai").anthropic


def test_unknown_provider_is_a_configuration_error(clean_env):
    with pytest.raises(ConfigurationError, match="Unknown provider"):
        client("bedrock")


def test_anthropic_base_url_env_lets_a_compatible_server_stand_in(clean_env, sim_api):
    clean_env.setenv("LABKIT_PROVIDER", "anthropic")
    clean_env.setenv("ANTHROPIC_BASE_URL", sim_api.base_url)
    c = client()
    assert c.provider == "anthropic" and c.describe()["base_url"] == sim_api.base_url
    msg = c.anthropic.messages.create(model=c.model, max_tokens=3, messages=USER)
    assert msg.model == DEFAULT_MODELS["anthropic"]


def test_openai_base_url_env_is_honoured(clean_env, sim_api):
    clean_env.setenv("OPENAI_BASE_URL", sim_api.openai_base_url)
    c = client("openai")
    done = c.openai.chat.completions.create(model=c.model, max_tokens=2, messages=USER)
    assert done.usage.completion_tokens == 2


def test_score_candidates_needs_the_local_llama_engine(clean_env, sim_api):
    clean_env.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    with pytest.raises(ConfigurationError, match="local API"):
        score_candidates(client("anthropic"), USER, ["a"])
    with pytest.raises(UpstreamError, match="llama engine"):
        score_candidates(client("local", base_url=sim_api.base_url), USER, ["a"])


@pytest.mark.llama
def test_score_candidates_ranks_the_obvious_answer_first(clean_env, llama_api):
    c = client("local", base_url=llama_api.base_url)
    messages = [
        {"role": "user", "content": "My name is Alice. What is my name?"},
        {"role": "assistant", "content": "Your name is"},
    ]
    scores = score_candidates(c, messages, [" Alice", " Bob", " Pineapple"])
    assert len(scores) == 3 and all(s < 0 for s in scores)
    assert scores[0] == max(scores)
    # scoring leaves generation intact
    msg = c.anthropic.messages.create(model=c.model, max_tokens=4, messages=USER)
    assert msg.usage.output_tokens >= 1


def test_importing_providers_does_not_load_the_local_api_server_or_its_libraries():
    import json
    import subprocess
    import sys

    code = "import json, sys, labkit.providers; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(out.stdout))
    heavy = {"fastapi", "uvicorn", "llama_cpp", "sse_starlette"} & loaded
    assert not heavy, f"import labkit.providers loaded {sorted(heavy)}"
    localapi = {m for m in loaded if m.startswith("labkit.localapi.")}
    assert localapi == {"labkit.localapi.constants"}
