"""The course's ``ConversationManager``: a history, a strategy, and a model to ask.

LLMs are stateless: the model sees only what one request carries. A conversation
is a messages array the client keeps and re-sends; the manager keeps it as
:class:`Turn` objects, asks its strategy (:mod:`labkit.history.strategies`) what to
send, and sends it through :mod:`labkit.upstream` on the clients it was given.

Notes:

1. **A turn is atomic.** The user message is committed to ``history`` only together
   with the assistant's reply, once the whole reply has arrived. If the request or
   the stream fails — or the caller stops iterating :meth:`ConversationManager.chat_stream`
   early — ``history`` is left as it was and the error propagates (SDK failures as
   :class:`~labkit.errors.UpstreamError`, the SDK's exception on ``__cause__``).
   There is never a dangling user message, so the next request still alternates
   roles. Text already yielded by a failed stream was shown but is not kept.
2. The assistant turn is the reply :mod:`labkit.upstream` assembles: Anthropic's own
   ``get_final_message()``, or the OpenAI chunks folded by ``upstream.ChunkAccumulator``.
3. **Input tokens mean the whole prompt sent.** ``Turn.input_tokens`` and
   ``TurnUsage.input_tokens`` count every prompt token the API read for the request,
   cached or not (``labkit.upstream``, note 2), so they grow with the history sent
   even when a prompt cache served most of it; the cached part is kept apart
   (``meta["cached_tokens"]``, ``TurnUsage.cached_tokens``). When the server sent no
   usage at all, the token fields are None, never a zero passed off as a count.
4. **Clients are passed in, never built.** ``clients`` is required: a
   :class:`labkit.providers.Clients` or an official SDK client (see
   :mod:`labkit.history.clients`). A manager never starts a model by itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .. import upstream
from ..errors import InvalidMessageError
from ..tokens import TokenCounter, message_text, shared_counter
from .clients import model_of, require_clients, sdk_client
from .strategies import FullHistory, Selection, Strategy
from .summarise import Summarise

__all__ = ["ConversationManager", "Turn", "TurnUsage"]

Message = dict[str, Any]


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
    #: Assistant only: every prompt token the API read for this turn, cached or not (note 3).
    input_tokens: int | None = None
    #: Assistant only: strategy, dropped_turns, estimated_tokens, cached_tokens,
    #: stop_reason, elapsed_s.
    meta: dict[str, Any] = field(default_factory=dict)

    def to_message(self) -> Message:
        return {"role": self.role, "content": self.content}


@dataclass
class TurnUsage:
    """Token usage of one completed turn (None: the server reported no usage)."""

    #: 1-based turn number.
    turn: int
    #: Every prompt token the API read for this request, cached or not (note 3).
    input_tokens: int | None
    #: Reply tokens the API billed.
    output_tokens: int | None
    #: labkit's tiktoken estimate of the prompt that was sent.
    estimated_tokens: int
    #: Turns the strategy left out of this request.
    dropped_turns: int
    #: The strategy's name.
    strategy: str
    #: Seconds from request to final message.
    elapsed_s: float
    #: Of ``input_tokens``, those the API served from its prompt cache.
    cached_tokens: int = 0


class ConversationManager:
    """The course's ``ConversationManager``, with strategies, streaming and async twins.

    ``clients`` (required) is what the edge passed in: a :class:`labkit.providers.Clients`
    or an official SDK client with ``model=`` (note 4). ``strategy`` chooses what each
    request carries (default :class:`FullHistory`) and may be swapped between turns.
    See note 1 of this module for what happens when a request fails.
    """

    def __init__(
        self,
        clients: Any,
        system_prompt: str = "",
        model: str | None = None,
        max_tokens: int = 1024,
        strategy: Strategy | None = None,
        *,
        temperature: float | None = None,
        counter: TokenCounter | None = None,
    ) -> None:
        self.clients = require_clients(clients, "ConversationManager")
        self.model = model_of(clients, model)
        self.system_prompt = system_prompt
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
        """Token usage per completed turn, from the API's own counts (note 3)."""
        rows = []
        for n, t in enumerate((t for t in self.history if t.role == "assistant"), 1):
            rows.append(
                TurnUsage(
                    turn=n,
                    input_tokens=t.input_tokens,
                    output_tokens=t.tokens,
                    estimated_tokens=t.meta.get("estimated_tokens", 0),
                    dropped_turns=t.meta.get("dropped_turns", 0),
                    strategy=t.meta.get("strategy", ""),
                    elapsed_s=t.meta.get("elapsed_s", 0.0),
                    cached_tokens=t.meta.get("cached_tokens", 0),
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

    def _request(self, sel: Selection) -> upstream.Request:
        return upstream.Request(
            self.model,
            sel.messages,
            self.max_tokens,
            system=self.system_prompt,
            temperature=self.temperature,
        )

    def _commit(self, user_message: str, sel: Selection, reply: upstream.Reply, t0: float) -> None:
        reported = reply.usage_reported
        user = Turn("user", user_message, tokens=self.counter.text(user_message))
        answer = Turn(
            "assistant",
            reply.text,
            tokens=reply.output_tokens if reported else None,
            input_tokens=reply.input_tokens if reported else None,
            meta={
                "strategy": sel.strategy,
                "dropped_turns": sel.dropped_turns,
                "estimated_tokens": sel.tokens,
                "cached_tokens": reply.cached_tokens,
                "stop_reason": reply.stop_reason,
                "elapsed_s": time.perf_counter() - t0,
            },
        )
        self.history += [user, answer]
        self._messages += [user.to_message(), answer.to_message()]

    # -- sync -------------------------------------------------------------------

    def chat(self, user_message: str) -> str:
        """Send one message and return the reply (history updated only on success)."""
        sel = self.last_selection = self.prepare(user_message)
        client = sdk_client(self.clients)
        t0 = time.perf_counter()
        reply = upstream.create(client, self._request(sel))
        self._commit(user_message, sel, reply, t0)
        return reply.text

    def chat_stream(self, user_message: str) -> Iterator[str]:
        """Send one message; yield the reply's text as it arrives.

        The turn is committed when the stream ends normally (note 1 of this module).
        """
        sel = self.last_selection = self.prepare(user_message)
        client = sdk_client(self.clients)
        t0 = time.perf_counter()
        with upstream.stream(client, self._request(sel)) as stream:
            yield from stream.text_stream
            reply = stream.reply()
        self._commit(user_message, sel, reply, t0)

    # -- async ------------------------------------------------------------------

    async def _aprepare(self, user_message: str) -> Selection:
        if self.strategy.blocking:
            return await asyncio.to_thread(self.prepare, user_message)
        return self.prepare(user_message)

    async def achat(self, user_message: str) -> str:
        """Async twin of :meth:`chat`."""
        sel = self.last_selection = await self._aprepare(user_message)
        client = sdk_client(self.clients, asynchronous=True)
        t0 = time.perf_counter()
        reply = await upstream.acreate(client, self._request(sel))
        self._commit(user_message, sel, reply, t0)
        return reply.text

    async def achat_stream(self, user_message: str) -> AsyncIterator[str]:
        """Async twin of :meth:`chat_stream`."""
        sel = self.last_selection = await self._aprepare(user_message)
        client = sdk_client(self.clients, asynchronous=True)
        t0 = time.perf_counter()
        async with upstream.astream(client, self._request(sel)) as stream:
            async for text in stream.text_stream:
                yield text
            reply = await stream.reply()
        self._commit(user_message, sel, reply, t0)
