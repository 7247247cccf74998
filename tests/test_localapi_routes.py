"""The local API's routes answer as the real APIs do: models.retrieve, request ids the SDKs
read, errors (unknown routes included) in each format's own shape, and the prompt-cache
state echoed in ``x-labkit-cache``."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from labkit.localapi import MODEL_ID
from labkit.localapi.wire import wire_format

USER = [{"role": "user", "content": "Say hello."}]


def claude(api) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=api.base_url, api_key="test", max_retries=0)


def gpt(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.openai_base_url, api_key="test", max_retries=0)


def test_models_retrieve_in_both_sdks(sim_api):
    assert gpt(sim_api).models.retrieve(MODEL_ID).id == MODEL_ID
    info = claude(sim_api).models.retrieve(MODEL_ID)
    assert info.id == MODEL_ID and info.display_name


def test_models_retrieve_of_an_unknown_model_is_a_404_in_each_shape(sim_api):
    with pytest.raises(openai.NotFoundError) as oi:
        gpt(sim_api).models.retrieve("no-such-model")
    assert oi.value.code == "model_not_found"
    with pytest.raises(anthropic.NotFoundError) as ai:
        claude(sim_api).models.retrieve("no-such-model")
    assert ai.value.body["error"]["type"] == "not_found_error"


def test_sdks_see_request_ids(sim_api):
    done = gpt(sim_api).chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2)
    assert done._request_id and done._request_id.startswith("req_")
    msg = claude(sim_api).messages.create(model=MODEL_ID, max_tokens=2, messages=USER)
    assert msg._request_id and msg._request_id.startswith("req_")


def test_errors_carry_request_ids_too(sim_api):
    with pytest.raises(openai.BadRequestError) as oi:
        gpt(sim_api).chat.completions.create(model=MODEL_ID, messages=[])
    assert oi.value.request_id
    with pytest.raises(anthropic.BadRequestError) as ai:
        claude(sim_api).messages.create(model=MODEL_ID, max_tokens=0, messages=USER)
    assert ai.value.request_id and ai.value.body["request_id"] == ai.value.request_id


def test_openai_errors_have_openai_shape_with_code(sim_api):
    with pytest.raises(openai.RateLimitError) as info:
        gpt(sim_api).chat.completions.create(
            model=MODEL_ID,
            messages=USER,
            extra_headers={"x-labkit-sim": "fail_before=rate_limit_error"},
        )
    assert info.value.code == "rate_limit_exceeded"
    assert set(info.value.body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("path", ["/v1/responses", "/v1/embeddings", "/v1/completions"])
def test_unknown_openai_routes_get_openai_shaped_404s(sim_api, path):
    r = httpx.post(sim_api.base_url + path, json={"model": MODEL_ID})
    assert r.status_code == 404 and r.headers["x-request-id"].startswith("req_")
    error = r.json()["error"]
    assert error["code"] == "unknown_url" and path in error["message"]


def test_openai_sdk_raises_not_found_with_a_code_on_an_unknown_route(sim_api):
    with pytest.raises(openai.NotFoundError) as info:
        gpt(sim_api).embeddings.create(model=MODEL_ID, input="x")
    assert info.value.code == "unknown_url"


@pytest.mark.parametrize("path", ["/v1/messages/batches", "/nope"])
def test_other_unknown_routes_get_anthropic_shaped_404s(sim_api, path):
    r = httpx.post(sim_api.base_url + path, json={})
    assert r.status_code == 404 and r.headers["request-id"].startswith("req_")
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "not_found_error"


def test_shared_routes_answer_anthropic_clients_in_anthropic_shape():
    assert wire_format("/v1/models/x", {"anthropic-version": "2023-06-01"}) == "anthropic"
    assert wire_format("/v1/models/x", {}) == "openai"
    assert wire_format("/v1/chat/completions", {"anthropic-version": "x"}) == "openai"
    assert wire_format("/health", {}) == "anthropic"


def test_cache_header_is_echoed_as_honoured(sim_api):
    r = gpt(sim_api).chat.completions.with_raw_response.create(
        model=MODEL_ID, messages=USER, max_tokens=2, extra_headers={"x-labkit-cache": "off"}
    )
    assert r.headers["x-labkit-cache"] == "off"
    # the sim engine has no prompt cache: "on" is never claimed
    r = claude(sim_api).messages.with_raw_response.create(
        model=MODEL_ID, max_tokens=2, messages=USER
    )
    assert r.headers["x-labkit-cache"] == "off"


@pytest.mark.llama
def test_llama_echoes_cache_on_and_off(llama_api):
    client = claude(llama_api)
    on = client.messages.with_raw_response.create(model=MODEL_ID, max_tokens=2, messages=USER)
    off = client.messages.with_raw_response.create(
        model=MODEL_ID, max_tokens=2, messages=USER, extra_headers={"x-labkit-cache": "off"}
    )
    assert on.headers["x-labkit-cache"] == "on" and off.headers["x-labkit-cache"] == "off"
    assert off.parse().usage.cache_read_input_tokens == 0


def test_an_idle_connection_outlives_the_clients_keep_alive_expiry(sim_api):
    """The local API keeps an idle connection longer than httpx and the SDKs keep it
    (5 s), so a client's reuse never meets the server's close (localapi.server note 4)."""
    import http.client
    import select
    import time
    from urllib.parse import urlsplit

    url = urlsplit(sim_api.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    conn.request("GET", "/health")
    first = conn.getresponse()
    assert first.status == 200 and first.read()
    sock = conn.sock
    # The response was read whole, so the idle socket turns readable only when the
    # server closes it. Watch it until past httpx's 5 s expiry.
    deadline = time.monotonic() + 6.5
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        assert not readable, "the server closed the idle connection"
    conn.request("GET", "/health")
    again = conn.getresponse()
    assert conn.sock is sock and again.status == 200
    conn.close()
