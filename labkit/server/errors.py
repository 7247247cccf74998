"""Error answers of the chat API: one body shape, and the one place where errors become
HTTP statuses.

Notes:

1. **One body.** Every 4xx/5xx answer is ``{"error": <type>, "message": <what is
   wrong>, "hint": <what to do>}`` (:class:`HTTPError`), and a stream that fails after
   its ``200`` carries the same object as its error event. The hint is never empty:
   where an error brings none, the table's default is used.
2. **Domain errors are translated here only.** The library raises
   :mod:`labkit.errors` exceptions; :func:`http_error` maps each class to a status and
   a type (the most specific class in ``STATUS`` wins). An
   :class:`~labkit.errors.UpstreamError` brings its own ``kind`` and ``status``:
   :mod:`labkit.upstream` chose them from the model API's answer (a rate limit is 429,
   an overloaded model 503, a timeout 504, anything else from upstream 502).
3. **Framework errors too.** :func:`install` registers the handlers: malformed JSON is
   400 ``invalid_json``, wrong or missing fields 422 ``invalid_request`` naming the
   fields, an unknown path or method Starlette's 404/405, a body over the size bound
   413 ``request_too_large``, and anything unexpected a 500 ``internal_error``. Checks
   that run before routing (request size limits, authentication) answer through
   :meth:`HTTPError.response` as well, so a client reads one shape whatever refused it.
4. **Nothing secret in a body.** :meth:`HTTPError.body` passes the message and hint
   through :func:`labkit.server.redact.redact` (keys, URL passwords). An unexpected
   error's body says only that it happened and gives a reference; the log line with
   the same reference names the exception (:func:`unexpected`), with no traceback
   unless the server runs at ``--log-level debug``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ConfigurationError,
    ContextBudgetError,
    InvalidMessageError,
    InvalidSessionIdError,
    LabkitError,
    SessionBusyError,
    SessionNotFoundError,
    StoreError,
    StoreUnavailableError,
    TokenizerUnavailableError,
    UpstreamError,
)
from ..localapi.limits import BodyTooLarge
from .redact import redact, reference

__all__ = [
    "STATUS",
    "HTTPError",
    "from_http_exception",
    "from_validation",
    "http_error",
    "install",
    "unexpected",
]

log = logging.getLogger("labkit.server")

_RETRY = "Resend the message; if it keeps failing, check the server log."

#: Domain error class → (HTTP status, error type, hint used when the error has none).
STATUS: dict[type[LabkitError], tuple[int, str, str]] = {
    InvalidSessionIdError: (400, "invalid_session_id", 'Use an id the server returned, or "new".'),
    SessionNotFoundError: (
        404,
        "session_not_found",
        'List sessions with GET /sessions, or use "new".',
    ),
    SessionBusyError: (409, "session_busy", "Wait for the current reply to finish, then resend."),
    ContextBudgetError: (413, "context_budget_exceeded", "Shorten the message."),
    InvalidMessageError: (422, "invalid_message", "Send the message as non-empty text."),
    StoreUnavailableError: (
        503,
        "store_unavailable",
        "The session store cannot be reached; resend in a moment.",
    ),
    StoreError: (500, "store_error", _RETRY),
    ConfigurationError: (
        500,
        "configuration_error",
        "Check the server's flags and environment (labkit serve --help).",
    ),
    TokenizerUnavailableError: (500, "tokenizer_unavailable", _RETRY),
    LabkitError: (500, "internal_error", _RETRY),
}


class HTTPError(Exception):
    """An error answer: status, type, message, hint (note 1)."""

    def __init__(self, status: int, error: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.hint = status, error, message, hint

    def body(self) -> dict[str, str]:
        """The JSON body (also the error event of a stream); secrets redacted (note 4)."""
        return {"error": self.error, "message": redact(self.message), "hint": redact(self.hint)}

    def response(self, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
        """The answer; ``extra`` adds fields to the body (e.g. the ``session_id``)."""
        return JSONResponse({**self.body(), **extra}, status_code=self.status, headers=headers)

    def __repr__(self) -> str:
        return f"HTTPError({self.status}, {self.error!r}, {self.message!r}, {self.hint!r})"


def http_error(exc: LabkitError) -> HTTPError:
    """Domain error → HTTP error (note 2)."""
    if isinstance(exc, UpstreamError):
        hint = exc.hint or "Resend the message."
        return HTTPError(exc.status, exc.kind, exc.message, hint)
    for cls in type(exc).__mro__:
        if cls in STATUS:
            status, error, default_hint = STATUS[cls]  # type: ignore[index]
            return HTTPError(status, error, exc.message, exc.hint or default_hint)
    raise TypeError(f"not a LabkitError: {exc!r}")  # pragma: no cover - LabkitError is in STATUS


def from_validation(exc: RequestValidationError) -> HTTPError:
    """FastAPI's request validation error → 400 ``invalid_json`` or 422 ``invalid_request``."""
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            msg = f"The body is not valid JSON: {e.get('msg', '')}".rstrip(": ")
            return HTTPError(
                400, "invalid_json", msg, 'Send a JSON object such as {"message": "Hello"}.'
            )
    parts = []
    whole_body = not errors  # the body itself is wrong (not an object), not one field
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        whole_body = whole_body or not loc
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    msg = "; ".join(parts) or "The request is invalid."
    hint = (
        'Send a JSON object such as {"message": "Hello"}.'
        if whole_body
        else "Check the request against /docs."
    )
    return HTTPError(422, "invalid_request", msg, hint)


def from_http_exception(exc: StarletteHTTPException, settings: Any = None) -> HTTPError:
    """Starlette's own errors (unknown path 404, wrong method 405, ...) and the body
    bound's 413 (``settings``, when given, names the limits it follows from)."""
    if isinstance(exc, BodyTooLarge):
        hint = "Send a shorter message."
        if settings is not None:
            hint = (
                f"Send at most {settings.max_message_chars:,} characters of message and "
                f"{settings.max_system_prompt_chars:,} of system prompt (labkit serve "
                "--max-message-chars, --max-system-prompt-chars); the body bound follows from them."
            )
        return HTTPError(413, "request_too_large", str(exc.detail), hint)
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return HTTPError(exc.status_code, kind, str(exc.detail), "See /docs for the API.")


def unexpected(exc: BaseException, where: str) -> HTTPError:
    """Log an unexpected error as one line with a reference; the 500 that names only
    the reference (note 4)."""
    ref = reference()
    log.error("unexpected error %s %s", ref, where, exc_info=exc)
    return HTTPError(
        500,
        "internal_error",
        f"The server failed unexpectedly (reference {ref}).",
        f"{_RETRY} The log line names the reference {ref}.",
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into the one body (note 3)."""

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LabkitError)
    async def _labkit_error(request: Request, exc: LabkitError) -> JSONResponse:
        return http_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        settings = getattr(request.app.state, "settings", None)
        return from_http_exception(exc, settings).response(headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected(exc, f"on {request.method} {request.url.path}").response()
