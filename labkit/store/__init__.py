"""Persistent conversation sessions: one contract, four backends.

>>> store = open_store("sqlite:///conversations.db")      # or "redis://127.0.0.1:6379/0"
>>> s = store.create_session(system_prompt="Be brief.", model="smollm2-135m-instruct")
>>> store.append_turn(s.id, "Hi, I'm Ada.", "Hello Ada!", input_tokens=12, output_tokens=4)
1
>>> store.load_history(s.id)
[{'role': 'user', 'content': "Hi, I'm Ada."}, {'role': 'assistant', 'content': 'Hello Ada!'}]

The URL comes from the argument, else ``$LABKIT_STORE``, else
``sqlite:///conversations.db`` (the course's file, in the working directory).
``postgresql://user@host:port/db`` opens PostgreSQL; a Redis URL with an *archive*
(``archive=`` or ``$LABKIT_ARCHIVE``: a SQLite or PostgreSQL URL) opens the tiered
store, Redis as the hot cache in front of the durable archive.
See :mod:`labkit.store.base` for the contract, :mod:`labkit.store.sqlite`,
:mod:`labkit.store.redis`, :mod:`labkit.store.postgres` and :mod:`labkit.store.tiered`
for the designs.
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
    "resolve_archive_url",
    "resolve_store_url",
    "turns_to_messages",
    "validate_session_id",
]

#: Where sessions live when nothing else is said.
DEFAULT_STORE_URL = "sqlite:///conversations.db"


def resolve_store_url(url: str | None = None) -> str:
    """``url``, else ``$LABKIT_STORE``, else :data:`DEFAULT_STORE_URL`."""
    return url or os.environ.get("LABKIT_STORE") or DEFAULT_STORE_URL


def resolve_archive_url(archive: str | None = None) -> str | None:
    """``archive``, else ``$LABKIT_ARCHIVE``, else None (no archive)."""
    return archive or os.environ.get("LABKIT_ARCHIVE") or None


_SCHEMES_HINT = (
    "Use sqlite:///path/to/file.db, redis://host:port/db or postgresql://user@host:port/db."
)


def _open_durable(url: str) -> SessionStore | None:
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        from .sqlite import SQLiteStore

        return SQLiteStore.from_url(url)
    if scheme in {"postgresql", "postgres"}:
        from .postgres import PostgresStore

        return PostgresStore(url)
    return None


def open_store(
    url: str | None = None, *, ttl: int | None = None, archive: str | None = None
) -> SessionStore:
    """Open the session store at ``url`` (``sqlite:///path``, ``redis://host:port/db``,
    ``postgresql://user@host:port/db``), or the tiered store when an archive is given.

    Args:
        url: the store URL; None → ``$LABKIT_STORE`` → ``sqlite:///conversations.db``.
        ttl: Redis only: seconds of inactivity before a session expires (default 600,
            0 = never); with an archive, before it leaves Redis (it stays in the archive).
            Ignored by SQLite and PostgreSQL, whose sessions live until deleted.
        archive: a ``sqlite:///`` or ``postgresql://`` URL to keep every session in,
            behind the Redis ``url`` (:class:`~labkit.store.tiered.TieredStore`);
            None → ``$LABKIT_ARCHIVE`` → no archive.

    Raises:
        StoreError: unknown scheme, or an archive behind a store that is not Redis.
        StoreUnavailableError: the file or server cannot be used.
    """
    url = resolve_store_url(url)
    archive = resolve_archive_url(archive)
    scheme = url.split(":", 1)[0].lower()
    if archive:
        if scheme not in {"redis", "rediss"}:
            raise StoreError(
                f"An archive ({archive!r}) goes behind a Redis store, not {url!r}.",
                hint="Use --store redis://host:port/db with --archive, or drop --archive"
                " (and unset LABKIT_ARCHIVE).",
            )
        from .redis import RedisStore
        from .tiered import TieredStore

        durable = _open_durable(archive)
        if durable is None:
            raise StoreError(
                f"Unknown archive URL {archive!r}.",
                hint="An archive is sqlite:///path/to/file.db or postgresql://user@host:port/db.",
            )
        try:
            return TieredStore(RedisStore(url, ttl=ttl), durable)
        except BaseException:
            durable.close()
            raise
    store = _open_durable(url)
    if store is not None:
        return store
    if scheme in {"redis", "rediss"}:
        from .redis import RedisStore

        return RedisStore(url, ttl=ttl)
    raise StoreError(f"Unknown store URL {url!r}.", hint=_SCHEMES_HINT)
