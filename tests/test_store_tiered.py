"""The tiered store (Redis in front of a SQLite or PostgreSQL archive): rehydration after
expiry, the failure rules of ``labkit.store.tiered``, and copies that never go stale.

The contract itself runs in test_store.py (params ``tiered_sqlite``, ``tiered_postgres``).
All against real servers; the kill tests start servers of their own.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import time

import pytest
import redis as redis_py

from labkit.errors import SessionNotFoundError, StoreError, StoreUnavailableError
from labkit.services import ThrowawayPostgres, ThrowawayServer
from labkit.store import Summary, open_store
from labkit.store.postgres import PostgresStore
from labkit.store.redis import RedisStore
from labkit.store.sqlite import SQLiteStore
from labkit.store.tiered import TieredStore

pytestmark = pytest.mark.redis
FORK = multiprocessing.get_context("fork")


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def archive_url(request: pytest.FixtureRequest) -> str:
    """An empty archive: a SQLite file, or a fresh PostgreSQL database."""
    return request.getfixturevalue(f"{request.param}_store_url")


def _wait(cond, limit_s: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {limit_s} s")


# ── hot cache, durable archive ────────────────────────────────────────────────


def test_a_session_expired_from_redis_comes_back_from_the_archive_intact(
    redis_store_url, archive_url
):
    store = open_store(redis_store_url, ttl=1, archive=archive_url)
    assert isinstance(store, TieredStore)
    sid = store.create_session(system_prompt="Be brief.", model="m").id
    for i in range(3):
        store.append_turn(
            sid, f"u{i}", f"a{i}", input_tokens=10 + i, output_tokens=2, meta={"i": i}
        )
    store.set_summary(sid, "three turns", 2)
    before = (store.get_session(sid), store.load_turns(sid), store.get_summary(sid))
    assert store.cached(sid)
    _wait(lambda: not store.cached(sid), 5, "the Redis copy expiring")
    assert RedisStore(redis_store_url).exists(sid) is False  # gone from memory...
    hits = store.stats()["rehydrations"]
    assert store.load_turns(sid) == before[1]  # ...not lost
    assert store.get_session(sid) == before[0]
    assert store.get_summary(sid) == before[2] == Summary("three turns", 2)
    assert store.stats()["rehydrations"] == hits + 1
    assert store.cached(sid) and 0 < store.ttl_remaining(sid) <= 1
    assert store.append_turn(sid, "u3", "a3") == 4  # and it goes on where it was
    assert [m["content"] for m in store.load_history(sid, last_n_turns=2)] == [
        "u2",
        "a2",
        "u3",
        "a3",
    ]
    store.close()


def test_turns_are_written_to_redis_with_the_sliding_ttl_in_its_own_format(
    redis_store_url, archive_url
):
    store = open_store(redis_store_url, ttl=30, archive=archive_url)
    sid = store.create_session().id
    store.append_turn(sid, "hi", "hello", input_tokens=5, output_tokens=1, meta={"k": "v"})
    assert 25 < store.ttl_remaining(sid) <= 30
    plain = RedisStore(redis_store_url)  # the copy is a plain RedisStore session
    assert plain.load_turns(sid)[0].meta == {"k": "v"}
    assert plain.load_history(sid) == store.archive.load_history(sid)
    assert plain.get_session(sid).input_tokens == 5
    assert store.stats()["redis_hits"] == 0
    store.load_history(sid)
    assert store.stats()["redis_hits"] == 1
    store.close()


def test_listing_reads_the_archive(redis_store_url, archive_url):
    store = open_store(redis_store_url, ttl=1, archive=archive_url)
    a = store.create_session().id
    store.append_turn(a, "u", "a")
    _wait(lambda: not store.cached(a), 5, "the Redis copy expiring")
    b = store.create_session().id
    assert [s.id for s in store.list_sessions()] == [b, a]
    assert [s.id for s in RedisStore(redis_store_url).list_sessions()] == [b]
    store.close()


def test_a_partly_evicted_copy_counts_as_a_miss(redis_store_url, archive_url):
    store = open_store(redis_store_url, ttl=60, archive=archive_url)
    sid = store.create_session().id
    for i in range(3):
        store.append_turn(sid, f"u{i}", f"a{i}")
    store.cache.redis.delete(f"{store.cache.namespace}session:{sid}:turns")  # as maxmemory would
    assert len(store.load_history(sid)) == 6
    assert store.stats()["rehydrations"] == 1
    store.close()


def test_a_copy_missing_a_turn_is_dropped_not_appended_to(redis_store_url, archive_url):
    store = open_store(redis_store_url, ttl=60, archive=archive_url)
    sid = store.create_session().id
    store.append_turn(sid, "u0", "a0")
    store.archive.append_turn(sid, "u1", "a1")  # written behind the cache's back
    store.append_turn(sid, "u2", "a2")  # the copy has 1 turn, this is turn 3: a gap
    assert not store.cached(sid)
    assert [m["content"] for m in store.load_history(sid)][::2] == ["u0", "u1", "u2"]
    store.close()


def test_archive_must_be_durable_and_goes_behind_redis_only(
    redis_store_url, sqlite_store_url, monkeypatch
):
    with pytest.raises(StoreError) as exc:
        open_store(sqlite_store_url, archive=sqlite_store_url)
    assert "redis://" in exc.value.hint
    with pytest.raises(StoreError):
        open_store(redis_store_url, archive=redis_store_url)
    with pytest.raises(StoreError):
        TieredStore(RedisStore(redis_store_url), RedisStore(redis_store_url))
    monkeypatch.setenv("LABKIT_ARCHIVE", sqlite_store_url)
    with open_store(redis_store_url) as store:
        assert isinstance(store, TieredStore) and store.archive_url == sqlite_store_url
        assert isinstance(store.archive, SQLiteStore)


# ── failure rule 1: archive down → the turn is refused, Redis untouched ──────


def _redis_keys(store: TieredStore) -> dict[str, object]:
    r, ns = store.cache.redis, store.cache.namespace
    out: dict[str, object] = {}
    for key in sorted(r.scan_iter(match=ns + "*")):
        kind = r.type(key)
        out[key] = {"hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1),
                    "zset": lambda k: r.zrange(k, 0, -1)}.get(kind, r.get)(key)  # fmt: skip
    return out


def test_postgres_archive_killed_the_turn_is_refused_and_redis_untouched(redis_store_url):
    with ThrowawayPostgres() as pg:
        store = TieredStore(RedisStore(redis_store_url), PostgresStore(pg.url, pool_timeout_s=0.5))
        sid = store.create_session().id
        store.append_turn(sid, "u0", "a0")
        before = _redis_keys(store)
        pg.kill()
        with pytest.raises(StoreUnavailableError) as exc:
            store.append_turn(sid, "u1", "a1")
        assert "PostgreSQL" in exc.value.message
        with pytest.raises(StoreUnavailableError):
            store.create_session()
        with pytest.raises(StoreUnavailableError), store.turn_lock(sid):
            pass
        assert _redis_keys(store) == before  # nothing half stored, nothing acknowledged
        assert [m["content"] for m in store.load_history(sid)] == ["u0", "a0"]  # reads: Redis
        store.close()


def test_sqlite_archive_locked_the_turn_is_refused_and_redis_untouched(redis_store_url, tmp_path):
    path = tmp_path / "archive.db"
    store = TieredStore(RedisStore(redis_store_url), SQLiteStore(path, busy_timeout_s=0.2))
    sid = store.create_session().id
    store.append_turn(sid, "u0", "a0")
    before = _redis_keys(store)
    import sqlite3

    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        with pytest.raises(StoreUnavailableError):
            store.append_turn(sid, "u1", "a1")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _redis_keys(store) == before
    assert store.append_turn(sid, "u1", "a1") == 2
    store.close()


# ── failure rule 2: Redis down → served from the archive ─────────────────────


def test_redis_killed_mid_run_tiered_keeps_serving_from_the_archive(archive_url, caplog):
    caplog.set_level(logging.INFO, logger="labkit.store.tiered")
    with ThrowawayServer() as server:
        store = TieredStore(RedisStore(server.url), open_store(archive_url), retry_after_s=0.3)
        sid = store.create_session().id
        store.append_turn(sid, "u0", "a0")
        port = server.port
        server.kill()
        t0 = time.monotonic()
        assert store.append_turn(sid, "u1", "a1") == 2  # acknowledged: the archive has it
        assert [m["content"] for m in store.load_history(sid)] == ["u0", "a0", "u1", "a1"]
        other = store.create_session().id
        assert store.append_turn(other, "x", "y") == 1
        assert {s.id for s in store.list_sessions()} == {sid, other}
        assert time.monotonic() - t0 < 5
        stats = store.stats()
        assert stats["redis"] == "down" and stats["redis_down_since"]
        assert "Connection" in stats["last_redis_error"]
        assert stats["archive_reads"] >= 1 and stats["archive_only_writes"] >= 2
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "serving sessions from the archive" in warnings[0].message
        with ThrowawayServer(port=port):  # Redis is back (empty)
            _wait(lambda: store.get_session(sid) and store.stats()["redis"] == "up", 5, "recovery")
            assert any("answers again" in r.message for r in caplog.records)
            assert store.load_history(sid)[-1]["content"] == "a1"
            assert store.cached(sid)
        store.close()


def test_copies_written_while_redis_was_unreachable_are_dropped_when_it_answers(
    redis_store_url, archive_url
):
    store = TieredStore(
        RedisStore(redis_store_url, ttl=60), open_store(archive_url), retry_after_s=0.3
    )
    other = RedisStore(redis_store_url)  # another process that still reaches Redis
    sid = store.create_session().id
    store.append_turn(sid, "u0", "a0")
    assert store.cached(sid)
    client = store.cache.redis
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = s.getsockname()[1]
    real = client.connection_pool
    # this process is cut off from Redis; Redis keeps its data
    client.connection_pool = redis_py.ConnectionPool(port=nowhere, decode_responses=True)
    try:
        assert store.append_turn(sid, "u1", "a1") == 2  # only the archive has turn 2
        assert store.stats()["redis"] == "down" and store.stats()["stale_copies"] == 1
        assert other.get_session(sid).turn_count == 1  # the stale copy (rule 4)
    finally:
        client.connection_pool = real
    _wait(lambda: store.load_history(sid) and store.stats()["redis"] == "up", 5, "recovery")
    assert store.stats()["stale_copies"] == 0
    assert [m["content"] for m in store.load_history(sid)][::2] == ["u0", "u1"]
    assert other.get_session(sid).turn_count == 2  # dropped on recovery, then rehydrated
    store.close()


def test_a_late_command_cannot_cache_an_older_copy(redis_store_url, archive_url):
    store = open_store(redis_store_url, ttl=60, archive=archive_url)
    sid = store.create_session().id
    store.append_turn(sid, "u0", "a0")
    old = store._snapshot(sid)  # a reader's snapshot of 1 turn...
    store.append_turn(sid, "u1", "a1")
    store.cache.redis.delete(f"{store.cache.namespace}session:{sid}")  # ...copy evicted...
    assert store._put_copy(old, "") is False  # ...its write arrives late: refused
    assert [m["content"] for m in store.load_history(sid)][::2] == ["u0", "u1"]
    store.delete_session(sid)
    assert store._put_copy(old, "") is False  # nor can it resurrect a deleted session
    with pytest.raises(SessionNotFoundError):
        store.get_session(sid)
    store.close()


# ── rule 6: concurrent writers and rehydrating readers ───────────────────────


def _writer(url: str, archive: str, sid: str, w: int, n: int, start, stale) -> None:
    st = open_store(url, archive=archive)
    start.wait(20)
    for i in range(n):
        count = st.append_turn(sid, f"w{w}-{i}", f"r{w}-{i}")
        if len(st.load_history(sid)) < 2 * count:  # read-your-writes
            with stale.get_lock():
                stale.value += 1
    st.close()


def _evicting_reader(url: str, archive: str, sid: str, start, stop, stale, reads) -> None:
    st = open_store(url, archive=archive)
    r, key = st.cache.redis, f"{st.cache.namespace}session:{sid}"
    start.wait(20)
    last = 0
    while not stop.is_set():
        r.delete(key)  # evict the copy, as an expiry would; the next reads rehydrate
        for _ in range(4):
            n = len(st.load_history(sid))
            if n < last:  # a copy older than what this reader already saw was served
                with stale.get_lock():
                    stale.value += 1
            last = max(last, n)
            with reads.get_lock():
                reads.value += 1
    st.close()


def test_rehydration_racing_writers_never_serves_or_keeps_a_stale_copy(
    redis_store_url, archive_url
):
    store = open_store(redis_store_url, ttl=60, archive=archive_url)
    sid = store.create_session().id
    start, stop = FORK.Event(), FORK.Event()
    stale, reads = FORK.Value("i", 0), FORK.Value("i", 0)
    writers = [
        FORK.Process(target=_writer, args=(redis_store_url, archive_url, sid, w, 30, start, stale))
        for w in range(3)
    ]
    readers = [
        FORK.Process(target=_evicting_reader,
                     args=(redis_store_url, archive_url, sid, start, stop, stale, reads))
        for _ in range(2)
    ]  # fmt: skip
    for p in writers + readers:
        p.start()
    start.set()
    for p in writers:
        p.join(60)
    stop.set()
    for p in readers:
        p.join(60)
    assert [p.exitcode for p in writers + readers] == [0] * 5
    assert reads.value > 10 and stale.value == 0
    truth = [t.user for t in store.archive.load_turns(sid)]
    assert len(truth) == 90
    if store.cached(sid):  # whatever the race left in Redis is the archive's history
        assert [t.user for t in store.load_turns(sid)] == truth
        assert store.get_session(sid).turn_count == 90
    store.close()


def test_reads_while_a_turn_is_between_archive_and_redis_come_from_the_archive(
    redis_store_url, archive_url
):
    import threading

    store = open_store(redis_store_url, ttl=60, archive=archive_url)
    sid = store.create_session().id
    store.append_turn(sid, "u0", "a0")
    assert store.cached(sid)
    committed, go_on = threading.Event(), threading.Event()
    real = store.archive.append_turn

    def slow_after_commit(*args, **kwargs):
        n = real(*args, **kwargs)
        committed.set()  # in the archive, not yet in Redis
        go_on.wait(10)
        return n

    store.archive.append_turn = slow_after_commit
    writer = threading.Thread(target=store.append_turn, args=(sid, "u1", "a1"))
    writer.start()
    try:
        assert committed.wait(10)
        assert RedisStore(redis_store_url).get_session(sid).turn_count == 1  # Redis lags...
        assert store.get_session(sid).turn_count == 2  # ...so reads go to the archive
        assert len(store.load_history(sid)) == 4
        assert store.stats()["bypass_reads"] == 2
    finally:
        go_on.set()
        writer.join(10)
    assert RedisStore(redis_store_url).get_session(sid).turn_count == 2
    assert len(store.load_history(sid)) == 4 and store.stats()["redis_hits"] >= 1
    store.close()


def test_unknown_session_is_not_found_and_leaves_no_key(redis_store_url, archive_url):
    store = open_store(redis_store_url, archive=archive_url)
    with pytest.raises(SessionNotFoundError):
        store.load_history("0" * 32)
    assert list(store.cache.redis.scan_iter(match=store.cache.namespace + "*")) == []
    store.close()


@pytest.mark.postgres
def test_compare_durable_stores_times_postgres_and_tiered_loads_hot_and_expired(
    redis_url, postgres_url
):
    from labkit.bench.tiered import compare_durable_stores

    rows = compare_durable_stores(
        sessions=5, turns=3, samples=6, postgres_url=postgres_url, redis_url=redis_url,
        log=lambda s: None,
    )  # fmt: skip
    got = {(r["store"], r["op"]): r for r in rows}
    assert set(got) == {
        ("labkit postgres", "load"), ("labkit postgres", "append"),
        ("labkit tiered", "load"), ("labkit tiered", "load expired"), ("labkit tiered", "append"),
    }  # fmt: skip
    assert all(r["n"] == 6 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)


@pytest.mark.postgres
def test_passwords_in_urls_never_reach_repr_stats_or_logs(postgres_store_url, caplog):
    archive = postgres_store_url.replace("postgres@", "postgres:s3cret@", 1)  # trust auth
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nowhere = s.getsockname()[1]
    store = open_store(f"redis://:r3dis@127.0.0.1:{nowhere}/0", archive=archive)
    store.create_session()  # Redis unreachable: logged, served by the archive
    shown = repr(store) + str(store.stats()) + caplog.text
    assert store.stats()["redis"] == "down" and "serving sessions from the archive" in caplog.text
    assert "s3cret" not in shown and "r3dis" not in shown and "postgres:***@" in shown
    store.close()
