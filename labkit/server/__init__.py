"""The milestone chat API (``labkit serve``): streaming chat with persistent sessions.

Modules, from the edge inwards:

- ``app`` — ``create_app(settings)``: assembles the FastAPI app (lifespan, handlers, routes,
  and what sees every request first: ``headers``, ``auth``, ``limits``).
- ``auth`` — the server key (Bearer), where a server may listen without one, the Host check.
- ``limits`` — the body bound (from the text limits) and the head bound.
- ``headers`` — nosniff and the chat page's content security policy.
- ``redact`` — secrets out of error bodies and logs; no tracebacks below debug.
- ``routes`` — the HTTP routes; each calls one ``ChatService`` method.
- ``sse`` — how an event becomes SSE bytes, and the streaming response.
- ``errors`` — the one error body, and domain errors → HTTP statuses.
- ``service`` — ``ChatService``: the turn logic (validate, lock, select context, stream,
  store whole turns) and the session queries.
- ``model_api`` — the pooled SDK client the server relays to (through ``labkit.upstream``).
- ``models`` / ``settings`` — request and response bodies; what ``labkit serve`` can be told.
- ``runner`` — ``serve`` (this process) and ``ChatServer`` (a child process);
  ``client`` — ``ChatClient``, a small consumer for tests and notebook 04.
"""

from __future__ import annotations

from .app import create_app
from .errors import HTTPError
from .models import ChatReply, ChatRequest, ErrorBody, Usage
from .runner import ChatServer, serve
from .service import ChatService
from .settings import Settings

__all__ = [
    "ChatReply",
    "ChatRequest",
    "ChatServer",
    "ChatService",
    "ErrorBody",
    "HTTPError",
    "Settings",
    "Usage",
    "create_app",
    "serve",
]
