"""Persistent conversation sessions: one contract, two backends.

>>> store = open_store("sqlite:///conversations.db")      # or "redis://127.0.0.1:6379/0"
>>> s = store.create_session(system_prompt="Be brief.", model="smollm2-135m-instruct")
>>> store.append_turn(s.id, "Hi, I'm Ada.", "Hello Ada!", input_tokens=12, output_tokens=4)
1
>>> store.load_history(s.id)
[{'role': 'user', 'content': "Hi, I'm Ada."}, {'role': 'assistant', 'content': 'Hello Ada!'}]

The URL comes from the argument, else ``$LABKIT_STORE``, else
``sqlite:///conversations.db`` (the course's file, in the working directory).
See :mod:`labkit.store.base` for the contract, :mod:`labkit.store.sqlite` and
:mod:`labkit.store.redis` for the two designs.
"""

from __future__ import annotations

import os

from ..errors import StoreError
from .base import (
    SessionInfo,
    SessionStore,
    Summary,
    TurnRecord,
    new_session_id,
    turns_to_messages,
    validate_session_id,
)

__all__ = [
    "DEFAULT_STORE_URL",
    "SessionInfo",
    "SessionStore",
    "Summary",
    "TurnRecord",
    "new_session_id",
    "open_store",
    "resolve_store_url",
    "turns_to_messages",
    "validate_session_id",
]

#: Where sessions live when nothing else is said.
DEFAULT_STORE_URL = "sqlite:///conversations.db"


def resolve_store_url(url: str | None = None) -> str:
    """``url``, else ``$LABKIT_STORE``, else :data:`DEFAULT_STORE_URL`."""
    return url or os.environ.get("LABKIT_STORE") or DEFAULT_STORE_URL


def open_store(url: str | None = None, *, ttl: int | None = None) -> SessionStore:
    """Open the session store at ``url`` (``sqlite:///path`` or ``redis://host:port/db``).

    Args:
        url: the store URL; None → ``$LABKIT_STORE`` → ``sqlite:///conversations.db``.
        ttl: Redis only: seconds of inactivity before a session expires (default 600,
            0 = never). Ignored by SQLite, whose sessions live until deleted.

    Raises:
        StoreError: unknown scheme. StoreUnavailableError: the file or server cannot be used.
    """
    url = resolve_store_url(url)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if scheme in {"redis", "rediss"}:
        from .redis import RedisStore

        return RedisStore(url, ttl=ttl)
    raise StoreError(
        f"Unknown store URL {url!r}.",
        hint="Use sqlite:///path/to/file.db or redis://host:port/db.",
    )
