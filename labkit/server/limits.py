"""Request limits of the chat API: the body bound and the head bound, with the chat
API's numbers and error body.

The machinery is :mod:`labkit.localapi.limits` (a pure ASGI middleware around
``receive``, and a uvicorn protocol that counts a request's head); this module gives
it :class:`~labkit.server.settings.Settings`' numbers.

Notes:

1. **Body.** :attr:`Settings.max_body_bytes <labkit.server.settings.Settings.max_body_bytes>`
   (580,096 bytes with the default text limits; its derivation is note 1 of
   :mod:`labkit.server.settings`). A ``Content-Length`` over it is refused at the
   route's first read, before one byte of the body is read; a chunked body is refused
   the moment it passes it. The answer is 413 ``request_too_large`` in the usual body,
   with ``Connection: close`` so the server reads no more of it.
2. **Head.** The request line and headers together: at most ``max_header_bytes``
   (16 KiB, the default of h11 and Node.js); more gets 431 ``headers_too_large``, and
   the connection is closed.
3. **Text.** The message (``--max-message-chars``) and the system prompt
   (``--max-system-prompt-chars``) are checked in characters after parsing
   (:meth:`labkit.server.service.ChatService.check_message`): 413
   ``message_too_long`` / ``system_prompt_too_long``.
"""

from __future__ import annotations

import json
from typing import Any

from ..localapi.limits import BodyLimit, uvicorn_http
from .errors import HTTPError
from .settings import Settings

__all__ = ["body_limit", "uvicorn_options"]


def body_limit(app: Any, settings: Settings) -> BodyLimit:
    """``app`` reading at most ``settings.max_body_bytes`` of a request body (note 1)."""
    return BodyLimit(app, settings.max_body_bytes)


def _head_refusal(limit: int) -> bytes:
    error = HTTPError(
        431,
        "headers_too_large",
        f"The request line and headers are over {limit:,} bytes, the most this server reads.",
        "Send shorter headers (a browser sends every cookie set for this host).",
    )
    return json.dumps(error.body()).encode()


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """``uvicorn.Config`` keywords that bound a request's head (note 2)."""
    return uvicorn_http(settings.max_header_bytes, _head_refusal)
