"""Conversation state: :class:`Turn`, :class:`ConversationManager` and context strategies.

LLMs are stateless: the model sees only what one request carries. A conversation
is a messages array the client keeps and re-sends, and a *strategy* decides how
much of it goes into each request.

Strategies are small objects with a ``name`` and one method,
``select(messages, system="") -> Selection``: :class:`FullHistory`,
:class:`SlidingWindow`, :class:`KeepLastTurns` (the milestone project's rule) and
:class:`Summarise`. They never change the history they are given.

Notes:

1. **A turn is atomic.** :class:`ConversationManager` commits the user message to
   ``history`` only together with the assistant's reply, once the SDK's final
   message has arrived. If the request or the stream fails — or the caller stops
   iterating :meth:`ConversationManager.chat_stream` early — ``history`` is left as
   it was and the error propagates (SDK errors as
   :class:`~labkit.errors.UpstreamError`, the SDK's exception on ``__cause__``).
   There is never a dangling user message, so the next request still alternates
   roles. Text already yielded by a failed stream was shown but is not kept.
2. The assistant turn is the SDK's own final message (``get_final_message()`` for
   Anthropic, ``get_final_completion()`` for OpenAI), never joined from chunks.
3. Token counts are tiktoken *estimates* (see :mod:`labkit.tokens`, note 3); the
   budget of a strategy covers everything the estimate counts: system prompt,
   every sent message with its overhead, and the reply priming.
4. Sliding-window selection is O(new messages) per call, not O(history): a
   strategy keeps running prefix sums of the cached per-message counts, extends
   them with the messages it has not seen, and finds the window start with a
   binary search over the user-message boundaries. It recognises "the same
   conversation, grown" by comparing the first and the last message it indexed
   (role and content); any other change rebuilds the index from the cached counts.
   It trusts that messages in the middle are not edited in place.
5. The window always starts on a user message and keeps the newest user message
   (with anything after it, e.g. an assistant prefill) and the system prompt. If
   those alone exceed the budget, :class:`~labkit.errors.ContextBudgetError` is
   raised: the question is never dropped silently. ``min_turns`` wins over the
   budget, as in the course, so ``Selection.tokens`` may exceed it then.
6. The course's own ``sliding_window`` is kept verbatim as
   :func:`course_sliding_window` for comparison: it returns the kept pairs
   newest-first (``[u3, a3, u2, a2, u1, a1, u4]``), so the model reads the
   conversation backwards. labkit's keeps chronological order.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import ContextBudgetError, InvalidMessageError, UpstreamError
from .tokens import REPLY_PRIMING, TokenCounter, get_encoding, message_text, shared_counter

__all__ = [
    "SUMMARY_ACK",
    "SUMMARY_MARKER",
    "ConversationManager",
    "FullHistory",
    "KeepLastTurns",
    "NoHistory",
    "Selection",
    "SlidingWindow",
    "Strategy",
    "Summarise",
    "Turn",
    "TurnUsage",
    "course_count_tokens",
    "course_sliding_window",
    "model_summariser",
]

Message = dict[str, Any]


# ── selection ─────────────────────────────────────────────────────────────────


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
    the history has them). See notes 4 and 5 of this module.
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


# ── summarisation ─────────────────────────────────────────────────────────────

#: First line of the user message that carries the running summary.
SUMMARY_MARKER = "[Summary of the earlier conversation]"
#: The assistant's acknowledgement after the summary, so roles still alternate.
SUMMARY_ACK = "Understood. I have noted the summary of our earlier conversation."

SUMMARY_PROMPT = """Summarise this conversation history concisely.
Preserve: key facts stated by the user, decisions made, context needed for future turns.
Do not include: greetings, filler, repeated information.
{previous}
{old_text}

Provide a dense 3-5 sentence summary:"""

Summariser = Callable[[str, list[Message]], str]


class Summarise(_Indexed):
    """Fold turns older than the last ``keep_recent`` into a running summary.

    The summary is carried as a clearly marked user message (:data:`SUMMARY_MARKER`)
    followed by an assistant acknowledgement (:data:`SUMMARY_ACK`), then the recent
    turns — so roles still alternate.

    ``summariser(previous_summary, messages_to_fold) -> new_summary`` writes it
    (:func:`model_summariser` builds one on a cheaper model). Re-summarising happens
    only when needed: when at least ``every`` turns have aged out of the recent
    window since the last fold, and (if ``trigger_tokens`` is set) the whole
    conversation is over that many tokens. Old turns are folded in chunks of at
    most ``chunk_tokens`` so each summariser call fits a small context window.
    ``restore(summary, covers_turns)`` resumes from a stored summary.
    """

    name = "summarise"
    blocking = True

    def __init__(
        self,
        summariser: Summariser,
        keep_recent: int = 6,
        *,
        every: int = 1,
        trigger_tokens: int | None = None,
        chunk_tokens: int = 2_000,
        counter: TokenCounter | None = None,
    ) -> None:
        if keep_recent < 0 or every < 1 or chunk_tokens <= 0:
            raise ValueError("keep_recent >= 0, every >= 1 and chunk_tokens > 0 are required")
        super().__init__(counter)
        self.summariser = summariser
        self.keep_recent = keep_recent
        self.every = every
        self.trigger_tokens = trigger_tokens
        self.chunk_tokens = chunk_tokens
        self.name = f"summarise (keep {keep_recent})"
        self.summary = ""
        self.covers_turns = 0
        #: Summariser calls made so far (each one folds a chunk).
        self.calls = 0
        self._anchor: tuple[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"Summarise(keep_recent={self.keep_recent}, every={self.every})"

    def restore(self, summary: str, covers_turns: int) -> None:
        """Resume from a stored summary covering the first ``covers_turns`` turns."""
        self.summary, self.covers_turns, self._anchor = summary, covers_turns, None

    def reset(self) -> None:
        self.restore("", 0)

    def summary_messages(self) -> list[Message]:
        """The marked summary pair that replaces the folded turns."""
        if not self.summary:
            return []
        return [
            {"role": "user", "content": f"{SUMMARY_MARKER}\n{self.summary}"},
            {"role": "assistant", "content": SUMMARY_ACK},
        ]

    def _anchor_of(self, messages: list[Message], idx: _Index) -> tuple[Any, Any]:
        first = messages[0].get("content")
        last = messages[idx.user_at[self.covers_turns - 1]].get("content")
        return first, last

    def select(self, messages: list[Message], system: str = "") -> Selection:
        idx, fixed, _tail = self._prepare(messages, system)
        if not messages:
            return Selection([], 0, fixed, False, self.name)
        complete = len(idx.user_at) - 1
        if self.covers_turns > complete or (
            self._anchor is not None and self._anchor != self._anchor_of(messages, idx)
        ):
            self.reset()  # a different (or shortened) conversation
        target = max(complete - self.keep_recent, 0)
        over = self.trigger_tokens is None or fixed + idx.prefix[-1] > self.trigger_tokens
        if over and target - self.covers_turns >= self.every:
            self._fold(messages, idx, target)
        summary = self.summary_messages()
        extra = sum(self.counter.message(m) for m in summary)
        if self.covers_turns == 0:
            sel = Selection(list(messages), 0, fixed + idx.prefix[-1], False, self.name)
            return sel
        start = idx.user_at[self.covers_turns]
        return Selection(
            messages=summary + messages[start:],
            dropped_turns=self.covers_turns,
            tokens=fixed + extra + idx.prefix[-1] - idx.prefix[start],
            applied=True,
            strategy=self.name,
            dropped_messages=start,
        )

    def _fold(self, messages: list[Message], idx: _Index, target: int) -> None:
        while self.covers_turns < target:
            lo = 0 if self.covers_turns == 0 else idx.user_at[self.covers_turns]
            end = self.covers_turns + 1  # at least one turn per call
            while (
                end < target
                and idx.prefix[idx.user_at[end + 1]] - idx.prefix[lo] <= self.chunk_tokens
            ):
                end += 1
            chunk = messages[lo : idx.user_at[end]]
            self.summary = self.summariser(self.summary, chunk).strip()
            self.calls += 1
            self.covers_turns = end
            self._anchor = self._anchor_of(messages, idx)


def _transcript(messages: list[Message]) -> str:
    return "\n".join(f"{m['role'].upper()}: {message_text(m)}" for m in messages)


def model_summariser(
    clients: Any = None,
    *,
    model: str | None = None,
    max_tokens: int = 256,
    prompt: str = SUMMARY_PROMPT,
    usage: list[tuple[int, int]] | None = None,
) -> Summariser:
    """A summariser that asks a (cheaper) model, with the course's prompt.

    ``clients`` is a :class:`labkit.providers.Clients` (default: ``providers.client()``
    on first use); ``model`` defaults to the clients' model. The previous summary is
    given to the model so the summary runs on rather than restarting. When ``usage``
    is a list, each call appends the API's ``(input_tokens, output_tokens)`` to it.
    """

    def summarise(previous: str, messages: list[Message]) -> str:
        nonlocal clients
        if clients is None:
            from .providers import client

            clients = client()
        text = prompt.format(
            previous=f"Summary so far: {previous}\n" if previous else "",
            old_text=_transcript(messages),
        )
        request = [{"role": "user", "content": text}]
        backend = _Backend(clients, model or clients.model, max_tokens, 0.0)
        try:
            summary, used = backend.create("", request)
        except _sdk_errors() as exc:
            raise _upstream(exc) from exc
        if usage is not None:
            usage.append((used["input_tokens"], used["output_tokens"]))
        return summary

    return summarise


# ── the course's code, verbatim, for comparison ───────────────────────────────


def course_count_tokens(text: str, model: str = "cl100k_base") -> int:
    """Approximate token count. cl100k_base works for GPT-4 and Claude.

    The course's ``count_tokens``; the encoding comes from labkit's offline loader.
    """
    enc = get_encoding(model)
    return len(enc.encode(text))


# fmt: off
def course_sliding_window(
    messages: list[dict],
    max_tokens: int = 100_000,
    min_turns: int = 2
) -> list[dict]:
    """
    Keep as many recent messages as fit within max_tokens.
    Always keep at least min_turns (user+assistant pairs).
    """
    count_tokens = course_count_tokens
    # Always keep messages in pairs (user + assistant)
    # Start from most recent, work backwards
    result = []
    token_count = 0
    pairs = []

    # Group into user+assistant pairs
    i = 0
    while i < len(messages) - 1:
        if messages[i]["role"] == "user" and messages[i+1]["role"] == "assistant":
            pairs.append((messages[i], messages[i+1]))
            i += 2
        else:
            i += 1

    # Always include last user message
    if messages and messages[-1]["role"] == "user":
        result = [messages[-1]]
        token_count = count_tokens(messages[-1]["content"])
        pairs_to_check = pairs
    else:
        pairs_to_check = pairs

    # Add pairs from most recent backwards until we hit the limit
    included = []
    for user_msg, asst_msg in reversed(pairs_to_check):
        pair_tokens = count_tokens(user_msg["content"]) + count_tokens(asst_msg["content"])
        if token_count + pair_tokens > max_tokens and len(included) >= min_turns:
            break
        included.insert(0, (user_msg, asst_msg))
        token_count += pair_tokens

    for u, a in included:
        result = [u, a] + result  # noqa: RUF005 (the course's code, verbatim)

    return result
# fmt: on


# ── the conversation manager ──────────────────────────────────────────────────


def _now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Turn:
    """One message of the conversation (the course's ``Turn``, with usage)."""

    #: "user" or "assistant".
    role: str
    #: The message text.
    content: str
    #: When it was added (ISO 8601, UTC).
    timestamp: str = field(default_factory=_now)
    #: Assistant: output tokens the API reported. User: tiktoken estimate of the content.
    tokens: int | None = None
    #: Assistant only: input (prompt) tokens the API billed for this turn.
    input_tokens: int | None = None
    #: Assistant only: strategy, dropped_turns, estimated_tokens, stop_reason, elapsed_s.
    meta: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> Message:
        return {"role": self.role, "content": self.content}


@dataclass
class TurnUsage:
    """Token usage of one completed turn."""

    #: 1-based turn number.
    turn: int
    #: Prompt tokens the API billed (its own count).
    input_tokens: int
    #: Reply tokens the API billed.
    output_tokens: int
    #: labkit's tiktoken estimate of the prompt that was sent.
    estimated_tokens: int
    #: Turns the strategy left out of this request.
    dropped_turns: int
    #: The strategy's name.
    strategy: str
    #: Seconds from request to final message.
    elapsed_s: float


def _upstream(exc: Exception) -> UpstreamError:
    status = getattr(exc, "status_code", None)
    detail = getattr(exc, "message", None) or str(exc)
    err = UpstreamError(
        f"The model API failed{f' ({status})' if status else ''}: {detail}",
        hint="The turn was not added to the history; fix the cause and send the message again.",
    )
    err.status_code = status  # type: ignore[attr-defined]
    return err


def _sdk_errors() -> tuple[type[BaseException], ...]:
    import anthropic
    import httpx
    import openai

    # A connection dropped mid-stream surfaces as the HTTP library's own error: the SDKs
    # of late 2026 use httpx2, older ones httpx.
    errors: list[type[BaseException]] = [anthropic.APIError, openai.APIError, httpx.TransportError]
    try:
        import httpx2

        errors.append(httpx2.TransportError)
    except ImportError:  # pragma: no cover - older SDKs
        pass
    return tuple(errors)


class _Backend:
    """The two wire formats behind one small interface (final message → text, usage)."""

    def __init__(self, clients: Any, model: str, max_tokens: int, temperature: float | None):
        self.clients, self.model, self.max_tokens = clients, model, max_tokens
        self.temperature = temperature
        self.openai = getattr(clients, "provider", "anthropic") == "openai"

    def _anthropic_kwargs(self, system: str, messages: list[Message]) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": messages,
        }
        if system:
            kw["system"] = system
        if self.temperature is not None:
            kw["extra_body"] = {"temperature": self.temperature}
        return kw

    def _openai_kwargs(self, system: str, messages: list[Message]) -> dict[str, Any]:
        sent = ([{"role": "system", "content": system}] if system else []) + messages
        kw: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "messages": sent}
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        return kw

    @staticmethod
    def _from_message(msg: Any) -> tuple[str, dict[str, Any]]:
        text = "".join(b.text for b in msg.content if getattr(b, "type", "") == "text")
        u = msg.usage
        return text, {
            "input_tokens": u.input_tokens,
            "output_tokens": u.output_tokens,
            "stop_reason": msg.stop_reason,
        }

    @staticmethod
    def _from_completion(c: Any) -> tuple[str, dict[str, Any]]:
        choice = c.choices[0]
        u = c.usage
        return choice.message.content or "", {
            "input_tokens": u.prompt_tokens if u else 0,
            "output_tokens": u.completion_tokens if u else 0,
            "stop_reason": choice.finish_reason,
        }

    def create(self, system: str, messages: list[Message]) -> tuple[str, dict[str, Any]]:
        if self.openai:
            c = self.clients.openai.chat.completions.create(**self._openai_kwargs(system, messages))
            return self._from_completion(c)
        msg = self.clients.anthropic.messages.create(**self._anthropic_kwargs(system, messages))
        return self._from_message(msg)

    async def acreate(self, system: str, messages: list[Message]) -> tuple[str, dict[str, Any]]:
        if self.openai:
            kw = self._openai_kwargs(system, messages)
            c = await self.clients.async_openai.chat.completions.create(**kw)
            return self._from_completion(c)
        kw = self._anthropic_kwargs(system, messages)
        return self._from_message(await self.clients.async_anthropic.messages.create(**kw))

    def stream(self, system: str, messages: list[Message], out: dict[str, Any]) -> Iterator[str]:
        """Yield text deltas; put ``(text, usage)`` of the final message in ``out["final"]``."""
        if self.openai:
            import openai

            kw = self._openai_kwargs(system, messages)
            kw["stream_options"] = {"include_usage": True}
            with self.clients.openai.chat.completions.stream(**kw) as s:
                try:
                    for event in s:
                        if event.type == "content.delta" and event.delta:
                            yield event.delta
                    completion = s.get_final_completion()
                except openai.LengthFinishReasonError as exc:  # max_tokens reached
                    completion = exc.completion
            out["final"] = self._from_completion(completion)
            return
        with self.clients.anthropic.messages.stream(
            **self._anthropic_kwargs(system, messages)
        ) as s:
            yield from s.text_stream
            out["final"] = self._from_message(s.get_final_message())

    async def astream(
        self, system: str, messages: list[Message], out: dict[str, Any]
    ) -> AsyncIterator[str]:
        if self.openai:
            import openai

            kw = self._openai_kwargs(system, messages)
            kw["stream_options"] = {"include_usage": True}
            async with self.clients.async_openai.chat.completions.stream(**kw) as s:
                try:
                    async for event in s:
                        if event.type == "content.delta" and event.delta:
                            yield event.delta
                    completion = await s.get_final_completion()
                except openai.LengthFinishReasonError as exc:
                    completion = exc.completion
            out["final"] = self._from_completion(completion)
            return
        kw = self._anthropic_kwargs(system, messages)
        async with self.clients.async_anthropic.messages.stream(**kw) as s:
            async for text in s.text_stream:
                yield text
            out["final"] = self._from_message(await s.get_final_message())


class ConversationManager:
    """The course's ``ConversationManager``, with strategies, streaming and async twins.

    ``clients`` is a :class:`labkit.providers.Clients` (``None``: ``providers.client()``
    on first use, so nothing is started at import). ``strategy`` chooses what each
    request carries (default :class:`FullHistory`) and may be swapped between turns.
    See note 1 of this module for what happens when a request fails.
    """

    def __init__(
        self,
        clients: Any = None,
        system_prompt: str = "",
        model: str | None = None,
        max_tokens: int = 1024,
        strategy: Strategy | None = None,
        *,
        temperature: float | None = None,
        counter: TokenCounter | None = None,
    ) -> None:
        self._clients = clients
        self.system_prompt = system_prompt
        self._model = model
        self.max_tokens = max_tokens
        self.strategy: Strategy = strategy or FullHistory()
        self.temperature = temperature
        self.counter = counter if counter is not None else shared_counter()
        self.history: list[Turn] = []
        self._messages: list[Message] = []
        #: The :class:`Selection` of the most recent request (None before the first).
        self.last_selection: Selection | None = None

    # -- state ------------------------------------------------------------------

    @property
    def clients(self) -> Any:
        if self._clients is None:
            from .providers import client

            self._clients = client()
        return self._clients

    @property
    def model(self) -> str:
        return self._model or self.clients.model

    @property
    def turn_count(self) -> int:
        return len([t for t in self.history if t.role == "user"])

    def clear(self) -> None:
        self.history = []
        self._messages = []
        self.last_selection = None
        if isinstance(self.strategy, Summarise):
            self.strategy.reset()

    def load_history(self, messages: list[Message]) -> None:
        """Replace the history with ``messages`` (e.g. a stored session or a script).

        Roles must alternate user/assistant, starting with the user, ending with the
        assistant; anything else is an :class:`~labkit.errors.InvalidMessageError`.
        """
        roles = [m.get("role") for m in messages]
        if len(roles) % 2 or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
            raise InvalidMessageError(
                "A history must alternate user/assistant messages, starting with the user "
                "and ending with the assistant.",
                hint="Pass complete turns only (drop a trailing unanswered user message).",
            )
        self.clear()
        for m in messages:
            content = m["content"] if isinstance(m["content"], str) else message_text(m)
            self.history.append(Turn(m["role"], content))
        self._messages = [t.to_message() for t in self.history]

    def messages(self) -> list[Message]:
        """The whole history as a messages array (one dict per turn, made once)."""
        if len(self._messages) != len(self.history) or (
            self.history and self._messages[-1]["content"] is not self.history[-1].content
        ):
            self._messages = [t.to_message() for t in self.history]
        return list(self._messages)

    @property
    def usage(self) -> list[TurnUsage]:
        """Token usage per completed turn, from the API's own counts."""
        rows = []
        for n, t in enumerate((t for t in self.history if t.role == "assistant"), 1):
            rows.append(
                TurnUsage(
                    turn=n,
                    input_tokens=t.input_tokens or 0,
                    output_tokens=t.tokens or 0,
                    estimated_tokens=t.meta.get("estimated_tokens", 0),
                    dropped_turns=t.meta.get("dropped_turns", 0),
                    strategy=t.meta.get("strategy", ""),
                    elapsed_s=t.meta.get("elapsed_s", 0.0),
                )
            )
        return rows

    def prepare(self, user_message: str) -> Selection:
        """What the strategy would send if ``user_message`` were sent now."""
        if not isinstance(user_message, str) or not user_message.strip():
            raise InvalidMessageError(
                "The message is empty.", hint="Type something before sending."
            )
        pending = [*self.messages(), {"role": "user", "content": user_message}]
        return self.strategy.select(pending, self.system_prompt)

    def _backend(self) -> _Backend:
        return _Backend(self.clients, self.model, self.max_tokens, self.temperature)

    def _commit(
        self, user_message: str, sel: Selection, text: str, usage: dict[str, Any], t0: float
    ) -> None:
        user = Turn("user", user_message, tokens=self.counter.text(user_message))
        reply = Turn(
            "assistant",
            text,
            tokens=usage["output_tokens"],
            input_tokens=usage["input_tokens"],
            meta={
                "strategy": sel.strategy,
                "dropped_turns": sel.dropped_turns,
                "estimated_tokens": sel.tokens,
                "stop_reason": usage["stop_reason"],
                "elapsed_s": time.perf_counter() - t0,
            },
        )
        self.history += [user, reply]
        self._messages += [user.to_message(), reply.to_message()]

    # -- sync -------------------------------------------------------------------

    def chat(self, user_message: str) -> str:
        """Send one message and return the reply (history updated only on success)."""
        sel = self.last_selection = self.prepare(user_message)
        t0 = time.perf_counter()
        try:
            text, usage = self._backend().create(self.system_prompt, sel.messages)
        except _sdk_errors() as exc:
            raise _upstream(exc) from exc
        self._commit(user_message, sel, text, usage, t0)
        return text

    def chat_stream(self, user_message: str) -> Iterator[str]:
        """Send one message; yield the reply's text as it arrives.

        The turn is committed when the stream ends normally (note 1 of this module).
        """
        sel = self.last_selection = self.prepare(user_message)
        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        try:
            yield from self._backend().stream(self.system_prompt, sel.messages, out)
        except _sdk_errors() as exc:
            raise _upstream(exc) from exc
        self._commit(user_message, sel, *out["final"], t0)

    # -- async ------------------------------------------------------------------

    async def _aprepare(self, user_message: str) -> Selection:
        if self.strategy.blocking:
            return await asyncio.to_thread(self.prepare, user_message)
        return self.prepare(user_message)

    async def achat(self, user_message: str) -> str:
        """Async twin of :meth:`chat`."""
        sel = self.last_selection = await self._aprepare(user_message)
        t0 = time.perf_counter()
        try:
            text, usage = await self._backend().acreate(self.system_prompt, sel.messages)
        except _sdk_errors() as exc:
            raise _upstream(exc) from exc
        self._commit(user_message, sel, text, usage, t0)
        return text

    async def achat_stream(self, user_message: str) -> AsyncIterator[str]:
        """Async twin of :meth:`chat_stream`."""
        sel = self.last_selection = await self._aprepare(user_message)
        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        try:
            async for text in self._backend().astream(self.system_prompt, sel.messages, out):
                yield text
        except _sdk_errors() as exc:
            raise _upstream(exc) from exc
        self._commit(user_message, sel, *out["final"], t0)
