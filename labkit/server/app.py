"""``create_app(settings)``: the chat API as a FastAPI app (OpenAPI docs at ``/docs``).

This module only assembles the app: the :class:`~labkit.server.service.ChatService`
started and stopped with the app's lifespan, the error handlers of
:mod:`labkit.server.errors`, and the routes of :mod:`labkit.server.routes`. Anything
that must see every request before the routes do is added here, in one place, from the
outside in: security headers (:mod:`labkit.server.headers`), the key or the Host check
(:mod:`labkit.server.auth`), the body bound (:mod:`labkit.server.limits`). A refused
request never reaches a route; each refusal answers with the usual error body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..localapi.limits import BodyLimit
from . import errors
from .auth import KeyAuth
from .headers import SecurityHeaders
from .redact import add_secret, secrets_from_environment
from .routes import router
from .service import ChatService
from .settings import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None) -> FastAPI:
    """The chat API (see :mod:`labkit.server.routes` for what it answers)."""
    settings = settings or Settings()
    service = ChatService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="labkit chat API",
        description="Streaming chat with persistent sessions (the course's milestone).",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    errors.install(app)
    app.include_router(router)
    add_secret(settings.server_key)
    for secret in secrets_from_environment():
        add_secret(secret)
    # Added innermost first: a request meets SecurityHeaders, then KeyAuth, then BodyLimit.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        KeyAuth, key=settings.server_key, loopback_hosts_only=settings.loopback_hosts_only
    )
    app.add_middleware(SecurityHeaders)
    return app
