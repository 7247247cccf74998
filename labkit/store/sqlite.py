"""SQLite session store: the embedded default (``sqlite:///conversations.db``).

Schema (created by the named migrations below, recorded in ``migrations``)::

    sessions(id PK, created_at, updated_at, system_prompt, model,
             turn_count, input_tokens, output_tokens)
    messages(id PK, session_id → sessions ON DELETE CASCADE, turn, role, content,
             input_tokens, output_tokens, created_at, meta)
        UNIQUE INDEX messages_session_turn ON messages(session_id, turn, role)
    summaries(session_id PK → sessions, summary, covers_turns, updated_at)
    turn_locks(session_id PK → sessions, token, expires_at)

Notes:

1. Migrations are append-only and named (the simonw/llm pattern): each is a function
   ``mNNN_what``; the ``migrations`` table records which ran, so an old file is
   upgraded in place and a migration never runs twice. Never edit one that shipped:
   add the next.
2. The index on ``messages(session_id, turn, role)`` makes loading one session a
   range scan over its own rows, independent of how many other sessions the file
   holds. The course's ``get_db()`` has no such index, so every load scans the whole
   table (see ``benchmarks/store.py``).
3. One transaction per turn, opened with ``BEGIN IMMEDIATE`` so the write lock is
   taken before the turn count is read: two processes appending to one session
   serialise instead of both writing turn N. ``busy_timeout`` makes the loser wait
   instead of failing with "database is locked".
4. WAL lets readers run while a writer writes; ``synchronous=NORMAL`` in WAL mode
   loses no committed turn when a *process* dies (only on power loss may the very
   last transactions roll back, never half of one).
5. A turn is two rows (user, assistant) written in one transaction; the usage of the
   turn is stored on the assistant row (input tokens = the prompt the request sent).
6. ``turn_lock`` is a lease row with an expiry time, so it works across processes and
   a process killed while holding it blocks the session for at most ``lease_s``.
7. One connection per store, guarded by a lock, so a store may be shared by threads.
   Do not share one store across ``fork()``: open a store in each process.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import SessionBusyError, SessionNotFoundError, StoreError, StoreUnavailableError
from .base import (
    SessionInfo,
    SessionStore,
    Summary,
    TurnRecord,
    check_last_n,
    check_summary_args,
    check_turn_args,
    holder_is_dead,
    lock_token,
    new_session_id,
    validate_session_id,
)

__all__ = ["MIGRATIONS", "SQLiteStore", "migrate"]

#: Seconds a writer waits for another process's write lock before giving up.
DEFAULT_BUSY_TIMEOUT_S = 10.0

Migration = Callable[[sqlite3.Connection], None]
#: The named migrations, in order. Append only.
MIGRATIONS: list[tuple[str, Migration]] = []


def _migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@_migration
def m001_sessions_and_messages(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE sessions (
            id            TEXT PRIMARY KEY,
            created_at    TEXT NOT NULL,
            updated_at    TEXT NOT NULL,
            system_prompt TEXT NOT NULL DEFAULT '',
            model         TEXT NOT NULL DEFAULT '',
            turn_count    INTEGER NOT NULL DEFAULT 0,
            input_tokens  INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    db.execute("CREATE INDEX sessions_updated_at ON sessions(updated_at)")
    db.execute(
        """
        CREATE TABLE messages (
            id            INTEGER PRIMARY KEY,
            session_id    TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            turn          INTEGER NOT NULL,
            role          TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content       TEXT NOT NULL,
            input_tokens  INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0,
            created_at    TEXT NOT NULL,
            meta          TEXT
        )
        """
    )
    db.execute("CREATE UNIQUE INDEX messages_session_turn ON messages(session_id, turn, role)")


@_migration
def m002_summaries(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE summaries (
            session_id   TEXT PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
            summary      TEXT NOT NULL,
            covers_turns INTEGER NOT NULL,
            updated_at   TEXT NOT NULL
        )
        """
    )


@_migration
def m003_turn_locks(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE turn_locks (
            session_id TEXT PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
            token      TEXT NOT NULL,
            expires_at REAL NOT NULL
        )
        """
    )


def migrate(db: sqlite3.Connection) -> list[str]:
    """Run the migrations ``db`` has not seen yet, in one transaction; return their names.

    ``db`` must be in autocommit mode (``isolation_level=None``).
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(
            "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        done = {row[0] for row in db.execute("SELECT name FROM migrations")}
        ran = []
        for name, fn in MIGRATIONS:
            if name in done:
                continue
            fn(db)
            db.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, _iso_now())
            )
            ran.append(name)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return ran


def _iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _dt(s: str) -> datetime:
    return datetime.fromisoformat(s)


def path_from_url(url: str) -> str:
    """``sqlite:///rel.db`` → ``rel.db``; ``sqlite:////abs.db`` → ``/abs.db``; ``:memory:`` kept."""
    if not url.startswith("sqlite:///"):
        raise StoreError(
            f"{url!r} is not a SQLite URL.",
            hint="Use sqlite:///relative/path.db or sqlite:////absolute/path.db.",
        )
    path = url[len("sqlite:///") :].split("?", 1)[0]
    if not path:
        raise StoreError(f"{url!r} names no file.", hint="Use e.g. sqlite:///conversations.db.")
    return path


_SESSION_COLS = (
    "id, created_at, updated_at, system_prompt, model, turn_count, input_tokens, output_tokens"
)


# What load_history runs ('user' > 'assistant', so role DESC puts the user message
# first in each turn); explain_load() shows SQLite's plan for these very statements.
_HISTORY_SQL = "SELECT role, content FROM messages WHERE session_id = ? ORDER BY turn, role DESC"
_HISTORY_LAST_N_SQL = (
    "SELECT role, content FROM messages WHERE session_id = ? AND turn >="
    " (SELECT turn_count - ? FROM sessions WHERE id = ?) ORDER BY turn, role DESC"
)
_INSERT_MESSAGE_SQL = (
    "INSERT INTO messages (session_id, turn, role, content, input_tokens, output_tokens,"
    " created_at, meta) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD_TURN_SQL = (
    "UPDATE sessions SET turn_count = ?, updated_at = ?,"
    " input_tokens = input_tokens + ?, output_tokens = output_tokens + ? WHERE id = ?"
)


def _info(row: tuple[Any, ...]) -> SessionInfo:
    return SessionInfo(
        id=row[0],
        created_at=_dt(row[1]),
        updated_at=_dt(row[2]),
        system_prompt=row[3],
        model=row[4],
        turn_count=row[5],
        input_tokens=row[6],
        output_tokens=row[7],
    )


class SQLiteStore(SessionStore):
    """Sessions in one SQLite file (see the module notes for the design)."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S) -> None:
        self.path = str(path)
        self.url = "sqlite:///" + self.path
        self._lock = threading.RLock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
            )
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._db.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
            migrate(self._db)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SQLiteStore:
        return cls(path_from_url(url), **kwargs)

    # ── helpers ──────────────────────────────────────────────────────────────

    def _unavailable(self, exc: sqlite3.Error) -> StoreUnavailableError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            hint = "Another process holds the database's write lock for too long; retry shortly."
        else:
            hint = "Check that the path exists, is writable, and is a SQLite file (or pick another --store)."
        return StoreUnavailableError(f"SQLite store {self.path!r} failed: {text}.", hint=hint)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction (rolled back on any error)."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._unavailable(exc) from exc
                raise

    def _read(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self._unavailable(exc) from exc

    def _require(self, db: sqlite3.Connection, session_id: str) -> int:
        row = db.execute("SELECT turn_count FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise SessionNotFoundError(session_id)
        return int(row[0])

    # ── contract ─────────────────────────────────────────────────────────────

    def create_session(
        self, *, system_prompt: str = "", model: str = "", session_id: str | None = None
    ) -> SessionInfo:
        sid = new_session_id() if session_id is None else validate_session_id(session_id)
        now = _iso_now()
        with self._write() as db:
            try:
                db.execute(
                    "INSERT INTO sessions (id, created_at, updated_at, system_prompt, model)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (sid, now, now, system_prompt or "", model or ""),
                )
            except sqlite3.IntegrityError:
                raise StoreError(
                    f"A session with id {sid!r} already exists.",
                    hint="Resume it with --session, or create a session without an explicit id.",
                ) from None
        return SessionInfo(
            id=sid,
            created_at=_dt(now),
            updated_at=_dt(now),
            system_prompt=system_prompt or "",
            model=model or "",
        )

    def get_session(self, session_id: str) -> SessionInfo:
        validate_session_id(session_id)
        rows = self._read(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = ?", (session_id,))
        if not rows:
            raise SessionNotFoundError(session_id)
        return _info(rows[0])

    def append_turn(
        self,
        session_id: str,
        user: str,
        assistant: str,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> int:
        validate_session_id(session_id)
        check_turn_args(user, assistant, input_tokens, output_tokens)
        meta_json = json.dumps(meta) if meta else None
        now = _iso_now()
        with self._write() as db:
            n = self._require(db, session_id)
            self._insert_turn(db, session_id, n, user, assistant, input_tokens, output_tokens, now, meta_json)  # fmt: skip
        return n + 1

    @staticmethod
    def _insert_turn(
        db: sqlite3.Connection,
        session_id: str,
        n: int,
        user: str,
        assistant: str,
        input_tokens: int,
        output_tokens: int,
        now: str,
        meta_json: str | None,
    ) -> None:
        """Turn ``n`` (0-based) of a session whose turn count is ``n``: two rows and the totals."""
        asked = (session_id, n, "user", user, 0, 0, now, None)
        reply = (session_id, n, "assistant", assistant, input_tokens, output_tokens, now, meta_json)
        db.executemany(_INSERT_MESSAGE_SQL, (asked, reply))
        db.execute(_ADD_TURN_SQL, (n + 1, now, input_tokens, output_tokens, session_id))

    def load_turns(self, session_id: str, last_n_turns: int = 0) -> list[TurnRecord]:
        validate_session_id(session_id)
        last_n = check_last_n(last_n_turns)
        cols = "turn, role, content, input_tokens, output_tokens, created_at, meta"
        # 'user' > 'assistant', so role DESC puts the user message first in each turn.
        if last_n:
            rows = self._read(
                f"SELECT {cols} FROM messages WHERE session_id = ? AND turn >="
                " (SELECT turn_count - ? FROM sessions WHERE id = ?) ORDER BY turn, role DESC",
                (session_id, last_n, session_id),
            )
        else:
            rows = self._read(
                f"SELECT {cols} FROM messages WHERE session_id = ? ORDER BY turn, role DESC",
                (session_id,),
            )
        if not rows:
            self.get_session(session_id)  # raises SessionNotFoundError if missing
            return []
        return [
            TurnRecord(
                index=a[0],
                user=u[2],
                assistant=a[2],
                input_tokens=a[3],
                output_tokens=a[4],
                created_at=_dt(a[5]),
                meta=json.loads(a[6]) if a[6] else {},
            )
            for u, a in zip(rows[0::2], rows[1::2], strict=True)
        ]

    def load_history(self, session_id: str, last_n_turns: int = 0) -> list[dict[str, str]]:
        validate_session_id(session_id)
        last_n = check_last_n(last_n_turns)
        if last_n:
            rows = self._read(_HISTORY_LAST_N_SQL, (session_id, last_n, session_id))
        else:
            rows = self._read(_HISTORY_SQL, (session_id,))
        if not rows:
            self.get_session(session_id)
        return [{"role": r, "content": c} for r, c in rows]

    def list_sessions(self) -> list[SessionInfo]:
        rows = self._read(f"SELECT {_SESSION_COLS} FROM sessions ORDER BY updated_at DESC", ())
        return [_info(r) for r in rows]

    def delete_session(self, session_id: str) -> bool:
        validate_session_id(session_id)
        with self._write() as db:
            cur = db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
            return cur.rowcount > 0

    def set_summary(self, session_id: str, summary: str, covers_turns: int) -> None:
        validate_session_id(session_id)
        with self._write() as db:
            n = self._require(db, session_id)
            check_summary_args(summary, covers_turns, n)
            db.execute(
                "INSERT INTO summaries (session_id, summary, covers_turns, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(session_id) DO UPDATE SET"
                " summary = excluded.summary, covers_turns = excluded.covers_turns,"
                " updated_at = excluded.updated_at",
                (session_id, summary, covers_turns, _iso_now()),
            )

    def get_summary(self, session_id: str) -> Summary | None:
        validate_session_id(session_id)
        rows = self._read(
            "SELECT summary, covers_turns FROM summaries WHERE session_id = ?", (session_id,)
        )
        if not rows:
            self.get_session(session_id)
            return None
        return Summary(summary=rows[0][0], covers_turns=rows[0][1])

    @contextmanager
    def turn_lock(self, session_id: str, *, lease_s: float = 120.0) -> Iterator[None]:
        validate_session_id(session_id)
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        token = lock_token()
        with self._write() as db:
            self._require(db, session_id)
            now = time.time()
            db.execute(
                "DELETE FROM turn_locks WHERE session_id = ? AND expires_at <= ?", (session_id, now)
            )
            row = db.execute(
                "SELECT token FROM turn_locks WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is not None and holder_is_dead(row[0]):
                db.execute("DELETE FROM turn_locks WHERE session_id = ?", (session_id,))
            cur = db.execute(
                "INSERT OR IGNORE INTO turn_locks (session_id, token, expires_at) VALUES (?, ?, ?)",
                (session_id, token, now + lease_s),
            )
            acquired = cur.rowcount == 1
        if not acquired:
            raise SessionBusyError(f"Session {session_id!r} is busy with another turn.")
        try:
            yield
        finally:
            with self._write() as db:
                db.execute(
                    "DELETE FROM turn_locks WHERE session_id = ? AND token = ?", (session_id, token)
                )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ── extras for the lab ───────────────────────────────────────────────────

    def bulk_append(
        self, turns: Iterable[tuple[str, str, str, int, int]], *, batch: int = 500
    ) -> int:
        """Append many ``(session_id, user, assistant, input_tokens, output_tokens)`` turns.

        The same rows as :meth:`append_turn`, but ``batch`` turns per transaction (for
        seeding and benchmarks: a commit per turn is what bounds single appends). Turns
        of unknown sessions are skipped, as in :meth:`RedisStore.bulk_append
        <labkit.store.redis.RedisStore.bulk_append>`. Returns how many turns were stored.
        """
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 100_000:
            raise ValueError(f"batch must be an int in 1..100000, got {batch!r}")
        stored = 0
        pending = iter(turns)
        while chunk := list(itertools.islice(pending, batch)):
            for sid, user, assistant, in_tok, out_tok in chunk:
                validate_session_id(sid)
                check_turn_args(user, assistant, in_tok, out_tok)
            now = _iso_now()
            with self._write() as db:
                for sid, user, assistant, in_tok, out_tok in chunk:
                    row = db.execute(
                        "SELECT turn_count FROM sessions WHERE id = ?", (sid,)
                    ).fetchone()
                    if row is None:
                        continue
                    self._insert_turn(db, sid, row[0], user, assistant, in_tok, out_tok, now, None)
                    stored += 1
        return stored

    def explain_load(self, last_n_turns: int = 0) -> list[str]:
        """SQLite's query plan for :meth:`load_history`, one line per step.

        On this schema it starts with ``SEARCH messages USING INDEX
        messages_session_turn (session_id=?)``: a range scan over the session's own
        rows (module note 2), then a sort of just those rows for ``role DESC``.
        """
        last_n = check_last_n(last_n_turns)
        any_id = "0" * 32
        sql, params = (
            (_HISTORY_LAST_N_SQL, (any_id, last_n, any_id)) if last_n else (_HISTORY_SQL, (any_id,))
        )
        return [str(r[3]) for r in self._read("EXPLAIN QUERY PLAN " + sql, params)]

    def applied_migrations(self) -> list[str]:
        """Names of the migrations recorded in this file, in order applied."""
        return [r[0] for r in self._read("SELECT name FROM migrations ORDER BY rowid", ())]

    def schema(self) -> str:
        """The ``CREATE`` statements of this file (what the notebook shows)."""
        rows = self._read("SELECT sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY rowid", ())
        return ";\n".join(r[0].strip() for r in rows) + ";"
