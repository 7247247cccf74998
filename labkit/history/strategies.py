"""Context strategies: what part of the conversation each request carries.

A strategy is a small object with a ``name`` and one method,
``select(messages, system="") -> Selection``: :class:`FullHistory`,
:class:`NoHistory` (a baseline), :class:`SlidingWindow` and :class:`KeepLastTurns`
(the milestone project's rule) live here; :class:`~labkit.history.summarise.Summarise`
in :mod:`labkit.history.summarise`. They never change the history they are given.

Notes:

1. Token counts are tiktoken *estimates* (see :mod:`labkit.tokens`, note 3); the
   budget of a strategy covers everything the estimate counts: system prompt,
   every sent message with its overhead, and the reply priming.
2. Sliding-window selection is O(new messages) per call, not O(history): a
   strategy keeps running prefix sums of the cached per-message counts, extends
   them with the messages it has not seen, and finds the window start with a
   binary search over the user-message boundaries. It recognises "the same
   conversation, grown" by comparing the first and the last message it indexed
   (role and content); any other change rebuilds the index from the cached counts.
   It trusts that messages in the middle are not edited in place.
3. The window always starts on a user message and keeps the newest user message
   (with anything after it, e.g. an assistant prefill) and the system prompt. If
   those alone exceed the budget, :class:`~labkit.errors.ContextBudgetError` is
   raised: the question is never dropped silently. ``min_turns`` wins over the
   budget, as in the course, so ``Selection.tokens`` may exceed it then.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ContextBudgetError, InvalidMessageError
from ..tokens import REPLY_PRIMING, TokenCounter, shared_counter

__all__ = [
    "FullHistory",
    "KeepLastTurns",
    "NoHistory",
    "Selection",
    "SlidingWindow",
    "Strategy",
]

Message = dict[str, Any]


@dataclass
class Selection:
    """What a strategy chose to send for one request."""

    #: The messages to send, in chronological order, starting on a user message.
    messages: list[Message]
    #: User-started turns of the history left out (dropped, or folded into a summary).
    dropped_turns: int
    #: Estimated tokens of the request: system + messages (+4 each) + priming.
    tokens: int
    #: True when the strategy changed anything (dropped or summarised turns).
    applied: bool
    #: The name of the strategy that made this selection.
    strategy: str = ""
    #: Messages of the history left out (orphan assistant messages included).
    dropped_messages: int = 0


class Strategy:
    """Base class: ``select(messages, system)`` returns a :class:`Selection`."""

    name: str = "strategy"
    #: True when ``select`` may do I/O (a summariser call); async code runs it in a thread.
    blocking: bool = False

    def select(self, messages: list[Message], system: str = "") -> Selection:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class _Index:
    """Running prefix sums of per-message token counts for one growing conversation."""

    __slots__ = ("contents", "counter", "prefix", "roles", "user_at", "user_prefix")

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self.reset()

    def reset(self) -> None:
        self.contents: list[Any] = []
        self.roles: list[Any] = []
        self.prefix: list[int] = [0]
        self.user_at: list[int] = []
        self.user_prefix: list[int] = []

    def _same(self, i: int, m: Mapping[str, Any]) -> bool:
        return m.get("role") == self.roles[i] and m.get("content") == self.contents[i]

    def _truncate(self, n: int) -> None:
        del self.contents[n:], self.roles[n:], self.prefix[n + 1 :]
        while self.user_at and self.user_at[-1] >= n:
            self.user_at.pop()
            self.user_prefix.pop()

    def sync(self, messages: list[Message]) -> None:
        known = len(self.contents)
        if known:
            if not messages or not self._same(0, messages[0]):
                self.reset()
            else:
                # The usual case: the same conversation, grown. A failed turn may have
                # left a different newest message; look back a few messages for it.
                k = min(known, len(messages))
                for j in range(k - 1, max(k - 5, 0) - 1, -1):
                    if self._same(j, messages[j]):
                        self._truncate(j + 1)
                        break
                else:
                    self.reset()
        prefix, message_tokens = self.prefix, self.counter.message
        for i in range(len(self.contents), len(messages)):
            m = messages[i]
            role = m.get("role")
            self.contents.append(m.get("content"))
            self.roles.append(role)
            if role == "user":
                self.user_at.append(i)
                self.user_prefix.append(prefix[-1])
            prefix.append(prefix[-1] + message_tokens(m))


class _Indexed(Strategy):
    """Shared machinery of the budgeted strategies."""

    def __init__(self, counter: TokenCounter | None) -> None:
        self.counter = counter if counter is not None else shared_counter()
        self._index = _Index(self.counter)

    def _prepare(self, messages: list[Message], system: str) -> tuple[_Index, int, int]:
        """Sync the index; return it, the fixed cost (system + priming) and the tail start."""
        idx = self._index
        idx.sync(messages)
        if messages and not idx.user_at:
            raise InvalidMessageError(
                "The conversation has no user message to answer.",
                hint="End the messages with the user's question.",
            )
        fixed = self.counter.system(system) + REPLY_PRIMING
        return idx, fixed, (idx.user_at[-1] if idx.user_at else 0)

    def _check_tail(self, idx: _Index, fixed: int, tail: int, budget: int) -> None:
        need = fixed + idx.prefix[-1] - idx.prefix[tail]
        if need > budget:
            raise ContextBudgetError(
                f"The newest user message and the system prompt alone are about {need:,} "
                f"tokens, over this strategy's budget of {budget:,}."
            )

    def _from(self, messages: list[Message], idx: _Index, fixed: int, turn: int) -> Selection:
        """Select from the start of user turn number ``turn`` (0-based) to the end."""
        start = idx.user_at[turn] if idx.user_at else 0
        return Selection(
            messages=messages[start:],
            dropped_turns=turn,
            tokens=fixed + idx.prefix[-1] - idx.prefix[start],
            applied=start > 0,
            strategy=self.name,
            dropped_messages=start,
        )


class FullHistory(_Indexed):
    """Send everything, every time (the course's ``ConversationManager``)."""

    name = "full history"

    def __init__(self, *, counter: TokenCounter | None = None) -> None:
        super().__init__(counter)

    def select(self, messages: list[Message], system: str = "") -> Selection:
        idx = self._index
        idx.sync(messages)
        tokens = self.counter.system(system) + REPLY_PRIMING + idx.prefix[-1]
        return Selection(list(messages), 0, tokens, False, self.name)


class NoHistory(_Indexed):
    """Send only the newest user message: what a stateless call sees (a baseline)."""

    name = "no history"

    def __init__(self, *, counter: TokenCounter | None = None) -> None:
        super().__init__(counter)

    def select(self, messages: list[Message], system: str = "") -> Selection:
        idx, fixed, _tail = self._prepare(messages, system)
        return self._from(messages, idx, fixed, max(len(idx.user_at) - 1, 0))


class SlidingWindow(_Indexed):
    """As many of the most recent turns as fit in ``max_tokens``, oldest first.

    Keeps user/assistant pairs together, starts on a user message, always keeps the
    newest user message and at least ``min_turns`` complete turns before it (when
    the history has them). See notes 2 and 3 of this module.
    """

    def __init__(
        self, max_tokens: int, min_turns: int = 1, *, counter: TokenCounter | None = None
    ) -> None:
        if max_tokens <= 0 or min_turns < 0:
            raise ValueError("max_tokens must be positive and min_turns non-negative")
        super().__init__(counter)
        self.max_tokens = max_tokens
        self.min_turns = min_turns
        self.name = f"sliding window {max_tokens:,}"

    def __repr__(self) -> str:
        return f"SlidingWindow(max_tokens={self.max_tokens}, min_turns={self.min_turns})"

    def select(self, messages: list[Message], system: str = "") -> Selection:
        idx, fixed, tail = self._prepare(messages, system)
        if not messages:
            return Selection([], 0, fixed, False, self.name)
        self._check_tail(idx, fixed, tail, self.max_tokens)
        last = len(idx.user_at) - 1
        # Earliest turn whose start keeps the total within budget (prefix sums grow).
        turn = bisect_left(idx.user_prefix, idx.prefix[-1] + fixed - self.max_tokens, 0, last)
        turn = min(turn, max(last - self.min_turns, 0))
        return self._from(messages, idx, fixed, turn)


class KeepLastTurns(_Indexed):
    """The milestone project's rule: over ``budget_tokens``, send only the last turns.

    If the whole conversation fits in the budget it is sent unchanged; otherwise the
    last ``keep_turns`` complete turns and the newest user message are sent (even
    if that is still over the budget — the rule is a turn count, not a window).
    """

    def __init__(
        self,
        budget_tokens: int = 50_000,
        keep_turns: int = 10,
        *,
        counter: TokenCounter | None = None,
    ) -> None:
        if budget_tokens <= 0 or keep_turns < 0:
            raise ValueError("budget_tokens must be positive and keep_turns non-negative")
        super().__init__(counter)
        self.budget_tokens = budget_tokens
        self.keep_turns = keep_turns
        self.name = f"last {keep_turns} turns over {budget_tokens:,}"

    def __repr__(self) -> str:
        return f"KeepLastTurns(budget_tokens={self.budget_tokens}, keep_turns={self.keep_turns})"

    def select(self, messages: list[Message], system: str = "") -> Selection:
        idx, fixed, tail = self._prepare(messages, system)
        if not messages:
            return Selection([], 0, fixed, False, self.name)
        self._check_tail(idx, fixed, tail, self.budget_tokens)
        if fixed + idx.prefix[-1] <= self.budget_tokens:
            return Selection(list(messages), 0, fixed + idx.prefix[-1], False, self.name)
        last = len(idx.user_at) - 1
        return self._from(messages, idx, fixed, max(last - self.keep_turns, 0))
