"""``create_app(settings)``: the chat API as a FastAPI app (OpenAPI docs at ``/docs``).

This module only assembles the app: the :class:`~labkit.server.service.ChatService`
started and stopped with the app's lifespan, the error handlers of
:mod:`labkit.server.errors`, and the routes of :mod:`labkit.server.routes`. Anything
that must see every request before the routes do (request size limits, authentication)
is added here, in one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from . import errors
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
    return app
