"""Request limits: how big a request may be before it is refused, and the pieces that
refuse it (an ASGI middleware for bodies, a uvicorn protocol for headers).

The local API uses all of it; the chat API (:mod:`labkit.server.limits`) reuses the
middleware and the protocol with its own numbers and error body.

Notes:

1. **Body bound of the local API, from the context window.** A request that can be
   served fits in ``CONTEXT_WINDOW`` (8,192) tokens. A token is at most
   ``MAX_TOKEN_BYTES`` (128) bytes of UTF-8 text: the longest token of either
   tokenizer the engines count with (cl100k_base, which the sim engine counts with:
   128 spaces; SmolLM2's own vocabulary: 32 bytes). JSON may escape any character as
   ``\\uXXXX``, at most 6 bytes per byte of UTF-8 (a one-byte character becomes 6
   bytes; a four-byte one 12, a ratio of 3). Every message costs at least 5 tokens of
   ChatML framing (note 3), which covers its JSON structure (role, keys, content
   blocks) many times over; the request's other fields (model, max_tokens,
   stop_sequences, metadata, ...) get a fixed ``FIXED_OVERHEAD_BYTES`` (64 KiB). So
   ``MAX_BODY_BYTES = 8,192 × 128 × 6 + 65,536 = 6,356,992`` bytes (6.1 MiB): no
   request that fits the window is larger, and a larger one is refused with 413
   before it is read. The bounds follow the engine's window (the sim engine's is a
   server option): :func:`max_body_bytes`, :func:`max_messages`, :func:`max_prompt_chars`;
   the constants are their values for SmolLM2's 8,192 tokens.
2. **How a body is refused.** :class:`BodyLimit` is a pure ASGI middleware around
   ``receive``: when the declared ``Content-Length`` is over the bound, the app's first
   ``receive()`` raises :class:`BodyTooLarge` before one byte of the body is read; a
   chunked body is counted as it arrives and refused the moment it passes the bound,
   so at most the bound is ever held in memory. ``BodyTooLarge`` is Starlette's
   ``HTTPException`` (413), so each app answers it with its own error body through its
   own handler (FastAPI re-raises an ``HTTPException`` met while reading the body),
   and the middleware adds ``Connection: close``: the server stops reading the rest.
3. **Messages.** ChatML frames a message as ``<|im_start|>``, the role, a newline, the
   text, ``<|im_end|>`` and a newline: at least 5 tokens even when the text is empty
   (measured: 5 with SmolLM2's tokenizer, 14 with cl100k_base). So no request with more
   than ``CONTEXT_WINDOW // 5`` = 1,638 messages fits the window, and
   :func:`check_request` refuses it (400) before the messages are rendered and counted.
4. **max_tokens** is bounded by the window already: a request whose prompt plus
   ``max_tokens`` exceeds it is refused with 400 naming both numbers (the app's
   context check, as the real APIs do).
5. **Headers.** uvicorn's httptools parser accumulates a header line without any limit
   (a 100 MB header line grew a server by 195 MB over 65 s). :func:`uvicorn_http`
   gives uvicorn a protocol that counts the bytes of a request's head (request line
   and headers) and answers 431 once they pass ``MAX_HEADER_BYTES`` (16 KiB, the
   default of h11 and of Node.js), closing the connection. With h11 instead of
   httptools, h11's own ``max_incomplete_event_size`` is set to the same bound.
6. **Text before tokens.** Tokenizing is the costly part of refusing a long prompt
   (SmolLM2's tokenizer takes ~10 s for a million spaces, and blocks the server
   meanwhile). A token is at most ``MAX_TOKEN_BYTES`` bytes and a character at least
   one, so a prompt of more than ``CONTEXT_WINDOW × MAX_TOKEN_BYTES`` = 1,048,576
   characters cannot fit: :func:`check_request` counts the characters of the system
   prompt and the messages' text and refuses such a request (400) without tokenizing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from starlette.exceptions import HTTPException

from .constants import CONTEXT_WINDOW

__all__ = [
    "FIXED_OVERHEAD_BYTES",
    "JSON_ESCAPE_FACTOR",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGES",
    "MAX_PROMPT_CHARS",
    "MAX_TOKEN_BYTES",
    "MIN_TOKENS_PER_MESSAGE",
    "BodyLimit",
    "BodyTooLarge",
    "check_request",
    "header_refusal",
    "max_body_bytes",
    "max_messages",
    "max_prompt_chars",
    "uvicorn_http",
]

log = logging.getLogger("uvicorn.error")

#: Longest token, in bytes of UTF-8, of the tokenizers the engines count with (note 1).
MAX_TOKEN_BYTES = 128
#: Most JSON bytes one byte of UTF-8 text can take (``\\u0020`` for a space; note 1).
JSON_ESCAPE_FACTOR = 6
#: Room for the fields of a request that are not prompt text (note 1).
FIXED_OVERHEAD_BYTES = 64 * 1024
#: Least tokens a message costs in the ChatML prompt (note 3).
MIN_TOKENS_PER_MESSAGE = 5


def max_body_bytes(window: int = CONTEXT_WINDOW) -> int:
    """Largest request body a model with a ``window``-token context can need (note 1)."""
    return window * MAX_TOKEN_BYTES * JSON_ESCAPE_FACTOR + FIXED_OVERHEAD_BYTES


def max_messages(window: int = CONTEXT_WINDOW) -> int:
    """Most messages that fit in a ``window``-token context (note 3)."""
    return window // MIN_TOKENS_PER_MESSAGE


def max_prompt_chars(window: int = CONTEXT_WINDOW) -> int:
    """Most characters of text that can fit in a ``window``-token context (note 6)."""
    return window * MAX_TOKEN_BYTES


#: Largest request body the local API reads, for the model's window (note 1).
MAX_BODY_BYTES = max_body_bytes()
#: Most messages a request may carry, for the model's window (note 3).
MAX_MESSAGES = max_messages()
#: Most characters of prompt text that fit in the model's window (note 6).
MAX_PROMPT_CHARS = max_prompt_chars()
#: Largest request head (request line and headers), in bytes (note 5).
MAX_HEADER_BYTES = 16 * 1024


class BodyTooLarge(HTTPException):
    """413: the request body is over ``limit`` bytes (``declared``: its Content-Length, if given)."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        size = f"declares {declared:,} bytes" if declared is not None else "is longer"
        super().__init__(
            413,
            f"The request body {size}; this server reads at most {limit:,} bytes.",
            headers={"Connection": "close"},
        )
        self.limit = limit
        self.declared = declared


def _declared_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the HTTP parser refuses it before the app sees it
    return None


class BodyLimit:
    """Pure ASGI middleware: the app reads at most ``max_bytes`` of a request body (note 2)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _declared_length(scope)
        received = 0
        # Over the bound from the headers: whatever the app answers, the connection
        # closes after it (the rest of the body is never read).
        refused = declared is not None and declared > limit

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, refused
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit, declared)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    raise BodyTooLarge(limit)
            return message

        async def closing_send(message: dict[str, Any]) -> None:
            if refused and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited_receive, closing_send)


def _text_chars(value: Any, depth: int = 0) -> int:
    """Characters of prompt text in a ``content``/``system`` value (string or blocks)."""
    if isinstance(value, str):
        return len(value)
    if depth > 2:
        return 0
    if isinstance(value, list):
        return sum(_text_chars(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return _text_chars(value.get("text"), depth + 1) + _text_chars(
            value.get("content"), depth + 1
        )
    return 0


def check_request(body: Any, window: int = CONTEXT_WINDOW) -> None:
    """Refuse, before any tokenizing, a request that cannot fit a ``window``-token
    context: more messages than it holds (note 3), or more characters of text than its
    tokens can carry (note 6).

    Raises the local API's :class:`~.engine.EngineError` (400 ``invalid_request_error``).
    """
    from .engine import EngineError

    if not isinstance(body, dict):
        return
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    most = max_messages(window)
    if len(messages) > most:
        raise EngineError(
            "invalid_request_error",
            f"messages: {len(messages):,} messages; at most {most:,} fit in the "
            f"{window:,}-token context window (each costs at least "
            f"{MIN_TOKENS_PER_MESSAGE} tokens). Send fewer, longer messages.",
        )
    chars = _text_chars(body.get("system")) + sum(
        _text_chars(m.get("content")) for m in messages if isinstance(m, dict)
    )
    if chars > max_prompt_chars(window):
        raise EngineError(
            "invalid_request_error",
            f"prompt is too long: {chars:,} characters of text; at most "
            f"{max_prompt_chars(window):,} can fit in the {window:,}-token context window. "
            "Shorten the messages.",
            code="context_length_exceeded",
        )


def header_refusal(limit: int) -> bytes:
    """The local API's 431 body (the Anthropic error shape, which the OpenAI SDK reads too)."""
    import json

    from .anthropic_wire import error_body

    message = (
        f"The request line and headers are over {limit:,} bytes, the most this server reads. "
        "Send shorter headers."
    )
    return json.dumps(error_body("invalid_request_error", message)).encode()


def _refusal(status_line: bytes, body: bytes) -> bytes:
    return (
        status_line
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\nconnection: close\r\n\r\n"
        + body
    )


def uvicorn_http(max_header_bytes: int, body: Callable[[int], bytes]) -> dict[str, Any]:
    """``uvicorn.Config`` keywords that cap the request head at ``max_header_bytes``
    (note 5); ``body(limit)`` is the JSON of the 431 answer."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        return {"http": "h11", "h11_max_incomplete_event_size": max_header_bytes}

    answer = _refusal(b"HTTP/1.1 431 Request Header Fields Too Large", body(max_header_bytes))

    class HeadLimitProtocol(HttpToolsProtocol):
        """httptools with a bound on the bytes of a request's head."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._head_bytes = 0
            self._in_head = True

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if (
                self._in_head
                and self._head_bytes > max_header_bytes
                and not self.transport.is_closing()
            ):
                log.warning(
                    "Refused a request head over %d bytes from %s (431).",
                    max_header_bytes,
                    "{}:{}".format(*self.client) if self.client else "?",
                )
                self.transport.write(answer)
                self.transport.close()

    return {"http": HeadLimitProtocol}
