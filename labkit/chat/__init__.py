"""``labkit chat`` and ``labkit sessions``: the terminal side of stored conversations.

- :mod:`labkit.chat.session`: :class:`ChatSession`, a conversation manager bound to one
  stored session (loads its turns, saves each complete turn, keeps the summary).
- :mod:`labkit.chat.terminal`: :func:`run_chat`, the interactive loop of ``labkit chat``.
- :mod:`labkit.chat.sessions_cli`: what ``labkit sessions list|show|delete`` print.

This package sits at the edge: it may import the store, the history classes, the
providers and Rich; nothing below it imports it.
"""

from __future__ import annotations

from .session import KEEP_RECENT_TURNS, SUMMARISE_AFTER_TURNS, ChatSession
from .sessions_cli import delete_session, format_age, print_session, print_session_list
from .terminal import run_chat

__all__ = [
    "KEEP_RECENT_TURNS",
    "SUMMARISE_AFTER_TURNS",
    "ChatSession",
    "delete_session",
    "format_age",
    "print_session",
    "print_session_list",
    "run_chat",
]
