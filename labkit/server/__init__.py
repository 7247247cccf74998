"""The milestone chat API: ``create_app(settings)``, ``serve``, ``ChatServer``."""

from __future__ import annotations

from .app import ChatReply, ChatRequest, Settings, create_app
from .runner import ChatServer, serve

__all__ = ["ChatReply", "ChatRequest", "ChatServer", "Settings", "create_app", "serve"]
