"""The session store contract: what every backend (SQLite, Redis, PostgreSQL, tiered) promises.

A *session* is one conversation: its system prompt, the model it talks to, and an
ordered list of *turns* (one user message and the assistant reply to it). A store
never holds half a turn: :meth:`SessionStore.append_turn` writes the user message,
the assistant message and their token usage together or not at all.

Notes:

1. Turns, not messages, are the unit of writing. The course's ``save_message_redis``
   writes the user and the assistant message with two commands; a crash between them
   leaves a history whose roles no longer alternate, which the Messages API rejects.
2. ``load_history`` returns plain ``{"role", "content"}`` dicts, ready to be sent as
   ``messages=`` to either SDK; ``load_turns`` returns the full :class:`TurnRecord`.
3. ``turn_lock`` is a *lease*: it expires on its own after ``lease_s`` so that a
   process killed while holding it cannot block the session for ever. The lease
   names its holder (host and pid), so a lock whose holder died on this same host is
   taken over at once (a killed ``labkit chat`` can be resumed immediately).
4. Session ids are ``uuid.uuid4().hex`` (32 lowercase hex characters); every method
   validates the id first, so a malformed id is an :class:`InvalidSessionIdError`,
   never a query.
"""

from __future__ import annotations

import abc
import os
import re
import socket
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import InvalidSessionIdError

__all__ = [
    "SessionInfo",
    "SessionStore",
    "Summary",
    "TurnRecord",
    "new_session_id",
    "turns_to_messages",
    "validate_session_id",
]

_ID_RE = re.compile(r"[0-9a-f]{32}")


def new_session_id() -> str:
    """A fresh session id: ``uuid.uuid4().hex``."""
    return uuid.uuid4().hex


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is 32 lowercase hex characters, else raise.

    Raises:
        InvalidSessionIdError: for anything else (wrong length, upper case, dashes,
            not a string).
    """
    if not isinstance(session_id, str) or not _ID_RE.fullmatch(session_id):
        shown = session_id if isinstance(session_id, str) else type(session_id).__name__
        if isinstance(shown, str) and len(shown) > 60:
            shown = shown[:57] + "..."
        raise InvalidSessionIdError(f"{shown!r} is not a valid session id.")
    return session_id


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class SessionInfo:
    """One session's metadata and running totals."""

    #: The session id (32 lowercase hex characters).
    id: str
    #: When the session was created (timezone-aware, UTC).
    created_at: datetime
    #: When the last turn was appended (or the session created), timezone-aware UTC.
    updated_at: datetime
    #: The system prompt the session was created with ("" for none).
    system_prompt: str = ""
    #: The model id the session talks to ("" if not recorded).
    model: str = ""
    #: Number of complete turns stored.
    turn_count: int = 0
    #: Sum of the input (prompt) tokens reported for every turn.
    input_tokens: int = 0
    #: Sum of the output tokens reported for every turn.
    output_tokens: int = 0

    @property
    def age_seconds(self) -> float:
        """Seconds since the session was created."""
        return (_now() - self.created_at).total_seconds()

    @property
    def idle_seconds(self) -> float:
        """Seconds since the session was last written."""
        return (_now() - self.updated_at).total_seconds()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (datetimes as ISO 8601 strings)."""
        return {
            "id": self.id,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "system_prompt": self.system_prompt,
            "model": self.model,
            "turn_count": self.turn_count,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "age_seconds": round(self.age_seconds, 3),
        }


@dataclass(frozen=True)
class TurnRecord:
    """One stored turn: a user message and the assistant reply, with usage."""

    #: 0-based position of the turn in its session.
    index: int
    #: The user message.
    user: str
    #: The assistant reply.
    assistant: str
    #: Input (prompt) tokens the request for this turn used, as reported by the API.
    input_tokens: int = 0
    #: Output tokens of the reply, as reported by the API.
    output_tokens: int = 0
    #: When the turn was stored (timezone-aware UTC).
    created_at: datetime = field(default_factory=_now)
    #: Free-form JSON-serialisable extras (e.g. ``{"strategy": "sliding_window"}``).
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "index": self.index,
            "user": self.user,
            "assistant": self.assistant,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "created_at": self.created_at.isoformat(),
            "meta": self.meta,
        }


@dataclass(frozen=True)
class Summary:
    """The running summary of a session's older turns."""

    #: The summary text.
    summary: str
    #: How many turns (from the first) the summary covers.
    covers_turns: int


def turns_to_messages(turns: list[TurnRecord]) -> list[dict[str, str]]:
    """Flatten turns into alternating ``{"role", "content"}`` messages."""
    out: list[dict[str, str]] = []
    for t in turns:
        out.append({"role": "user", "content": t.user})
        out.append({"role": "assistant", "content": t.assistant})
    return out


def check_turn_args(
    user: object, assistant: object, input_tokens: object, output_tokens: object
) -> None:
    """Type checks shared by the backends (programming errors, not user input)."""
    if not isinstance(user, str) or not isinstance(assistant, str):
        raise TypeError("append_turn() needs str user and assistant messages")
    for name, v in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def check_last_n(last_n_turns: object) -> int:
    if not isinstance(last_n_turns, int) or isinstance(last_n_turns, bool) or last_n_turns < 0:
        raise ValueError(f"last_n_turns must be a non-negative int (0 = all), got {last_n_turns!r}")
    return last_n_turns


class SessionStore(abc.ABC):
    """The contract every backend implements (synchronous; safe to share in one process)."""

    #: URL the store was opened from (``sqlite:///…`` or ``redis://…``).
    url: str

    @abc.abstractmethod
    def create_session(
        self, *, system_prompt: str = "", model: str = "", session_id: str | None = None
    ) -> SessionInfo:
        """Create an empty session (a fresh id unless ``session_id`` is given) and return it.

        Raises:
            InvalidSessionIdError: ``session_id`` is malformed.
            StoreError: a session with that id already exists.
        """

    @abc.abstractmethod
    def get_session(self, session_id: str) -> SessionInfo:
        """The session's metadata and totals. Raises SessionNotFoundError."""

    @abc.abstractmethod
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
        """Atomically store one complete turn; return the session's new turn count."""

    @abc.abstractmethod
    def load_turns(self, session_id: str, last_n_turns: int = 0) -> list[TurnRecord]:
        """All turns in order, or only the last ``last_n_turns`` (0 = all)."""

    def load_history(self, session_id: str, last_n_turns: int = 0) -> list[dict[str, str]]:
        """Alternating user/assistant ``{"role", "content"}`` messages, oldest first."""
        return turns_to_messages(self.load_turns(session_id, last_n_turns))

    @abc.abstractmethod
    def list_sessions(self) -> list[SessionInfo]:
        """Every live session, most recently updated first."""

    @abc.abstractmethod
    def delete_session(self, session_id: str) -> bool:
        """Delete a session with its turns and summary; False if there was none."""

    @abc.abstractmethod
    def set_summary(self, session_id: str, summary: str, covers_turns: int) -> None:
        """Persist the running summary of the first ``covers_turns`` turns."""

    @abc.abstractmethod
    def get_summary(self, session_id: str) -> Summary | None:
        """The persisted summary, or None if the session has none."""

    @abc.abstractmethod
    def turn_lock(self, session_id: str, *, lease_s: float = 120.0) -> AbstractContextManager[None]:
        """Hold the session exclusively (across processes) for one turn.

        Raises:
            SessionBusyError: another holder, in any process, has an unexpired lease.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections. The store must not be used afterwards."""

    # Conveniences shared by every backend.

    def exists(self, session_id: str) -> bool:
        """True if the session exists (and has not expired)."""
        from ..errors import SessionNotFoundError

        try:
            self.get_session(session_id)
        except SessionNotFoundError:
            return False
        return True

    def __enter__(self) -> SessionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'url', '?')!r})"


def lock_token() -> str:
    """A turn-lock token naming its holder: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"


def holder_is_dead(token: str | None) -> bool:
    """True if ``token`` names a process on this host that no longer exists.

    Lets a lock left by a killed process be taken over at once instead of after its
    lease; a holder on another host is only ever freed by its lease.
    """
    if not token or token.count(":") < 2:
        return False
    host, pid_text, _ = token.rsplit(":", 2)
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def check_summary_args(summary: object, covers_turns: object, turn_count: int) -> None:
    if not isinstance(summary, str):
        raise TypeError("summary must be a str")
    if not isinstance(covers_turns, int) or isinstance(covers_turns, bool):
        raise TypeError("covers_turns must be an int")
    if not 0 <= covers_turns <= turn_count:
        raise ValueError(
            f"covers_turns={covers_turns} is outside the session's 0..{turn_count} turns"
        )
