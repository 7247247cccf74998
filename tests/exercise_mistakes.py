"""Known-wrong answers to the exercises: each checker must fail every one of them,
with the feedback that names the mistake (tests/test_exercises.py)."""

from __future__ import annotations

import time
from typing import Any

# ── Lab 1: TTFT ──────────────────────────────────────────────────────────────


def ttft_first_event(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """Stops the clock at the first SSE event (message_start), not the first text."""
    start = time.perf_counter()
    with client.messages.stream(model=model, max_tokens=max_tokens, messages=messages) as stream:
        for _event in stream:
            return (time.perf_counter() - start) * 1000
    raise RuntimeError("no events")


def ttft_seconds(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """Right moments, wrong unit."""
    start = time.perf_counter()
    with client.messages.stream(model=model, max_tokens=max_tokens, messages=messages) as stream:
        for _text in stream.text_stream:
            return time.perf_counter() - start
    raise RuntimeError("no text")


def ttft_whole_stream(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """Times the whole reply."""
    start = time.perf_counter()
    with client.messages.stream(model=model, max_tokens=max_tokens, messages=messages) as stream:
        for _text in stream.text_stream:
            pass
    return (time.perf_counter() - start) * 1000


def ttft_after_send(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """Starts the clock once the stream is open (the request was sent already)."""
    with client.messages.stream(model=model, max_tokens=max_tokens, messages=messages) as stream:
        start = time.perf_counter()
        for _text in stream.text_stream:
            return (time.perf_counter() - start) * 1000
    raise RuntimeError("no text")


# ── Lab 1: total time ────────────────────────────────────────────────────────


def total_seconds(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    start = time.perf_counter()
    client.messages.create(model=model, max_tokens=max_tokens, messages=messages)
    return time.perf_counter() - start


def total_after_call(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """Starts the clock after create() returned."""
    response = client.messages.create(model=model, max_tokens=max_tokens, messages=messages)
    start = time.perf_counter()
    _ = response.content[0].text
    return (time.perf_counter() - start) * 1000


# ── Lab 2: sliding window ────────────────────────────────────────────────────


def window_newest_first(messages: list[dict], max_tokens: int, min_turns: int) -> list[dict]:
    """The course's own sliding_window: right messages, newest pair first."""
    from labkit.history import course_sliding_window

    return course_sliding_window(messages, max_tokens, min_turns)


def window_split_pairs(messages: list[dict], max_tokens: int, min_turns: int) -> list[dict]:
    """Message by message from the newest: may keep a reply without its question."""
    from labkit.tokens import count_tokens

    kept: list[dict] = []
    used = 0
    for m in reversed(messages):
        cost = count_tokens(m["content"])
        if kept and used + cost > max_tokens and len(kept) >= 2 * min_turns + 1:
            break
        kept.insert(0, m)
        used += cost
    return kept


def window_ignores_budget(messages: list[dict], max_tokens: int, min_turns: int) -> list[dict]:
    """Keeps the last min_turns + 2 pairs whatever they cost."""
    keep = 2 * (min_turns + 2) + 1
    return messages[-keep:]


# ── Lab 2: ConversationManager ───────────────────────────────────────────────


class ManagerNoHistory:
    """Sends only the newest message: the model forgets everything."""

    def __init__(self, client: Any, model: str) -> None:
        self.client, self.model, self.history = client, model, []

    def chat(self, user_message: str) -> str:
        self.history.append({"role": "user", "content": user_message})
        response = self.client.messages.create(
            model=self.model, max_tokens=64, messages=[{"role": "user", "content": user_message}]
        )
        reply = response.content[0].text
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def clear(self) -> None:
        self.history = []

    @property
    def turn_count(self) -> int:
        return sum(1 for m in self.history if m["role"] == "user")


class ManagerDanglingUser(ManagerNoHistory):
    """The course's pattern: the user message is appended before the call, and stays
    there when the call fails."""

    def chat(self, user_message: str) -> str:
        self.history.append({"role": "user", "content": user_message})
        response = self.client.messages.create(
            model=self.model, max_tokens=64, messages=list(self.history)
        )
        reply = response.content[0].text
        self.history.append({"role": "assistant", "content": reply})
        return reply


# ── Lab 3: the session store ─────────────────────────────────────────────────


def course_store() -> tuple[Any, Any, Any]:
    """The course's get_db/save_turn/load_history, the database path passed in (no index),
    with a list_sessions a learner would add."""
    import sqlite3
    from contextlib import contextmanager
    from datetime import datetime

    @contextmanager
    def get_db(db_path: str):
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
        conn.commit()
        try:
            yield conn
        finally:
            conn.close()

    def save_turn(db_path, conv_id, user_msg, assistant_msg, tokens=0):
        now = datetime.utcnow().isoformat()
        with get_db(db_path) as conn:
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

    def load_history(db_path, conv_id, last_n=0):
        with get_db(db_path) as conn:
            query = "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id"
            rows = conn.execute(query, (conv_id,)).fetchall()
        messages = [{"role": r["role"], "content": r["content"]} for r in rows]
        return messages[-last_n * 2 :] if last_n else messages

    def list_sessions(db_path):
        with get_db(db_path) as conn:
            rows = conn.execute("SELECT id, updated_at FROM conversations").fetchall()
        return [(r["id"], r["updated_at"]) for r in rows]

    return save_turn, load_history, list_sessions


def save_turn_half(db_path: str, conv_id: str, user_msg: str, assistant_msg: str, tokens: int = 0):
    """Commits the user message before inserting the reply: a failure leaves half a turn."""
    from datetime import UTC, datetime

    from solutions.lab3 import get_db

    now = datetime.now(UTC).isoformat()
    with get_db(db_path) as conn:
        conn.execute(
            "INSERT INTO conversations (id, created_at, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET updated_at = excluded.updated_at",
            (conv_id, now, now),
        )
        conn.execute(
            "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (?, 'user', ?, ?)",
            (conv_id, user_msg, now),
        )
        conn.commit()
        conn.execute(
            "INSERT INTO messages (conversation_id, role, content, created_at, token_count) "
            "VALUES (?, 'assistant', ?, ?, ?)",
            (conv_id, assistant_msg, now, tokens),
        )
        conn.commit()
