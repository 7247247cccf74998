"""The chat API (labkit serve) end to end: real server processes, a real store, the
sim engine as upstream. Includes the course's "Test it" list."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from helpers import CHAT_SIM, wait_for

from labkit.server.client import ChatAPIError, ChatClient

# ── the wire format ──────────────────────────────────────────────────────────


def test_new_session_streams_session_id_text_then_done(chat_sim, make_chat):
    server = make_chat(chat_sim)
    with ChatClient(server.url) as c:
        turn = c.stream("new", "Hello there")
    first, *middle, last = turn.events
    assert set(first) == {"session_id"} and len(first["session_id"]) == 32
    assert turn.headers["x-session-id"] == first["session_id"]
    assert middle and all(set(e) == {"text"} for e in middle)
    assert last["done"] is True and last["session_id"] == first["session_id"]
    assert last["usage"]["input"] > 0 and last["usage"]["output"] == 12
    assert last["stored"] is True and last["turn_count"] == 1
    assert last["context"]["applied"] is False
    assert turn.headers["content-type"].startswith("text/event-stream")
    assert turn.headers["cache-control"] == "no-cache"
    assert turn.headers["x-accel-buffering"] == "no"


def test_client_times_the_first_text_and_the_whole_stream(sim_factory, make_chat):
    server = make_chat(sim_factory(**{**CHAT_SIM, "ttft_ms": 80, "itl_ms": 10, "reply_tokens": 5}))
    with ChatClient(server.url) as c:
        turn = c.stream("new", "Hello there")
    assert 80 <= turn.ttft_ms < turn.e2e_ms  # the sim sends its first delta at 80 ms
    assert turn.e2e_ms >= 80 + 4 * 10


def test_course_httpx_consumer_reads_the_stream(chat_sim, make_chat):
    """The course's consumer, verbatim but for the URL, prints the streamed reply."""
    server = make_chat(chat_sim)
    printed: list[str] = []

    async def consume_stream(message: str):
        async with (
            httpx.AsyncClient(timeout=60) as http,
            http.stream(
                "POST", f"{server.url}/chat/stream/new", json={"message": message}
            ) as response,
        ):
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = json.loads(line[6:])
                if data.get("text"):
                    printed.append(data["text"])

    import asyncio

    asyncio.run(consume_stream("Hi"))
    assert len(printed) == 12 and "".join(printed).strip()


def test_stored_reply_equals_streamed_text(chat_sim, make_chat):
    server = make_chat(chat_sim)
    with ChatClient(server.url) as c:
        turn = c.stream("new", "Say something", system_prompt="Be brief.")
        hist = c.history(turn.session_id)
    assert hist["system_prompt"] == "Be brief."
    assert hist["messages"] == [
        {"role": "user", "content": "Say something"},
        {"role": "assistant", "content": turn.text},
    ]


def test_system_prompt_is_taken_on_the_first_message_only(chat_sim, make_chat):
    server = make_chat(chat_sim)
    with ChatClient(server.url) as c:
        sid = c.stream("new", "one", system_prompt="First.").session_id
        c.stream(sid, "two", system_prompt="Ignored.")
        assert c.history(sid)["system_prompt"] == "First."


def test_non_streaming_chat_returns_reply_and_turn_count(chat_sim, make_chat):
    server = make_chat(chat_sim)
    with ChatClient(server.url) as c:
        first = c.chat("new", "Hello")
        second = c.chat(first["session_id"], "Again")
        hist = c.history(first["session_id"])
    assert first["turn_count"] == 1 and second["turn_count"] == 2
    assert hist["messages"][1]["content"] == first["reply"]
    assert hist["messages"][3]["content"] == second["reply"]
    assert second["usage"]["input"] > first["usage"]["input"]


def test_sessions_list_stats_and_delete(chat_sim, make_chat):
    server = make_chat(chat_sim)
    with ChatClient(server.url) as c:
        sid = c.stream("new", "Hello").session_id
        c.stream(sid, "More")
        assert sid in {s["id"] for s in c.sessions()}
        st = c.stats(sid)
        assert st["turn_count"] == 2
        assert st["input_tokens"] > 0 and st["output_tokens"] == 24
        assert st["age_seconds"] >= 0
        assert st["context_strategy"] == {
            "name": "keep_last_turns",
            "budget_tokens": 50_000,
            "keep_turns": 10,
        }
        assert st["last_turn_context"]["applied"] is False
        assert c.delete(sid) == {"session_id": sid, "deleted": True}
        with pytest.raises(ChatAPIError) as e:
            c.history(sid)
        assert e.value.status == 404


def test_page_and_openapi_are_served(chat_sim, make_chat):
    server = make_chat(chat_sim)
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "getReader" in page.text and "localStorage" in page.text
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in (
        "/chat/stream/{session_id}",
        "/chat/{session_id}",
        "/sessions",
        "/sessions/{session_id}/history",
        "/sessions/{session_id}/stats",
    ):
        assert path in spec["paths"]
    assert httpx.get(server.url + "/docs").status_code == 200


# ── the course's "Test it" list ──────────────────────────────────────────────


def test_ten_turns_survive_a_restart_and_continue_with_context(chat_sim, make_chat):
    server = make_chat(chat_sim)
    with ChatClient(server.url) as c:
        sid = c.stream("new", "Turn 1: my name is Ada.").session_id
        inputs = []
        for i in range(2, 11):
            inputs.append(c.stream(sid, f"Turn {i}.").done["usage"]["input"])
        before = c.history(sid)
    assert before["turn_count"] == 10
    server.restart()
    with ChatClient(server.url) as c:
        assert c.history(sid) == before  # persisted, unchanged
        done = c.stream(sid, "Turn 11: what is my name?").done
        after = c.history(sid)
    assert done["stored"] and done["turn_count"] == 11
    # The whole history was sent: the request grew past the pre-restart ones.
    assert done["usage"]["input"] > max(inputs)
    assert done["context"]["sent_turns"] == 10 and done["context"]["applied"] is False
    assert after["messages"][:20] == before["messages"]
    assert after["messages"][0]["content"] == "Turn 1: my name is Ada."


def test_twenty_turns_with_a_small_budget_stop_input_growth(chat_sim, make_chat):
    server = make_chat(chat_sim, context_budget=250, keep_turns=3)
    inputs, applied = [], []
    with ChatClient(server.url) as c:
        sid = "new"
        for i in range(20):
            done = c.stream(sid, f"Message number {i}: tell me about the weather.").done
            sid = done["session_id"]
            inputs.append(done["usage"]["input"])
            applied.append(done["context"]["applied"])
        st = c.stats(sid)
        hist = c.history(sid)
    first = applied.index(True)
    assert 3 < first < 19, applied
    assert all(applied[first:])  # once over budget, it stays applied
    assert inputs[first - 1] > inputs[0]  # it grew before the window kicked in
    tail = inputs[first + 1 :]
    assert max(tail) - min(tail) <= 0.15 * min(tail), inputs  # then it stopped growing
    assert max(tail) < inputs[first - 1] + 0.15 * inputs[first - 1]
    assert st["last_turn_context"]["applied"] is True
    assert st["last_turn_context"]["dropped_turns"] == 19 - 3
    assert st["last_turn_context"]["sent_turns"] == 3
    assert hist["turn_count"] == 20  # everything stays stored


def _metric(api, name: str) -> float:
    return api.metrics().get(name, 0.0)


def test_disconnect_mid_stream_cancels_upstream_and_stores_nothing(chat_sim, slow_sim, make_chat):
    fast = make_chat(chat_sim)
    slow = make_chat(slow_sim)  # same store
    with ChatClient(fast.url) as f, ChatClient(slow.url) as c:
        sid = f.chat("new", "first")["session_id"]
        cancelled = _metric(slow_sim, "labkit_streams_cancelled_total")
        generated = _metric(slow_sim, "labkit_tokens_generated_total")
        turn = c.stream(sid, "second, interrupted", stop_after_deltas=3)
        assert len(turn.deltas) == 3 and turn.done is None
        # The upstream stream is cancelled, not run to its end: the sim counts a
        # cancelled stream, and fewer than the reply's 60 deltas were generated.
        assert wait_for(lambda: _metric(slow_sim, "labkit_streams_cancelled_total") > cancelled), (
            slow_sim.metrics()
        )
        assert _metric(slow_sim, "labkit_tokens_generated_total") - generated < 60
        # Rule: the partial reply is dropped; the history stays one complete turn.
        hist = f.history(sid)
        assert hist["turn_count"] == 1 and len(hist["messages"]) == 2
        # The lock is released as the cancelled response unwinds (within moments).
        deadline = time.monotonic() + 10
        while True:
            try:
                assert f.stream(sid, "third").done["turn_count"] == 2
                break
            except ChatAPIError as e:
                assert e.status == 409 and time.monotonic() < deadline, e
                time.sleep(0.05)
    log = slow.log_text()
    assert "Traceback" not in log and "ERROR" not in log, log


def test_a_new_session_the_store_refuses_gets_503_and_its_upstream_request_is_closed(
    slow_sim, tmp_path
):
    """A new session's upstream request goes out before the session is created (service
    note 10); when the store then refuses, the client gets the store's 503 and the
    request already sent is closed, so the upstream stops generating."""
    import asyncio

    from labkit.errors import StoreUnavailableError
    from labkit.server import Settings, create_app

    app = create_app(
        Settings(
            store_url=f"sqlite:///{tmp_path}/refuses.db",
            provider="local",
            base_url=slow_sim.base_url,
            max_retries=0,
        )
    )

    def refuse(**_kw: object) -> None:
        raise StoreUnavailableError("The store is down.")

    async def call() -> httpx.Response:
        async with app.router.lifespan_context(app):
            app.state.service.store.create_session = refuse
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
                return await c.post("/chat/stream/new", json={"message": "Hello"})

    cancelled = _metric(slow_sim, "labkit_streams_cancelled_total")
    r = asyncio.run(call())
    assert r.status_code == 503 and r.json()["error"] == "store_unavailable", r.text
    assert wait_for(lambda: _metric(slow_sim, "labkit_streams_cancelled_total") > cancelled), (
        slow_sim.metrics()
    )
    assert wait_for(lambda: _metric(slow_sim, "labkit_active_streams") == 0)


# ── concurrency ──────────────────────────────────────────────────────────────


def _hold_stream(url: str, sid: str, started: threading.Event, out: dict) -> None:
    with ChatClient(url) as c:
        out["turn"] = c.stream(sid, "slow one", on_text=lambda _t: started.set())


def test_second_request_on_a_busy_session_gets_409(slow_sim, make_chat):
    server = make_chat(slow_sim)
    with ChatClient(server.url) as c:
        sid = c.chat("new", "hi")["session_id"]
        started, out = threading.Event(), {}
        t = threading.Thread(target=_hold_stream, args=(server.url, sid, started, out))
        t.start()
        assert started.wait(10)
        with pytest.raises(ChatAPIError) as e:
            c.stream(sid, "interleaved?")
        assert e.value.status == 409 and e.value.body["error"] == "session_busy"
        with pytest.raises(ChatAPIError) as e:
            c.delete(sid)
        assert e.value.status == 409
        t.join(20)
        assert out["turn"].done["stored"]
        hist = c.history(sid)
    assert [m["content"] for m in hist["messages"][::2]] == ["hi", "slow one"]


@pytest.mark.parametrize(
    "shared",
    [
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("redis+postgres", marks=[pytest.mark.redis, pytest.mark.postgres]),
    ],
)
def test_two_server_processes_sharing_a_store_never_interleave(
    slow_sim, make_chat, request, shared
):
    """Two `labkit serve` processes on one Redis, one PostgreSQL, or Redis in front of a
    PostgreSQL archive (--archive): one set of sessions, and the 409 rule across them."""
    api = slow_sim
    cache, _, archive = shared.partition("+")
    settings = {"store_url": request.getfixturevalue(f"{cache}_store_url")}
    if archive:
        settings["store_archive"] = request.getfixturevalue(f"{archive}_store_url")
    a = make_chat(api, **settings)
    b = make_chat(api, **settings)
    with ChatClient(a.url) as ca, ChatClient(b.url) as cb:
        sid = ca.chat("new", "hello from A")["session_id"]
        assert cb.history(sid)["turn_count"] == 1  # one store
        started, out = threading.Event(), {}
        t = threading.Thread(target=_hold_stream, args=(a.url, sid, started, out))
        t.start()
        assert started.wait(10)
        with pytest.raises(ChatAPIError) as e:
            cb.stream(sid, "from B while A streams")
        assert e.value.status == 409
        t.join(20)
        assert out["turn"].done["stored"]
        done = cb.stream(sid, "from B after A").done
        assert done["stored"] and done["turn_count"] == 3
        msgs = ca.history(sid)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert [m["content"] for m in msgs[::2]] == ["hello from A", "slow one", "from B after A"]
    if archive:  # every turn is in the archive, the truth behind Redis
        from labkit.store import open_store

        stats = httpx.get(a.url + "/health").json()["store_stats"]
        assert stats["redis"] == "up" and stats["archive"] == settings["store_archive"]

        with open_store(settings["store_archive"]) as truth:
            assert truth.load_history(sid) == msgs


@pytest.mark.redis
def test_workers_on_one_port_share_sessions_and_locks_through_the_store(
    slow_sim, make_chat, redis_store_url
):
    """`labkit serve --workers 2`: two processes behind one port, one Redis store. A
    keep-alive connection stays with one worker (/health names its pid), so the test
    holds one connection to each: a session continues from worker to worker, and a
    session streaming on one worker is 409 on the other (each worker's in-process busy
    set alone would miss it: the lock is the store's)."""
    server = make_chat(slow_sim, store_url=redis_store_url, workers=2)
    by_pid: dict[int, httpx.Client] = {}

    def connect() -> bool:
        c = httpx.Client(base_url=server.url, timeout=30)
        pid = c.get("/health").json()["worker_pid"]
        if pid in by_pid:
            c.close()
        else:
            by_pid[pid] = c
        return len(by_pid) == 2

    assert wait_for(connect, timeout=30), "both workers should answer on the one port"
    a, b = by_pid.values()
    try:
        sid = a.post("/chat/new", json={"message": "on worker A"}).json()["session_id"]
        assert b.post(f"/chat/{sid}", json={"message": "on worker B"}).json()["turn_count"] == 2
        started, out = threading.Event(), {}

        def hold() -> None:
            with a.stream("POST", f"/chat/stream/{sid}", json={"message": "slow, on A"}) as r:
                for line in r.iter_lines():
                    if '"text"' in line:
                        started.set()
                    if '"done"' in line:
                        out["done"] = json.loads(line.removeprefix("data: "))

        t = threading.Thread(target=hold)
        t.start()
        assert started.wait(10)
        busy = b.post(f"/chat/{sid}", json={"message": "race, on B"})
        t.join(20)
        assert busy.status_code == 409 and busy.json()["error"] == "session_busy"
        assert out["done"]["stored"] and out["done"]["turn_count"] == 3
        assert b.get(f"/sessions/{sid}/history").json()["turn_count"] == 3
    finally:
        for c in by_pid.values():
            c.close()


# ── bad input: 4xx JSON, nothing stored ──────────────────────────────────────

BAD = [
    (
        "POST",
        "/chat/stream/0123456789abcdef0123456789abcdef",
        {"json": {"message": "hi"}},
        404,
        "session_not_found",
    ),
    ("POST", "/chat/stream/not-an-id", {"json": {"message": "hi"}}, 400, "invalid_session_id"),
    (
        "POST",
        "/chat/stream/ABCDEF0123456789ABCDEF0123456789",
        {"json": {"message": "hi"}},
        400,
        "invalid_session_id",
    ),
    ("POST", "/chat/stream/new", {"json": {"message": ""}}, 422, "empty_message"),
    ("POST", "/chat/stream/new", {"json": {"message": "   \n"}}, 422, "empty_message"),
    ("POST", "/chat/stream/new", {"json": {"message": "x" * 201}}, 413, "message_too_long"),
    (
        "POST",
        "/chat/stream/new",
        {"content": b'{"message": "hi"', "headers": {"content-type": "application/json"}},
        400,
        "invalid_json",
    ),
    ("POST", "/chat/stream/new", {"json": {}}, 422, "invalid_request"),
    ("POST", "/chat/stream/new", {"json": {"message": 42}}, 422, "invalid_request"),
    ("POST", "/chat/stream/new", {"json": {"mesage": "typo"}}, 422, "invalid_request"),
    ("POST", "/chat/stream/new", {"json": ["hi"]}, 422, "invalid_request"),
    ("POST", "/chat/new", {"json": {"message": ""}}, 422, "empty_message"),
    ("POST", "/chat/nope", {"json": {"message": "hi"}}, 400, "invalid_session_id"),
    ("GET", "/sessions/0123456789abcdef0123456789abcdef/history", {}, 404, "session_not_found"),
    ("GET", "/sessions/xyz/stats", {}, 400, "invalid_session_id"),
    ("DELETE", "/sessions/0123456789abcdef0123456789abcdef", {}, 404, "session_not_found"),
    ("GET", "/nowhere", {}, 404, "not_found"),
]


def test_bad_input_gets_4xx_json_saying_what_is_wrong_and_stores_nothing(chat_sim, make_chat):
    server = make_chat(chat_sim, max_message_chars=200)
    with ChatClient(server.url) as c:
        for method, path, kwargs, status, error in BAD:
            r = c.http.request(method, path, **kwargs)
            assert r.status_code == status, (path, kwargs, r.text)
            body = r.json()
            assert body["error"] == error, (path, body)
            assert body["message"] and isinstance(body["hint"], str), body
        assert c.sessions() == []
        # Oversized says what the limit is; a missing field says which field.
        r = c.http.post("/chat/stream/new", json={"message": "x" * 201})
        assert "200" in r.json()["message"]
        r = c.http.post("/chat/stream/new", json={})
        assert "message" in r.json()["message"]


def test_bad_input_on_an_existing_session_leaves_it_unchanged(chat_sim, make_chat):
    server = make_chat(chat_sim, max_message_chars=200)
    with ChatClient(server.url) as c:
        sid = c.chat("new", "hello")["session_id"]
        before = c.history(sid)
        for body in ({"message": ""}, {"message": "y" * 500}, {"nope": 1}):
            r = c.http.post(f"/chat/stream/{sid}", json=body)
            assert 400 <= r.status_code < 500
        assert c.history(sid) == before
        assert c.stream(sid, "still works").done["stored"]  # and no lock was leaked


@pytest.mark.llama
def test_input_tokens_count_the_cached_prefix_of_the_real_model(llama_api, make_chat):
    """The local llama engine reports cache reads apart from input_tokens, as Anthropic
    does; the chat API's usage.input still counts every prompt token sent."""
    server = make_chat(llama_api, temperature=0, max_tokens=16)
    with ChatClient(server.url, timeout=120) as c:
        first = c.stream("new", "Hi, I am learning about streaming.").done
        second = c.stream(first["session_id"], "What is SSE?").done
    assert first["stored"] and second["stored"]
    assert second["usage"]["cached"] > 0  # the first turn's prompt was reused
    assert second["usage"]["input"] > first["usage"]["input"] + first["usage"]["output"]
    stats = ChatClient(server.url).stats(first["session_id"])
    assert stats["input_tokens"] == first["usage"]["input"] + second["usage"]["input"]


def test_turns_lease_the_least_busy_upstream_pool_and_the_first_when_idle():
    """ModelAPI note 2: several small HTTP pools; a turn gets the pool with the fewest
    turns in flight, and requests one at a time always reuse the first (warm) pool."""
    from labkit.server.model_api import POOL_CONNECTIONS, ModelAPI
    from labkit.server.settings import Settings

    api = ModelAPI(
        Settings(
            provider="local",
            base_url="http://127.0.0.1:9",
            max_upstream_connections=3 * POOL_CONNECTIONS,
        )
    )
    first = api.client()
    with api.lease() as one:
        assert one is first
    with api.lease() as one, api.lease() as two, api.lease() as three, api.lease() as four:
        assert len({id(one), id(two), id(three)}) == 3 and four is one
    with api.lease() as again:
        assert again is first


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_turn_is_durable_once_done_says_stored_even_under_kill_9(
    chat_sim, make_chat, request, store
):
    """`stored: true` in the done event is a promise: the server is SIGKILLed the moment
    the client reads it (no shutdown, no flush), and a new server on the same store has
    the turn."""
    import os
    import signal

    settings = (
        {} if store == "sqlite" else {"store_url": request.getfixturevalue("redis_store_url")}
    )
    server = make_chat(chat_sim, **settings)
    c = httpx.Client(base_url=server.url, timeout=30)
    with c, c.stream("POST", "/chat/stream/new", json={"message": "keep me"}) as r:
        for line in r.iter_lines():
            if '"done"' in line:
                done = json.loads(line.removeprefix("data: "))
                os.kill(server.proc.pid, signal.SIGKILL)
                break
    assert done["stored"] is True
    server.proc.wait(10)
    server.proc = None
    server.start()
    with ChatClient(server.url) as c:
        hist = c.history(done["session_id"])
    assert hist["turn_count"] == 1 and hist["messages"][0]["content"] == "keep me"


def test_the_served_process_freezes_what_start_up_left_and_collects_less_often():
    """runner note 7: once uvicorn has started, everything alive is moved out of the
    collector's reach and the thresholds are raised, in the process that serves."""
    import subprocess
    import sys

    script = """
import gc, json, socket, threading, time, httpx, uvicorn
from labkit.server.runner import _uvicorn_server
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive(); await send({"type": "lifespan.startup.complete"})
        await receive(); await send({"type": "lifespan.shutdown.complete"}); return
    body = json.dumps({"frozen": gc.get_freeze_count(), "thresholds": gc.get_threshold()})
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body.encode()})
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen()
server = _uvicorn_server(uvicorn.Config(app, log_level="warning"))
threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        print(httpx.get(url).text); break
    except httpx.HTTPError:
        time.sleep(0.02)
server.should_exit = True
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    from labkit.server.runner import GC_THRESHOLDS

    assert seen["frozen"] > 10_000 and tuple(seen["thresholds"]) == GC_THRESHOLDS
