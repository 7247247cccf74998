"""What the two wire formats share: the HTTP status of each error type.

Engines report failures as an error *type* (``engine.ERROR_TYPES``, the Anthropic
API's names); this module is where a type becomes an HTTP status. Both formats send
the same status for the same failure (OpenAI's SDK maps statuses to its exception
classes as Anthropic's does); their error *bodies* differ and live in
``anthropic_wire.error_body`` and ``openai_wire.error_body``.

Notes:

1. ``overloaded_error`` is 529, the Anthropic API's own status, on both formats: the
   OpenAI SDK treats any 5xx as a retryable ``InternalServerError``.
2. Statuses that invite a retry (429, 529) are sent with ``retry-after: 1``, as the
   real APIs send a ``retry-after`` with them; both SDKs' retry loops honour it.
3. Each response says which format it speaks (:func:`wire_format`): the OpenAI routes
   (``/v1/chat/...``, and any other ``/v1/...`` path, e.g. ``/v1/responses`` or
   ``/v1/embeddings``, unless the request carries Anthropic's ``anthropic-version``
   header) answer errors in OpenAI's shape and carry an ``x-request-id`` header; the
   Anthropic routes (``/v1/messages...``), labkit's own (``/v1/labkit/...``) and
   everything else answer in Anthropic's
   shape with a ``request-id`` header. Those are the headers the SDKs read into
   ``_request_id``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

__all__ = [
    "ERROR_STATUS",
    "error_headers",
    "error_status",
    "new_request_id",
    "request_id_header",
    "wire_format",
]

#: Anthropic error types and the HTTP status each is sent with.
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_RETRY_STATUSES = (429, 529)


def error_status(error_type: str) -> int:
    """The HTTP status of ``error_type`` (500 for a type this table does not know)."""
    return ERROR_STATUS.get(error_type, 500)


def error_headers(status: int) -> dict[str, str] | None:
    """Extra headers of an error response with ``status`` (note 2)."""
    return {"retry-after": "1"} if status in _RETRY_STATUSES else None


def wire_format(path: str, headers: Mapping[str, str]) -> str:
    """``"openai"`` or ``"anthropic"``: the format a request to ``path`` is answered in (note 3).

    ``headers`` maps lower-case header names to values.
    """
    if path.startswith(("/v1/messages", "/v1/complete", "/v1/labkit/")):
        return "anthropic"  # labkit's own routes keep the Anthropic shape they always had
    if path.startswith("/v1/chat/"):
        return "openai"
    if "anthropic-version" in headers:
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "anthropic"


def request_id_header(fmt: str) -> str:
    """The response header that carries the request id in format ``fmt`` (note 3)."""
    return "x-request-id" if fmt == "openai" else "request-id"


def new_request_id() -> str:
    """A fresh request id (``req_`` and 24 hex digits)."""
    return "req_" + secrets.token_hex(12)
