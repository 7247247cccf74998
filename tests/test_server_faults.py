"""Upstream faults injected through the sim engine's server-wide flags: the chat API
answers with an error event then a done event, and the stored history stays
well-formed (note 1 of labkit.server.service: a failed turn stores nothing)."""

from __future__ import annotations

import pytest
from helpers import CHAT_SIM

from labkit.server.client import ChatAPIError, ChatClient


def _well_formed(hist: dict) -> None:
    roles = [m["role"] for m in hist["messages"]]
    assert roles == ["user", "assistant"] * hist["turn_count"]
    assert all(m["content"].strip() for m in hist["messages"])


FAULTS = {
    "error-before-first-byte": {"fail_before": "api_error"},
    "rate-limit": {"fail_before": "rate_limit_error"},
    "error-after-1-delta": {"fail_after": 1, "fail_with": "api_error"},
    "error-after-50-deltas": {
        "fail_after": 50,
        "fail_with": "overloaded_error",
        "reply_tokens": 80,
    },
    "dropped-after-5-deltas": {"fail_after": 5, "fail_with": "disconnect"},
    "random-40%": {"fail_rate": 0.4, "fail_after": 2, "fail_with": "api_error", "seed": 3},
}


@pytest.fixture(scope="module")
def fault_servers(chat_sim, sim_factory, tmp_path_factory):
    """One sim per fault (the chat tests' sim options plus the fault's flags) and a chat
    server on each, all sharing one store with a healthy chat server ("good")."""
    from concurrent.futures import ThreadPoolExecutor

    from labkit.server import ChatServer

    store = f"sqlite:///{tmp_path_factory.mktemp('faults')}/faults.db"
    apis = sim_factory.many(*({**CHAT_SIM, **flags} for flags in FAULTS.values()))
    sims = dict(zip(FAULTS, apis, strict=True))
    chats = {
        name: ChatServer(store_url=store, provider="local", base_url=api.base_url, max_retries=0)
        for name, api in {**sims, "good": chat_sim}.items()
    }
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda chat: chat.start(), chats.values()))
    yield {"sims": sims, "chats": chats, "store": store}
    for chat in chats.values():
        chat.stop()


@pytest.mark.parametrize(
    ("fault", "error", "deltas"),
    [
        ("error-before-first-byte", "api_error", 0),
        ("rate-limit", "rate_limit", 0),
        ("error-after-1-delta", "api_error", 1),
        ("error-after-50-deltas", "overloaded", 50),
        ("dropped-after-5-deltas", "connection_error", 5),
    ],
)
def test_upstream_fault_yields_error_then_done_and_stores_nothing(
    fault_servers, fault, error, deltas
):
    good, bad = fault_servers["chats"]["good"], fault_servers["chats"][fault]
    with ChatClient(good.url) as g, ChatClient(bad.url) as b:
        sid = g.stream("new", "a good first turn").session_id
        turn = b.stream(sid, "this one fails")
        kinds = [next(iter(e)) for e in turn.events]
        assert kinds == ["session_id"] + ["text"] * deltas + ["error", "done"], turn.events
        assert turn.error["error"] == error, turn.error
        assert turn.error["message"] and turn.error["hint"]
        assert turn.done["stored"] is False and "turn_count" not in turn.done
        hist = g.history(sid)
        assert hist["turn_count"] == 1
        _well_formed(hist)
        # The failed turn released its lock; the session carries on.
        assert g.stream(sid, "after the failure").done["turn_count"] == 2
    assert "Traceback" not in bad.log_text()


def test_failed_first_turn_of_a_new_session_keeps_the_session_empty_and_usable(fault_servers):
    bad = fault_servers["chats"]["error-before-first-byte"]
    good = fault_servers["chats"]["good"]
    with ChatClient(bad.url) as b, ChatClient(good.url) as g:
        turn = b.stream("new", "first", system_prompt="Be kind.")
        assert turn.error and turn.done["stored"] is False
        sid = turn.session_id
        hist = g.history(sid)
        assert hist["turn_count"] == 0 and hist["system_prompt"] == "Be kind."
        assert g.stream(sid, "first, resent").done["turn_count"] == 1


@pytest.mark.parametrize(
    ("fault", "status", "error"),
    [
        ("rate-limit", 429, "rate_limit"),
        ("error-after-50-deltas", 503, "overloaded"),
        ("dropped-after-5-deltas", 502, "connection_error"),
    ],
)
def test_non_streaming_turn_maps_upstream_faults_to_http_status(
    fault_servers, fault, status, error
):
    with ChatClient(fault_servers["chats"][fault].url) as c:
        with pytest.raises(ChatAPIError) as e:
            c.chat("new", "hello")
        assert e.value.status == status and e.value.body["error"] == error
        assert e.value.body["message"] and e.value.body["hint"]
        sid = e.value.body["session_id"]
        assert c.history(sid)["turn_count"] == 0


def test_random_faults_never_break_the_history(fault_servers):
    ok = 0
    with ChatClient(fault_servers["chats"]["random-40%"].url) as c:
        sid = "new"
        for i in range(15):
            turn = c.stream(sid, f"message {i}")
            sid = turn.session_id
            ok += bool(turn.done["stored"])
            assert (turn.error is None) == turn.done["stored"]
        hist = c.history(sid)
    assert 0 < ok < 15
    assert hist["turn_count"] == ok
    _well_formed(hist)


def test_sdk_retries_run_before_a_rate_limit_reaches_the_client(fault_servers, make_chat):
    """With the SDK's retries on (the server's default is 2), a rate limit before the
    first byte is retried; this sim refuses every request, so the client still gets
    the error event, after the retries (the local API counted them)."""
    api = fault_servers["sims"]["rate-limit"]
    server = make_chat(api, max_retries=2)
    before = api.metrics().get("labkit_requests_all_total", 0)
    with ChatClient(server.url) as c:
        turn = c.stream("new", "hello")
    assert turn.error["error"] == "rate_limit"
    assert api.metrics().get("labkit_requests_all_total", 0) - before >= 3
