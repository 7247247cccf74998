"""The SessionStore contract, run unchanged against SQLite and a real Redis server.

Every test takes the ``store`` (or ``store_url``) fixture from conftest.py, which is
parametrised over both backends; the Redis half is marked ``redis``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from datetime import UTC, datetime

import pytest

from labkit.errors import (
    InvalidSessionIdError,
    SessionBusyError,
    SessionNotFoundError,
    StoreError,
)
from labkit.store import SessionInfo, Summary, TurnRecord, open_store, validate_session_id

FORK = multiprocessing.get_context("fork")
UNKNOWN = "0" * 32
BAD_IDS = ["", "abc", "A" * 32, str(uuid.UUID(int=1)), "g" * 32, "0" * 33, "../" + "0" * 29, None]


# ── sessions ──────────────────────────────────────────────────────────────────


def test_create_session_returns_info_with_fresh_uuid4_hex_id(store):
    a = store.create_session(system_prompt="Be brief.", model="m1")
    b = store.create_session()
    assert a.id != b.id
    assert validate_session_id(a.id) == a.id
    assert uuid.UUID(hex=a.id).version == 4
    assert (a.system_prompt, a.model, a.turn_count) == ("Be brief.", "m1", 0)
    assert a.created_at.tzinfo is not None and a.updated_at.tzinfo is not None
    assert abs((datetime.now(UTC) - a.created_at).total_seconds()) < 60


def test_get_session_round_trips_what_create_returned(store):
    made = store.create_session(system_prompt="sys", model="m")
    got = store.get_session(made.id)
    assert isinstance(got, SessionInfo)
    assert (got.id, got.system_prompt, got.model, got.turn_count) == (made.id, "sys", "m", 0)
    assert got.created_at == made.created_at
    assert got.age_seconds >= 0


def test_create_with_explicit_id_and_duplicate_is_refused(store):
    sid = uuid.uuid4().hex
    assert store.create_session(session_id=sid).id == sid
    with pytest.raises(StoreError) as exc:
        store.create_session(session_id=sid)
    assert exc.value.hint


# ── turns ─────────────────────────────────────────────────────────────────────


def test_append_turn_returns_the_new_turn_count(store):
    sid = store.create_session().id
    assert [store.append_turn(sid, f"u{i}", f"a{i}") for i in range(3)] == [1, 2, 3]
    assert store.get_session(sid).turn_count == 3


def test_load_history_alternates_user_assistant_in_order(store):
    sid = store.create_session().id
    for i in range(5):
        store.append_turn(sid, f"u{i}", f"a{i}")
    hist = store.load_history(sid)
    assert [m["role"] for m in hist] == ["user", "assistant"] * 5
    assert [m["content"] for m in hist] == [x for i in range(5) for x in (f"u{i}", f"a{i}")]
    assert all(set(m) == {"role", "content"} for m in hist)


def test_load_history_last_n_turns_keeps_the_newest_pairs(store):
    sid = store.create_session().id
    for i in range(5):
        store.append_turn(sid, f"u{i}", f"a{i}")
    assert [m["content"] for m in store.load_history(sid, last_n_turns=2)] == [
        "u3",
        "a3",
        "u4",
        "a4",
    ]
    assert len(store.load_history(sid, last_n_turns=50)) == 10
    assert len(store.load_history(sid, last_n_turns=0)) == 10


def test_load_turns_carries_usage_meta_index_and_time(store):
    sid = store.create_session().id
    store.append_turn(
        sid, "hi", "hello", input_tokens=11, output_tokens=3, meta={"strategy": "full"}
    )
    store.append_turn(sid, "again", "yes")
    turns = store.load_turns(sid)
    assert all(isinstance(t, TurnRecord) for t in turns)
    first, second = turns
    assert (first.index, first.user, first.assistant) == (0, "hi", "hello")
    assert (first.input_tokens, first.output_tokens, first.meta) == (11, 3, {"strategy": "full"})
    assert (second.index, second.meta, second.input_tokens) == (1, {}, 0)
    assert first.created_at.tzinfo is not None
    assert [t.index for t in store.load_turns(sid, last_n_turns=1)] == [1]


def test_totals_accumulate_and_updated_at_advances(store):
    info = store.create_session()
    store.append_turn(info.id, "a", "b", input_tokens=10, output_tokens=2)
    time.sleep(0.01)
    store.append_turn(info.id, "c", "d", input_tokens=15, output_tokens=4)
    got = store.get_session(info.id)
    assert (got.turn_count, got.input_tokens, got.output_tokens) == (2, 25, 6)
    assert got.updated_at > info.updated_at >= info.created_at


def test_empty_session_has_empty_history(store):
    sid = store.create_session().id
    assert store.load_history(sid) == []
    assert store.load_turns(sid, last_n_turns=3) == []


def test_content_round_trips_exactly(store):
    sid = store.create_session(system_prompt="Système: «ünïcode» 🚀")
    text = 'line1\nline2\t"quoted" \\ back \x00 nul? 日本語 ' + "x" * 10_000
    store.append_turn(sid.id, text, "")
    assert store.load_history(sid.id) == [
        {"role": "user", "content": text},
        {"role": "assistant", "content": ""},
    ]
    assert store.get_session(sid.id).system_prompt == "Système: «ünïcode» 🚀"


def test_sessions_are_isolated(store):
    a = store.create_session().id
    b = store.create_session().id
    store.append_turn(a, "for a", "A")
    assert store.load_history(b) == []
    assert store.get_session(b).turn_count == 0


def test_bad_turn_arguments_are_refused_before_writing(store):
    sid = store.create_session().id
    with pytest.raises(TypeError):
        store.append_turn(sid, None, "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.append_turn(sid, "u", "a", input_tokens=-1)
    with pytest.raises(ValueError):
        store.load_history(sid, last_n_turns=-1)
    assert store.get_session(sid).turn_count == 0


# ── listing and deleting ──────────────────────────────────────────────────────


def test_list_sessions_newest_update_first_with_counts(store):
    assert store.list_sessions() == []
    a = store.create_session(model="m").id
    time.sleep(0.01)
    b = store.create_session().id
    time.sleep(0.01)
    store.append_turn(a, "u", "a")
    listed = store.list_sessions()
    assert [s.id for s in listed] == [a, b]
    assert [s.turn_count for s in listed] == [1, 0]
    assert listed[0].model == "m"


def test_delete_session_removes_it_its_turns_and_summary(store):
    sid = store.create_session().id
    store.append_turn(sid, "u", "a")
    store.set_summary(sid, "s", 1)
    keep = store.create_session().id
    assert store.delete_session(sid) is True
    assert store.delete_session(sid) is False
    with pytest.raises(SessionNotFoundError):
        store.load_history(sid)
    with pytest.raises(SessionNotFoundError):
        store.get_summary(sid)
    assert [s.id for s in store.list_sessions()] == [keep]


# ── summary ───────────────────────────────────────────────────────────────────


def test_summary_is_none_until_set_then_overwritten(store):
    sid = store.create_session().id
    assert store.get_summary(sid) is None
    for i in range(4):
        store.append_turn(sid, f"u{i}", f"a{i}")
    store.set_summary(sid, "first", 2)
    assert store.get_summary(sid) == Summary("first", 2)
    store.set_summary(sid, "second", 4)
    assert store.get_summary(sid) == Summary(summary="second", covers_turns=4)


def test_summary_cannot_cover_more_turns_than_stored(store):
    sid = store.create_session().id
    store.append_turn(sid, "u", "a")
    with pytest.raises(ValueError):
        store.set_summary(sid, "too far", 2)
    with pytest.raises(ValueError):
        store.set_summary(sid, "negative", -1)
    assert store.get_summary(sid) is None


# ── unknown and invalid ids ───────────────────────────────────────────────────


def test_unknown_session_raises_not_found_with_hint(store):
    calls = [
        lambda: store.get_session(UNKNOWN),
        lambda: store.append_turn(UNKNOWN, "u", "a"),
        lambda: store.load_history(UNKNOWN),
        lambda: store.load_turns(UNKNOWN, 2),
        lambda: store.set_summary(UNKNOWN, "s", 0),
        lambda: store.get_summary(UNKNOWN),
        lambda: store.turn_lock(UNKNOWN).__enter__(),
    ]
    for call in calls:
        with pytest.raises(SessionNotFoundError) as exc:
            call()
        assert "labkit sessions list" in exc.value.hint
    assert store.delete_session(UNKNOWN) is False
    assert store.list_sessions() == []  # nothing was created as a side effect


@pytest.mark.parametrize("bad", BAD_IDS)
def test_invalid_ids_raise_invalid_session_id_everywhere(store, bad):
    calls = [
        lambda: store.get_session(bad),
        lambda: store.append_turn(bad, "u", "a"),
        lambda: store.load_history(bad),
        lambda: store.load_turns(bad),
        lambda: store.delete_session(bad),
        lambda: store.set_summary(bad, "s", 0),
        lambda: store.get_summary(bad),
        lambda: store.turn_lock(bad).__enter__(),
    ]
    if bad is not None:  # session_id=None means "make a fresh id"
        calls.append(lambda: store.create_session(session_id=bad))
    for call in calls:
        with pytest.raises(InvalidSessionIdError) as exc:
            call()
        assert "32 lowercase hex" in exc.value.hint


# ── persistence ───────────────────────────────────────────────────────────────


def test_bulk_append_stores_whole_turns_in_order_and_skips_unknown_sessions(store):
    a, b = store.create_session().id, store.create_session().id
    gone = "0" * 32
    turns = [(sid, f"u{i}-{sid[:4]}", f"a{i}", 10, 2) for i in range(3) for sid in (a, gone, b)]
    assert store.bulk_append(turns, batch=2) == 6  # batches split turns of one session
    for sid in (a, b):
        turns_back = store.load_turns(sid)
        assert [(t.index, t.user, t.assistant) for t in turns_back] == [
            (i, f"u{i}-{sid[:4]}", f"a{i}") for i in range(3)
        ]
        info = store.get_session(sid)
        assert (info.turn_count, info.input_tokens, info.output_tokens) == (3, 30, 6)
    assert not store.exists(gone)
    assert store.append_turn(a, "next", "turn") == 4  # the per-turn API carries on after


def test_a_new_store_on_the_same_url_sees_everything(store_url):
    with open_store(store_url) as first:
        sid = first.create_session(system_prompt="p").id
        first.append_turn(sid, "u", "a", input_tokens=5)
        first.set_summary(sid, "sum", 1)
    with open_store(store_url) as second:
        assert second.load_history(sid) == [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
        assert second.get_session(sid).input_tokens == 5
        assert second.get_summary(sid) == Summary("sum", 1)


# ── turn lock ─────────────────────────────────────────────────────────────────


def test_turn_lock_is_exclusive_and_released_after_use(store):
    sid = store.create_session().id
    with store.turn_lock(sid):
        with pytest.raises(SessionBusyError) as exc, store.turn_lock(sid):
            pass
        assert exc.value.hint
    with store.turn_lock(sid):  # free again
        pass


def test_turn_lock_is_released_when_the_turn_raises(store):
    sid = store.create_session().id
    with pytest.raises(RuntimeError), store.turn_lock(sid):
        raise RuntimeError("reply failed")
    with store.turn_lock(sid):
        pass


def test_turn_lock_is_per_session(store):
    a, b = store.create_session().id, store.create_session().id
    with store.turn_lock(a):
        with store.turn_lock(b):  # another session is not blocked by a's turn ...
            for sid in (a, b):  # ... while each one is held for real
                with pytest.raises(SessionBusyError), store.turn_lock(sid):
                    pass
        with pytest.raises(SessionBusyError), store.turn_lock(a):  # b's release kept a's lock
            pass


def test_expired_lease_can_be_taken_over(store):
    sid = store.create_session().id
    lease_s = 1.0
    t0 = time.monotonic()
    with store.turn_lock(sid, lease_s=lease_s):
        with pytest.raises(SessionBusyError), store.turn_lock(sid):  # held while the lease runs
            pass
        deadline = time.monotonic() + lease_s + 10
        while True:  # poll: taken over once the first holder's lease has run out
            try:
                with store.turn_lock(sid):
                    took = time.monotonic() - t0
                break
            except SessionBusyError:
                assert time.monotonic() < deadline, f"lease of {lease_s} s never expired"
                time.sleep(0.05)
    assert took >= lease_s  # not before the lease ran out


def _hold_lock(url: str, sid: str, held, release, lease_s: float) -> None:
    st = open_store(url)
    with st.turn_lock(sid, lease_s=lease_s):
        held.set()
        release.wait(20)


def test_turn_lock_is_exclusive_across_processes(store_url):
    store = open_store(store_url)
    sid = store.create_session().id
    held, release = FORK.Event(), FORK.Event()
    child = FORK.Process(target=_hold_lock, args=(store_url, sid, held, release, 30.0))
    child.start()
    try:
        assert held.wait(20)
        with pytest.raises(SessionBusyError), store.turn_lock(sid):
            pass
        release.set()
        child.join(20)
        assert child.exitcode == 0
        with store.turn_lock(sid):
            pass
    finally:
        release.set()
        child.join(5)
        store.close()


def test_lock_of_a_killed_process_is_taken_over_at_once(store_url):
    store = open_store(store_url)
    sid = store.create_session().id
    held, release = FORK.Event(), FORK.Event()
    child = FORK.Process(target=_hold_lock, args=(store_url, sid, held, release, 600.0))
    child.start()
    assert held.wait(20)
    with pytest.raises(SessionBusyError), store.turn_lock(sid):  # alive: busy
        pass
    os.kill(child.pid, signal.SIGKILL)
    child.join(5)
    t0 = time.monotonic()
    with store.turn_lock(sid):  # its holder is dead on this host: no need to wait 600 s
        pass
    assert time.monotonic() - t0 < 5
    store.close()


# ── several processes at once ─────────────────────────────────────────────────


def _append_many(url: str, sid: str, worker: int, n: int, start) -> None:
    st = open_store(url)
    start.wait(20)
    for i in range(n):
        st.append_turn(sid, f"w{worker}-u{i}", f"w{worker}-a{i}", input_tokens=1, output_tokens=2)
    st.close()


def test_concurrent_appends_from_several_processes_lose_nothing(store_url):
    workers, per_worker = 4, 50
    store = open_store(store_url)
    sid = store.create_session().id
    start = FORK.Event()
    procs = [
        FORK.Process(target=_append_many, args=(store_url, sid, w, per_worker, start))
        for w in range(workers)
    ]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * workers
    turns = store.load_turns(sid)
    total = workers * per_worker
    assert [t.index for t in turns] == list(range(total))
    assert sorted(t.user for t in turns) == sorted(
        f"w{w}-u{i}" for w in range(workers) for i in range(per_worker)
    )
    assert all(t.assistant == t.user.replace("-u", "-a") for t in turns)
    info = store.get_session(sid)
    assert (info.turn_count, info.input_tokens, info.output_tokens) == (total, total, 2 * total)
    # each worker's own turns stay in the order it wrote them
    for w in range(workers):
        mine = [int(t.user.split("-u")[1]) for t in turns if t.user.startswith(f"w{w}-")]
        assert mine == list(range(per_worker))
    store.close()


def _append_forever(url: str, sid: str, progress) -> None:
    st = open_store(url)
    blob = "x" * 400_000  # big turns make a kill during a write likely
    i = 0
    while True:
        st.append_turn(sid, f"u{i}:" + blob, f"a{i}:" + blob, input_tokens=i, output_tokens=1)
        progress.value = i + 1
        i += 1


def _settled(store, sid: str, limit_s: float = 10.0):
    """(info, turns) read while the turn count holds still: a server (Redis, PostgreSQL)
    may still commit a statement a killed client had already sent."""
    deadline = time.monotonic() + limit_s
    while True:
        before = store.get_session(sid).turn_count
        turns = store.load_turns(sid)
        info = store.get_session(sid)
        if info.turn_count == before or time.monotonic() > deadline:
            return info, turns
        time.sleep(0.05)


def test_sigkill_during_appends_never_leaves_a_half_turn(store_url):
    store = open_store(store_url)
    sid = store.create_session().id
    for round_ in range(4):
        progress = FORK.Value("i", 0)
        child = FORK.Process(target=_append_forever, args=(store_url, sid, progress))
        child.start()
        deadline = time.monotonic() + 30
        while progress.value < 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.003 * (round_ + 1))  # land at different points of a write
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert child.exitcode == -signal.SIGKILL
    info, turns = _settled(store, sid)
    assert info.turn_count == len(turns) >= 8
    assert [t.index for t in turns] == list(range(len(turns)))
    for t in turns:
        u, a = t.user.split(":", 1)[0], t.assistant.split(":", 1)[0]
        assert u[1:] == a[1:] and u[0] == "u" and a[0] == "a"
        assert len(t.user) == len(t.assistant) == len(u) + 1 + 400_000
    hist = store.load_history(sid)
    assert [m["role"] for m in hist] == ["user", "assistant"] * len(turns)
    store.close()
