"""Request limits of the local API: body size, header size, messages, max_tokens; each
refused with a 4xx that names the limit, before the server holds the request in memory."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from helpers import USER, Flood

from labkit.localapi import MODEL_ID
from labkit.localapi.constants import CONTEXT_WINDOW
from labkit.localapi.limits import (
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    MAX_MESSAGES,
    MIN_TOKENS_PER_MESSAGE,
)

MiB = 1024 * 1024


def test_body_bound_is_the_context_window_at_the_worst_bytes_per_token():
    # 8,192 tokens x 128 bytes (the longest cl100k token) x 6 (JSON \u00XX escaping) + 64 KiB.
    assert MAX_BODY_BYTES == CONTEXT_WINDOW * 128 * 6 + 64 * 1024 == 6_356_992


def test_a_prompt_that_fills_the_window_still_fits_the_body_bound(sim_api):
    """The worst legitimate body: the longest tokens, every byte escaped, just under the
    window; it is read (400 for the window, or 200), never refused as too large."""
    text = "\\u0020" * 128  # one cl100k token (128 spaces), each escaped to 6 bytes
    content = text * (CONTEXT_WINDOW - 64)
    head = f'{{"model": "{MODEL_ID}", "max_tokens": 1, "messages": [{{"role": "user", "content": "'
    raw = (head + content + '"}]}').encode()
    assert len(raw) < MAX_BODY_BYTES
    r = httpx.post(
        sim_api.base_url + "/v1/messages/count_tokens",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["input_tokens"] <= CONTEXT_WINDOW


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
def test_declared_oversized_body_gets_413_at_once_and_nothing_is_read(sim_api, path):
    growth, (status, body, seconds, sent, headers) = Flood.peak_growth(
        sim_api.proc.pid, Flood.declared, sim_api.base_url, path, 300 * MiB
    )
    assert status == 413, body
    kind = body["error"]["type"]
    assert kind == ("request_too_large" if path == "/v1/messages" else "invalid_request_error")
    assert (
        f"{MAX_BODY_BYTES:,}" in body["error"]["message"]
        or str(MAX_BODY_BYTES) in body["error"]["message"]
    )
    assert headers.get("connection") == "close"
    assert seconds < 5 and sent < 64 * MiB  # refused from the headers, not after 300 MB
    assert growth < 5, f"server grew {growth:.1f} MiB"


def test_endless_chunked_body_is_cut_at_the_bound(sim_api):
    growth, (status, body, seconds, sent, headers) = Flood.peak_growth(
        sim_api.proc.pid, Flood.chunked, sim_api.base_url, "/v1/messages"
    )
    assert status == 413, body
    assert body["error"]["type"] == "request_too_large"
    assert f"{MAX_BODY_BYTES:,}" in body["error"]["message"]
    assert headers.get("connection") == "close"
    assert seconds < 10 and sent < MAX_BODY_BYTES + 32 * MiB
    # At most the bound is held while it is read; nothing near what was sent.
    assert growth < MAX_BODY_BYTES / MiB + 6, f"server grew {growth:.1f} MiB"


def test_endless_header_line_gets_431(sim_api):
    growth, (status, body, seconds, sent, _) = Flood.peak_growth(
        sim_api.proc.pid, Flood.header, sim_api.base_url
    )
    assert status == 431, body
    assert f"{MAX_HEADER_BYTES:,}" in body["error"]["message"]
    assert seconds < 5 and sent < 16 * MiB
    assert growth < 5, f"server grew {growth:.1f} MiB"
    assert httpx.get(sim_api.base_url + "/health").status_code == 200  # still serving


def test_ordinary_headers_pass(sim_api):
    headers = {f"x-pad-{i}": "p" * 100 for i in range(60)}  # ~6.5 KB of headers
    assert httpx.get(sim_api.base_url + "/health", headers=headers).status_code == 200


def test_more_messages_than_the_window_holds_get_400(sim_api):
    many = [
        {"role": "user" if i % 2 == 0 else "assistant", "content": ""}
        for i in range(MAX_MESSAGES + 1)
    ]
    client = anthropic.Anthropic(base_url=sim_api.base_url, api_key="test", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL_ID, max_tokens=5, messages=many)
    assert f"at most {MAX_MESSAGES:,}" in e.value.body["error"]["message"]
    oa = openai.OpenAI(base_url=sim_api.openai_base_url, api_key="test", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oa.chat.completions.create(model=MODEL_ID, messages=many)
    assert f"at most {MAX_MESSAGES:,}" in e.value.body["message"]


def test_a_message_costs_at_least_the_tokens_the_message_bound_assumes():
    """The bound on messages holds for both tokenizers (SmolLM2: 5 per empty message)."""
    from labkit.localapi.engine import ChatMessage, render_chatml
    from labkit.tokens import get_encoding

    enc = get_encoding("cl100k_base")
    empty = [ChatMessage("user", "") for _ in range(100)]
    grown = len(enc.encode(render_chatml("", empty), disallowed_special=())) - len(
        enc.encode(render_chatml("", []), disallowed_special=())
    )
    assert grown >= 100 * MIN_TOKENS_PER_MESSAGE


@pytest.mark.parametrize("max_tokens", [CONTEXT_WINDOW, 10**12])
def test_max_tokens_is_bounded_by_the_context_window(sim_api, max_tokens):
    body = {"model": MODEL_ID, "max_tokens": max_tokens, "messages": USER}
    r = httpx.post(sim_api.base_url + "/v1/messages", json=body)
    assert r.status_code == 400
    assert f"{max_tokens} > {CONTEXT_WINDOW}" in r.json()["error"]["message"]
    r = httpx.post(sim_api.openai_base_url + "/chat/completions", json=body)
    assert r.status_code == 400
    assert f"maximum context length is {CONTEXT_WINDOW}" in r.json()["error"]["message"]


def test_text_longer_than_the_window_can_hold_is_refused_before_tokenizing(sim_api):
    from labkit.localapi.limits import MAX_PROMPT_CHARS

    client = anthropic.Anthropic(base_url=sim_api.base_url, api_key="test", max_retries=0)
    text = " " * (MAX_PROMPT_CHARS + 1)
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.count_tokens(model=MODEL_ID, messages=[{"role": "user", "content": text}])
    assert f"at most {MAX_PROMPT_CHARS:,}" in e.value.body["error"]["message"]


def test_deeply_nested_json_is_a_400_not_a_crash(sim_api):
    raw = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = httpx.post(
        sim_api.base_url + "/v1/messages", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_the_bounds_follow_a_wider_context_window(sim_factory):
    """The sim's window is a server option: a body over the default bound is read
    when the window is wide enough for it."""
    from helpers import ZERO_LATENCY

    from labkit.localapi.limits import max_body_bytes

    api = sim_factory(**ZERO_LATENCY, context_window=50_000)
    assert max_body_bytes(50_000) > 7 * MiB > MAX_BODY_BYTES
    content = "\\u0020" * (7 * MiB // 6)  # 7 MiB of JSON, 1.2 M spaces: ~9,600 tokens
    head = f'{{"model": "{MODEL_ID}", "messages": [{{"role": "user", "content": "'
    raw = (head + content + '"}]}').encode()
    r = httpx.post(
        api.base_url + "/v1/messages/count_tokens",
        content=raw,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 200, r.text[:300]
    assert CONTEXT_WINDOW < r.json()["input_tokens"] < 50_000


def test_request_log_keeps_bytes_not_parsed_bodies(sim_api):
    """The last 64 bodies are kept for GET /v1/labkit/requests: as bytes, not as parsed
    JSON (a 1 MB body of small values parses into 20+ MB)."""
    junk = b"{}," * 340_000
    body = b'{"model": "x", "max_tokens": 1, "messages": [], "junk": [' + junk + b"{}]}"
    headers = {"content-type": "application/json"}

    def send() -> None:
        for _ in range(16):
            httpx.post(sim_api.base_url + "/v1/messages", content=body, headers=headers, timeout=60)

    growth, _ = Flood.peak_growth(sim_api.proc.pid, send)
    assert growth < 16 * len(body) / MiB + 32, f"server grew {growth:.0f} MiB"
    kept = httpx.get(sim_api.base_url + "/v1/labkit/requests?limit=1", timeout=60).json()
    assert len(kept["requests"][0]["body"]["junk"]) == 340_001
