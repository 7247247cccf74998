"""The chat API's routes: HTTP in, :class:`~labkit.server.service.ChatService` calls, HTTP out.

- ``POST /chat/stream/{session_id}`` — one turn as SSE; ``session_id = "new"`` starts a
  session. Events (one JSON object per ``data:`` line, as the course's clients read
  them): ``{"session_id"}`` first, ``{"text"}`` deltas, then ``{"done": true, "usage":
  {"input", "output", "cached"}, "session_id", "context", "turn_count", "stored"}``; a failure
  is ``{"error": "<type>", "message", "hint"}`` followed by the done event.
- ``POST /chat/{session_id}`` — the same turn as JSON ``{session_id, reply, turn_count,
  usage, context}``; a failed turn answers with the error's status and body plus the
  ``session_id``.
- ``GET /sessions``, ``GET /sessions/{id}/history``, ``GET /sessions/{id}/stats``,
  ``DELETE /sessions/{id}``, ``GET /health``, and ``GET /`` (the chat page).

A route only parses, calls one service method and shapes the answer; the rules of a turn
live in :mod:`labkit.server.service`, the error bodies in :mod:`labkit.server.errors`, the
SSE framing in :mod:`labkit.server.sse`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse

from .headers import page_csp
from .models import ERROR_RESPONSES, ChatReply, ChatRequest, Usage
from .service import ChatService
from .sse import encode_event, event_response

__all__ = ["router", "service_of"]


async def service_of(request: Request) -> ChatService:
    """The app's :class:`ChatService` (set by :func:`labkit.server.create_app`).

    A coroutine on purpose: FastAPI runs a plain ``def`` dependency in its thread pool,
    a thread hand-off per request that cost more than the rest of the route under load."""
    return request.app.state.service


Service = Annotated[ChatService, Depends(service_of)]

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    """The chat page, with a content security policy that allows only its own script."""
    html = resources.files("labkit.server").joinpath("static/index.html").read_text("utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": page_csp(html)})


@router.get("/health", include_in_schema=False)
async def health(request: Request, service: Service) -> dict[str, Any]:
    """Open to all; the model API and store are named only to requests with the key."""
    if not request.scope.get("labkit.authorized", True):
        return {"ok": True}
    return {"ok": True, "worker_pid": os.getpid(), **service.describe()}


@router.post(
    "/chat/stream/{session_id}",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "SSE stream of JSON events."},
        **ERROR_RESPONSES,
    },
    summary="One turn, streamed as SSE",
)
async def chat_stream(session_id: str, body: ChatRequest, service: Service) -> Any:
    """Stream a reply. ``session_id="new"`` starts a session (id in the
    ``X-Session-Id`` header and the first event)."""
    turn = await service.prepare(session_id, body)

    async def events() -> AsyncIterator[bytes]:
        async for ev in service.run(turn):
            yield encode_event(ev)

    return event_response(
        events(),
        headers={"X-Session-Id": turn.session_id},
        ping_seconds=service.settings.ping_seconds,
        on_close=lambda: service.finish(turn),
    )


@router.post(
    "/chat/{session_id}",
    response_model=ChatReply,
    responses=ERROR_RESPONSES,
    summary="One turn, JSON",
)
async def chat(session_id: str, body: ChatRequest, service: Service) -> Any:
    """The same turn without streaming."""
    turn = await service.complete(await service.prepare(session_id, body))
    headers = {"X-Session-Id": turn.session_id}
    if turn.error is not None:
        return turn.error.response(headers=headers, session_id=turn.session_id)
    assert turn.reply is not None and turn.done is not None
    reply = ChatReply(
        session_id=turn.session_id,
        reply=turn.reply,
        turn_count=turn.done["turn_count"],
        usage=Usage(**turn.done["usage"]),
        context=turn.done["context"],
    )
    return JSONResponse(reply.model_dump(), headers=headers)


@router.get("/sessions", summary="List sessions")
async def list_sessions(service: Service) -> dict[str, Any]:
    return {"sessions": await service.list_sessions()}


@router.get(
    "/sessions/{session_id}/history", responses=ERROR_RESPONSES, summary="A session's history"
)
async def history(session_id: str, service: Service) -> dict[str, Any]:
    return await service.history(session_id)


@router.get("/sessions/{session_id}/stats", responses=ERROR_RESPONSES, summary="A session's stats")
async def stats(session_id: str, service: Service) -> dict[str, Any]:
    """Turn count, tokens, age, and the context strategy of the last turn."""
    return await service.stats(session_id)


@router.delete("/sessions/{session_id}", responses=ERROR_RESPONSES, summary="Delete a session")
async def delete(session_id: str, service: Service) -> dict[str, Any]:
    return {"session_id": session_id, "deleted": await service.delete(session_id)}
