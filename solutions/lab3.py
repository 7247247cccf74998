"""Lab 3: the course's SQLite functions with the database path first, an index on the
session column, and list_sessions()."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime


@contextmanager
def get_db(db_path: str) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(db_path)
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
    conn.execute(
        "CREATE INDEX IF NOT EXISTS idx_messages_conversation ON messages(conversation_id, id)"
    )
    conn.commit()
    try:
        yield conn
    finally:
        conn.close()


def save_turn(
    db_path: str, conv_id: str, user_msg: str, assistant_msg: str, tokens: int = 0
) -> None:
    """Both messages and the session's updated_at in one transaction, one commit."""
    now = datetime.now(UTC).isoformat()
    with get_db(db_path) as conn:
        conn.execute(
            """
            INSERT INTO conversations (id, created_at, updated_at) VALUES (?, ?, ?)
            ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at
            """,
            (conv_id, now, now),
        )
        conn.executemany(
            "INSERT INTO messages (conversation_id, role, content, created_at, token_count) "
            "VALUES (?, ?, ?, ?, ?)",
            [
                (conv_id, "user", user_msg, now, 0),
                (conv_id, "assistant", assistant_msg, now, tokens),
            ],
        )
        conn.commit()


def load_history(db_path: str, conv_id: str, last_n: int = 0) -> list[dict]:
    with get_db(db_path) as conn:
        rows = conn.execute(
            "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id",
            (conv_id,),
        ).fetchall()
    messages = [{"role": r["role"], "content": r["content"]} for r in rows]
    return messages[-last_n * 2 :] if last_n else messages


def list_sessions(db_path: str) -> list[tuple[str, str]]:
    """(session id, last updated) of every session, the most recent first."""
    with get_db(db_path) as conn:
        rows = conn.execute(
            "SELECT id, updated_at FROM conversations ORDER BY updated_at DESC"
        ).fetchall()
    return [(r["id"], r["updated_at"]) for r in rows]
