"""Lab 3's exercise: the course's SQLite session functions, checked on a real file.

The learner writes the course's three functions with the database path first:

- ``save_turn(db_path, conv_id, user_msg, assistant_msg, tokens=0)``
- ``load_history(db_path, conv_id, last_n=0) -> list[{"role", "content"}]``
- ``list_sessions(db_path) -> [(conv_id, last_updated), ...]`` (or dicts with an id and
  an ``updated_at``-like key, or a dict id → time)

The checker runs them against a fresh SQLite file in a temporary directory.

Notes:

1. A turn must be saved atomically. The checker makes the *second* half of a turn fail
   inside SQLite: it adds a temporary trigger to every table of the learner's schema that
   aborts any insert or update carrying a marker text, then saves a turn whose reply is
   that marker. Afterwards the session must hold nothing of the turn (a lone user message
   is a half-saved turn).
2. The scale probe grows the file to ``scale`` messages (default 100,000) spread over
   1,000 sessions, by copying the rows the learner's own ``save_turn`` wrote, with
   ``INSERT … SELECT`` in one transaction (a second or so), then times ``load_history``
   on one session and asks SQLite for the plan of the queries it ran
   (``EXPLAIN QUERY PLAN``; the statements are captured with a trace callback on the
   connections the learner's code opens through ``sqlite3.connect``). A ``SCAN`` of the
   messages table means every load reads every message of every session: the fix is an
   index on the session column.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._common import NotDone, call_learner, describe_error, is_placeholder
from .result import CheckResult, Report, not_done

__all__ = ["check_session_store"]

_GUIDE = (
    "Write the course's save_turn(db_path, conv_id, user_msg, assistant_msg, tokens=0) and "
    "load_history(db_path, conv_id, last_n=0) with the database path as their first argument "
    "(get_db(db_path) opens sqlite3.connect(db_path)), and add list_sessions(db_path) returning "
    "[(conv_id, updated_at), ...]."
)
_POISON = "labkit-check: this reply fails to save"
_SESSIONS = 1000


def _norm(messages: Any) -> list[tuple[str, str]] | None:
    if not isinstance(messages, list):
        return None
    out = []
    for m in messages:
        try:
            out.append((str(m["role"]), str(m["content"])))
        except (KeyError, TypeError, IndexError):
            return None
    return out


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return t if t.tzinfo else t.replace(tzinfo=UTC)
    return None


_ID_KEYS = ("id", "session_id", "conversation_id", "conv_id", "session")
_TIME_KEYS = ("updated_at", "last_updated", "updated", "last_updated_at", "last_update")


def _sessions(value: Any) -> dict[str, Any] | None:
    """``list_sessions``' answer as {id: raw time}, whatever shape it came in."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if not isinstance(value, (list, tuple)):
        return None
    out: dict[str, Any] = {}
    for row in value:
        if isinstance(row, sqlite3.Row):
            row = {k: row[k] for k in row.keys()}  # noqa: SIM118 - sqlite3.Row
        if isinstance(row, dict):
            sid = next((row[k] for k in _ID_KEYS if k in row), None)
            when = next((row[k] for k in _TIME_KEYS if k in row), None)
        elif isinstance(row, (list, tuple)) and len(row) >= 2:
            sid, when = row[0], row[1]
        else:
            return None
        if sid is None:
            return None
        out[str(sid)] = when
    return out


def _tables(conn: sqlite3.Connection) -> dict[str, list[tuple[str, str, int]]]:
    """{table: [(column, declared type, pk position)]} of the learner's schema."""
    names = [
        r[0]
        for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {
        t: [(r[1], (r[2] or "").upper(), r[5]) for r in conn.execute(f'PRAGMA table_info("{t}")')]
        for t in names
    }


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@contextlib.contextmanager
def _poison_triggers(db: str) -> Iterator[None]:
    conn = sqlite3.connect(db)
    made = []
    try:
        for i, (table, cols) in enumerate(_tables(conn).items()):
            if not cols:
                continue
            for op in ("INSERT", "UPDATE"):
                cond = " OR ".join(
                    f"instr(CAST(NEW.{_q(c)} AS TEXT), {_sql_str(_POISON)}) > 0" for c, _, _ in cols
                )
                trig = f"labkit_check_poison_{op.lower()}_{i}"
                conn.execute(
                    f"CREATE TRIGGER {trig} BEFORE {op} ON {_q(table)} WHEN {cond} "
                    "BEGIN SELECT RAISE(ABORT, 'labkit check: injected failure'); END"
                )
                made.append(trig)
        conn.commit()
        yield
    finally:
        for trig in made:
            conn.execute(f"DROP TRIGGER IF EXISTS {trig}")
        conn.commit()
        conn.close()


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@contextlib.contextmanager
def _capture_sql() -> Iterator[list[str]]:
    """Statements run on connections opened through ``sqlite3.connect`` meanwhile."""
    captured: list[str] = []
    real = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real(*args, **kwargs)
        with contextlib.suppress(Exception):
            conn.set_trace_callback(captured.append)
        return conn

    sqlite3.connect = connect  # type: ignore[assignment]
    try:
        yield captured
    finally:
        sqlite3.connect = real  # type: ignore[assignment]


def _grow(db: str, conv_id: str, per_session: int, scale: int) -> tuple[int, str, str] | None:
    """Copy ``conv_id``'s rows into 1,000 sessions until ~``scale`` messages (note 2).

    Returns (rows added to the biggest table, that table, its session column), or None
    when no table holds the session id in a column of its own.
    """
    copies = max(1, math.ceil(scale / max(1, per_session)))
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        tables = _tables(conn)
        found: list[tuple[str, str]] = []
        for table, cols in tables.items():
            for col, _, _ in cols:
                hit = conn.execute(
                    f"SELECT 1 FROM {_q(table)} WHERE {_q(col)} = ? LIMIT 1", (conv_id,)
                ).fetchone()
                if hit:
                    found.append((table, col))
                    break
        if not found:
            return None
        conn.execute("BEGIN")
        biggest = (0, "", "")
        for table, key in found:
            cols = tables[table]
            pks = [c for c in cols if c[2]]
            auto = len(pks) == 1 and pks[0][1] == "INTEGER"
            keep = [c for c, _, pk in cols if not (auto and pk)]
            select = ", ".join(
                f"'{conv_id}-bulk-' || (seq.k % {_SESSIONS})" if c == key else f"t.{_q(c)}"
                for c in keep
            )
            before = conn.total_changes
            conn.execute(
                f"WITH RECURSIVE seq(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM seq "
                f"WHERE k + 1 < {copies}) "
                f"INSERT OR IGNORE INTO {_q(table)} ({', '.join(_q(c) for c in keep)}) "
                f"SELECT {select} FROM seq, {_q(table)} AS t WHERE t.{_q(key)} = ?",
                (conv_id,),
            )
            added = conn.total_changes - before
            if added > biggest[0]:
                biggest = (added, table, key)
        conn.execute("COMMIT")
        return biggest
    finally:
        conn.close()


def _plans(db: str, statements: list[str]) -> list[tuple[str, list[str]]]:
    conn = sqlite3.connect(db)
    out = []
    try:
        for sql in statements:
            if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
                continue
            try:
                rows = conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()
            except sqlite3.Error:
                continue
            out.append((sql, [str(r[-1]) for r in rows]))
    finally:
        conn.close()
    return out


def check_session_store(
    save_turn: Any,
    load_history: Any,
    list_sessions: Any = None,
    *,
    scale: int = 100_000,
    workdir: str | None = None,
) -> CheckResult:
    """Check the course's SQLite session functions (database path first) on a temp file.

    Round trip, order, ``last_n``, ``list_sessions`` with last-updated times, an atomic
    turn, and a scale probe at ``scale`` messages (``scale=0`` skips it). See the notes.
    """
    name = "check_session_store"
    if is_placeholder(save_turn) or is_placeholder(load_history):
        return not_done(name, "save_turn and load_history", _GUIDE)
    with tempfile.TemporaryDirectory(prefix="labkit-store-check-", dir=workdir) as tmp:
        db = str(Path(tmp) / "conversations.db")
        try:
            return _check(save_turn, load_history, list_sessions, db, scale)
        except NotDone:
            return not_done(name, "save_turn and load_history", _GUIDE)


def _check(
    save_turn: Any, load_history: Any, list_sessions: Any, db: str, scale: int
) -> CheckResult:
    report = Report("check_session_store")
    a, b = "session-a", "session-b"
    turns_a = [
        ("My name is Ada.", "Nice to meet you, Ada."),
        ("It's a naïve question — 日本語?\nSecond line.", 'A "quoted" reply.'),
        ("What is my name?", "Your name is Ada."),
    ]
    turns_b = [("Hello from B.", "Hi B."), ("Still B.", "Yes, B.")]

    def save(conv: str, user: str, reply: str) -> None:
        save_turn(db, conv, user, reply)  # returns nothing: None is fine here

    try:
        save(a, *turns_a[0])
    except NotImplementedError:
        raise NotDone() from None
    except Exception as exc:
        report.fail(
            "save_turn runs",
            describe_error(exc),
            "It is called as save_turn(db_path, conv_id, user_msg, assistant_msg).",
        )
        return report.result()
    try:
        save(b, *turns_b[0])
        save(a, *turns_a[1])
        save(b, *turns_b[1])
        save(a, *turns_a[2])
        loaded = call_learner(load_history, db, a)
    except NotDone:
        raise
    except Exception as exc:
        report.fail(
            "save_turn and load_history run",
            describe_error(exc),
            "They are called as save_turn(db_path, conv_id, user, reply) and "
            "load_history(db_path, conv_id, last_n=0).",
        )
        return report.result()

    want_a = [(r, t) for u, x in turns_a for r, t in (("user", u), ("assistant", x))]
    want_b = [(r, t) for u, x in turns_b for r, t in (("user", u), ("assistant", x))]
    got_a = _norm(loaded)
    if got_a is None:
        report.fail(
            "load_history returns the messages",
            f"it returned {type(loaded).__name__} {loaded!r:.100}",
            'Return a list of {"role": ..., "content": ...} dicts.',
        )
        return report.result()
    try:
        got_b = _norm(load_history(db, b))
    except Exception as exc:
        got_b = None
        report.fail("load_history runs", describe_error(exc))
    if got_a == want_a and got_b == want_b:
        report.ok(
            "round trip, in order",
            "two interleaved sessions came back whole, in order, byte for byte",
        )
    elif got_a is not None and sorted(got_a) == sorted(want_a) and got_b == want_b:
        report.fail(
            "round trip, in order",
            "the messages came back in the wrong order",
            "ORDER BY the message's autoincrement id (insertion order).",
        )
    else:
        report.fail(
            "round trip, in order",
            f"session A: saved {len(want_a)} messages, loaded {len(got_a or [])}"
            + ("" if got_a == want_a else " (different)")
            + f"; session B: saved {len(want_b)}, loaded {len(got_b or [])}",
            "Filter by conversation id and keep role and content exactly as given.",
        )
    try:
        empty = load_history(db, "no-such-session")
        report.check(
            _norm(empty) == [],
            "an unknown session loads as []",
            "[]",
            f"{empty!r:.80}",
            "Return an empty list when nothing is stored.",
        )
    except Exception as exc:
        report.fail("an unknown session loads as []", describe_error(exc), "Return [] instead.")

    # last_n
    try:
        last2 = _norm(load_history(db, a, last_n=2))
        last1 = _norm(load_history(db, a, last_n=1))
        report.check(
            last2 == want_a[-4:] and last1 == want_a[-2:],
            "last_n keeps the last n turns",
            "last_n=2 → 4 messages, last_n=1 → 2, the newest",
            f"last_n=2 gave {len(last2 or [])} messages, last_n=1 gave {len(last1 or [])}",
            "A turn is two messages: return messages[-2 * last_n:] (all when last_n is 0).",
        )
    except Exception as exc:
        report.fail("last_n keeps the last n turns", describe_error(exc))

    _check_list_sessions(report, save, list_sessions, db, a, b)
    _check_atomic(report, save_turn, load_history, db)
    if scale > 0:
        _scale_probe(report, load_history, db, a, len(want_a), scale)
    return report.result()


def _check_list_sessions(
    report: Report, save: Any, list_sessions: Any, db: str, a: str, b: str
) -> None:
    req = "list_sessions returns every session with its last-updated time"
    hint = "SELECT id, updated_at FROM conversations ORDER BY updated_at DESC"
    try:
        raw = call_learner(list_sessions, db)
    except NotDone:
        report.todo(req, "not done yet", f"Return [(conv_id, updated_at), ...]: {hint}.")
        return
    except Exception as exc:
        report.fail(req, describe_error(exc), hint)
        return
    sessions = _sessions(raw)
    if sessions is None or a not in sessions or b not in sessions:
        report.fail(
            req, f"it returned {raw!r:.120}", f"Return [(conv_id, updated_at), ...]: {hint}."
        )
        return
    ta, tb = _parse_time(sessions[a]), _parse_time(sessions[b])
    if ta is None or tb is None:
        report.fail(
            req,
            f"the times are not readable as times: {sessions[a]!r}, {sessions[b]!r}",
            "Return the ISO 8601 text (or a datetime) you stored in updated_at.",
        )
        return
    time.sleep(0.002)
    try:
        save(b, "One more for B.", "Noted.")
        again = _sessions(list_sessions(db)) or {}
    except Exception as exc:
        report.fail(req, describe_error(exc))
        return
    tb2 = _parse_time(again.get(b))
    if ta >= tb and tb2 is not None and tb2 > tb and tb2 >= ta:
        report.ok(req, "both sessions, and the time moves when a session gets a new turn")
    else:
        report.fail(
            req,
            f"after saving to A last, A {sessions[a]!r} vs B {sessions[b]!r}; after one more turn "
            f"on B its time is {again.get(b)!r}",
            "Set updated_at to the current time on every save_turn (the upsert's DO UPDATE).",
        )


def _check_atomic(report: Report, save_turn: Any, load_history: Any, db: str) -> None:
    req = "a turn is saved atomically (both messages or none)"
    conv = "session-atomic"
    user = "This turn must not be half saved."
    raised: BaseException | None = None
    try:
        with _poison_triggers(db):
            try:
                save_turn(db, conv, user, _POISON)
            except Exception as exc:
                raised = exc
    except sqlite3.Error as exc:
        report.skip(req, f"could not inject the failure: {exc}")
        return
    try:
        left = _norm(load_history(db, conv)) or []
    except Exception as exc:
        report.fail(req, f"loading afterwards failed: {describe_error(exc)}")
        return
    if not left:
        detail = "when saving the reply failed, nothing of the turn was stored"
        if raised is None:
            detail += " (but save_turn returned normally: the caller thinks the turn was saved)"
        report.ok(req, detail)
    else:
        report.fail(
            req,
            f"saving the reply failed inside SQLite, and the session kept {len(left)} message(s) "
            f"of the turn ({', '.join(r for r, _ in left)}): a half-saved turn",
            "Insert both messages in one transaction and commit once, after both inserts "
            "(sqlite3 opens the transaction on the first INSERT; do not commit in between).",
        )


def _scale_probe(
    report: Report, load_history: Any, db: str, conv: str, per_session: int, scale: int
) -> None:
    req = f"load_history at {scale:,} messages uses an index"
    try:
        grown = _grow(db, conv, per_session, scale)
    except sqlite3.Error as exc:
        report.skip(req, f"could not grow the database: {exc}")
        return
    if grown is None:
        report.skip(req, "no table holds the session id in a column of its own")
        return
    added, table, key = grown
    target = f"{conv}-bulk-17"
    try:
        with _capture_sql() as statements:
            first = load_history(db, target)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            load_history(db, target)
            times.append((time.perf_counter() - t0) * 1000)
    except Exception as exc:
        report.fail(req, f"load_history failed on the big file: {describe_error(exc)}")
        return
    ms = statistics.median(times)
    report.measured.update(
        {"scale_rows": added, "load_ms_p50": ms, "messages_loaded": len(first or [])}
    )
    plans = _plans(db, statements)
    source = "the queries load_history ran"
    if not any(table.lower() in sql.lower() for sql, _ in plans):
        plans = _plans(db, [f"SELECT * FROM {_q(table)} WHERE {_q(key)} = {_sql_str(target)}"])
        source = f"a lookup of one session in {table}"
    conn = sqlite3.connect(db)
    try:
        others = {t.lower() for t in _tables(conn) if t != table}
    finally:
        conn.close()
    plans = [(sql, ds) for sql, ds in plans if table.lower() in sql.lower()]
    scans = [d for _, details in plans for d in details if _is_full_scan(d, others)]
    report.measured["plan"] = [d for _, details in plans for d in details]
    timing = f"{ms:.1f} ms per load (median of 5) for {len(first or [])} messages"
    if scans:
        report.fail(
            req,
            f"SQLite plans a full {scans[0]!r} for {source}: every load reads all "
            f"{added:,} rows of {table} to find one session's. {timing}.",
            f"Add an index on the session column, e.g. CREATE INDEX IF NOT EXISTS "
            f"idx_{table}_{key} ON {table}({key}, id) in get_db().",
        )
    else:
        details = "; ".join(d for _, ds in plans for d in ds) or "no plan"
        report.ok(req, f"{timing}; plan: {details}")


def _is_full_scan(detail: str, other_tables: set[str]) -> bool:
    """``SCAN messages`` (or its alias), not a scan of another, small table."""
    d = detail.strip()
    if not d.upper().startswith("SCAN "):
        return False
    target = d[5:].split(" ", 1)[0].strip('"').lower()
    return target != "constant" and target not in other_tables
