"""labkit.tokens: offline encodings, message estimates, the count cache, exact counts."""

from __future__ import annotations

import socket

import pytest
import tiktoken
import tiktoken.registry

from labkit import tokens
from labkit.errors import ConfigurationError
from labkit.tokens import (
    MESSAGE_OVERHEAD,
    REPLY_PRIMING,
    TokenCounter,
    count_messages,
    count_tokens,
    exact_count,
    message_text,
)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Refuse every non-loopback connection, start from an empty tiktoken cache."""
    real_connect = socket.socket.connect

    def connect(self, address):  # type: ignore[no-untyped-def]
        host = address[0] if isinstance(address, tuple) else address
        if (
            isinstance(host, str)
            and host not in ("127.0.0.1", "::1", "localhost")
            and "/" not in host
        ):
            raise OSError(f"network unreachable (test): {address!r}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(f"name resolution refused (test): {host!r}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    tokens.get_encoding.cache_clear()
    yield tmp_path / "tiktoken-cache"
    tokens.get_encoding.cache_clear()


def test_plain_tiktoken_cannot_load_here_without_the_bundled_files(no_network):
    with pytest.raises(Exception):  # noqa: B017 (requests' or urllib's own error)
        tiktoken.get_encoding("cl100k_base")


@pytest.mark.parametrize(
    ("name", "ids"), [("cl100k_base", [15339, 1917]), ("o200k_base", [24912, 2375])]
)
def test_hello_world_ids_offline_through_tiktokens_own_loader(no_network, name, ids):
    enc = tokens.get_encoding(name)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.encode("hello world") == ids
    assert any(no_network.iterdir()), "the rank file was placed in tiktoken's cache dir"


def test_count_tokens_matches_the_encoder():
    assert count_tokens("hello world") == 2
    assert count_tokens("hello world", encoding="o200k_base") == 2
    assert count_tokens("") == 0


def test_count_tokens_accepts_special_token_text():
    assert count_tokens("<|endoftext|>") > 1


def test_count_messages_uses_the_course_overhead_convention():
    msgs = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]
    expected = 2 + 1 + 2 * MESSAGE_OVERHEAD + REPLY_PRIMING
    assert count_messages(msgs) == expected
    assert count_messages(msgs, system="hello world") == expected + 2
    assert count_messages([]) == REPLY_PRIMING


def test_message_text_flattens_content_blocks():
    m = {
        "role": "user",
        "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
    }
    assert message_text(m) == "hello\nworld"
    tool = {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}],
    }
    assert '"tool_use"' in message_text(tool)


def test_token_counter_encodes_each_content_once():
    counter = TokenCounter()
    history = [{"role": "user", "content": f"message number {i} " * 20} for i in range(50)]
    first = counter.messages(history, system="be brief")
    assert counter.encoded == 51
    # A growing conversation: re-counting costs only the new message.
    history.append({"role": "assistant", "content": "a new reply"})
    second = counter.messages(history, system="be brief")
    assert counter.encoded == 52
    assert second == first + count_tokens("a new reply") + MESSAGE_OVERHEAD
    assert second == count_messages(history, system="be brief")


def test_token_counter_is_bounded():
    counter = TokenCounter(maxsize=3)
    for i in range(10):
        counter.text(f"text {i}")
    assert len(counter) <= 3


def test_exact_count_refuses_openai_with_a_hint():
    class OpenAIClients:
        provider = "openai"
        model = "gpt-4o-mini"

    with pytest.raises(ConfigurationError) as info:
        exact_count(OpenAIClients(), [{"role": "user", "content": "hi"}])
    assert "count_messages" in info.value.hint


def test_exact_count_asks_the_local_apis_count_tokens_endpoint(sim_clients):
    short = [{"role": "user", "content": "hello"}]
    long = [{"role": "user", "content": "hello " * 100}]
    n_short = exact_count(sim_clients, short)
    assert n_short > 0
    assert exact_count(sim_clients, long) > n_short + 50
    assert exact_count(sim_clients, short, system="You are terse.") > n_short
