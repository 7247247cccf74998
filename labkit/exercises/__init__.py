"""Exercises: checkers of a learner's code against ground truth.

Each checker takes the learner's code, runs it against something whose truth is
known — the local API's sim engine (latency drawn at random, faults on demand, a
record of what it received), a temporary SQLite file, the learner's own server
process — and returns a :class:`CheckResult` with ``passed`` and ``feedback``
(what was measured against the truth, what is wrong, a hint toward the fix).

=========================  =====  ==============================================
checker                    lab    the learner writes
=========================  =====  ==============================================
:func:`check_ttft`         1      ``fn(client, model, messages, max_tokens)`` → TTFT ms
:func:`check_total_time`   1      the same for a non-streaming request → total ms
:func:`check_conversation` 2      ``manager_factory(client, model)`` → a ConversationManager
:func:`check_sliding_window` 2    ``fn(messages, max_tokens, min_turns)`` → the window
:func:`check_session_store` 3     ``save_turn``, ``load_history``, ``list_sessions`` (db path first)
:func:`check_chat_api`     4      the milestone server (a start command or a base URL)
=========================  =====  ==============================================

Unfinished code (``NotImplementedError``, ``...``, ``None``) gives a result that says
"not done yet" with guidance; a checker never raises because of the learner's code.
"""

from __future__ import annotations

from .chat_api import check_chat_api
from .context import check_sliding_window
from .conversation import check_conversation
from .result import CheckResult, Finding
from .store import check_session_store
from .timing import check_total_time, check_ttft

__all__ = [
    "CheckResult",
    "Finding",
    "check_chat_api",
    "check_conversation",
    "check_session_store",
    "check_sliding_window",
    "check_total_time",
    "check_ttft",
]
