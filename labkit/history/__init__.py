"""Conversation state: the messages array, what each request carries, and the manager.

LLMs are stateless: the model sees only what one request carries. A conversation is
a messages array the client keeps and re-sends, and a *strategy* decides how much of
it goes into each request.

- :mod:`~labkit.history.strategies`: :class:`FullHistory`, :class:`NoHistory`,
  :class:`SlidingWindow`, :class:`KeepLastTurns` (the milestone project's rule) and
  the :class:`Selection` they return.
- :mod:`~labkit.history.summarise`: :class:`Summarise` and :func:`model_summariser`.
- :mod:`~labkit.history.course`: the course's own ``count_tokens`` and
  ``sliding_window``, verbatim, for comparison.
- :mod:`~labkit.history.manager`: :class:`ConversationManager`, :class:`Turn` and
  :class:`TurnUsage`; clients are passed in (:mod:`~labkit.history.clients`), never built.

Everything is importable from ``labkit.history`` directly.
"""

from __future__ import annotations

from .course import course_count_tokens, course_sliding_window
from .manager import ConversationManager, Turn, TurnUsage
from .strategies import (
    FullHistory,
    KeepLastTurns,
    NoHistory,
    Selection,
    SlidingWindow,
    Strategy,
)
from .summarise import (
    SUMMARY_ACK,
    SUMMARY_MARKER,
    SUMMARY_PROMPT,
    Summarise,
    Summariser,
    model_summariser,
)

__all__ = [
    "SUMMARY_ACK",
    "SUMMARY_MARKER",
    "SUMMARY_PROMPT",
    "ConversationManager",
    "FullHistory",
    "KeepLastTurns",
    "NoHistory",
    "Selection",
    "SlidingWindow",
    "Strategy",
    "Summarise",
    "Summariser",
    "Turn",
    "TurnUsage",
    "course_count_tokens",
    "course_sliding_window",
    "model_summariser",
]
