"""The chat API's request and response bodies (pydantic models, also its OpenAPI schema).

What the SSE stream sends is not modelled here: its events are plain JSON objects,
described in :mod:`labkit.server.routes` and produced by
:meth:`labkit.server.service.ChatService.run`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ERROR_RESPONSES",
    "ChatReply",
    "ChatRequest",
    "ErrorBody",
    "Usage",
]


class ChatRequest(BaseModel):
    """Body of ``POST /chat/stream/{session_id}`` and ``POST /chat/{session_id}``."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(description="The user's message (non-empty; at most max_message_chars).")
    system_prompt: str | None = Field(
        default=None, description="System prompt; taken when the session is created only."
    )


class Usage(BaseModel):
    #: Prompt tokens the upstream read, cached or not (grows with the history sent).
    input: int = 0
    #: Output tokens reported by the upstream.
    output: int = 0
    #: Of ``input``, tokens served from the upstream's prompt cache.
    cached: int = 0
    #: ``server_usage``, or ``tiktoken_estimate`` when the upstream sent no usage (some
    #: OpenAI-compatible servers ignore ``stream_options.include_usage``): input and
    #: output are then labkit's estimate, never zeros that look measured.
    source: str = "server_usage"


class ChatReply(BaseModel):
    """Answer of ``POST /chat/{session_id}``."""

    session_id: str
    reply: str
    turn_count: int
    usage: Usage
    context: dict[str, Any]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer (built by :class:`labkit.server.errors.HTTPError`)."""

    error: str = Field(description="Machine-readable error type, e.g. session_not_found.")
    message: str = Field(description="What is wrong.")
    hint: str = Field(default="", description="What to do instead.")


#: The error answers a route may give, for its OpenAPI ``responses``.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 413, 422, 429, 502, 503, 504)
}
