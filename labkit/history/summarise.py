"""Summarising: fold old turns into a running summary written by a model.

:class:`Summarise` is a strategy (see :mod:`labkit.history.strategies`) that keeps
the last turns verbatim and carries everything older as a summary;
:func:`model_summariser` writes that summary with a model, through
:mod:`labkit.upstream`, on a client the caller passes in.

Notes:

1. The summary travels as a clearly marked user message (:data:`SUMMARY_MARKER`)
   followed by an assistant acknowledgement (:data:`SUMMARY_ACK`), so roles still
   alternate and the model can tell the summary from what the user said.
2. The summariser's prompt is the course's (:data:`SUMMARY_PROMPT`), with the previous
   summary given to the model so the summary runs on rather than restarting.
3. Summarising may call a model, so :attr:`Summarise.blocking` is True: async code
   runs ``select`` in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import upstream
from ..tokens import TokenCounter, message_text
from .clients import model_of, require_clients, sdk_client
from .strategies import Selection, _Index, _Indexed

__all__ = [
    "SUMMARY_ACK",
    "SUMMARY_MARKER",
    "SUMMARY_PROMPT",
    "Summarise",
    "Summariser",
    "model_summariser",
]

Message = dict[str, Any]

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
    clients: Any,
    *,
    model: str | None = None,
    max_tokens: int = 256,
    prompt: str = SUMMARY_PROMPT,
    usage: list[tuple[int, int]] | None = None,
) -> Summariser:
    """A summariser that asks a (cheaper) model, with the course's prompt (note 2).

    ``clients`` is what the edge passed in: a :class:`labkit.providers.Clients` or a
    sync SDK client (see :mod:`labkit.history.clients`); ``model`` defaults to the
    clients' model. When ``usage`` is a list, each call appends the API's
    ``(input_tokens, output_tokens)`` to it, input counting every prompt token sent
    (cached or not). A failed call raises :class:`~labkit.errors.UpstreamError`.
    """
    require_clients(clients, "model_summariser")
    chosen = model_of(clients, model)

    def summarise(previous: str, messages: list[Message]) -> str:
        text = prompt.format(
            previous=f"Summary so far: {previous}\n" if previous else "",
            old_text=_transcript(messages),
        )
        request = upstream.Request(
            chosen, [{"role": "user", "content": text}], max_tokens, temperature=0.0
        )
        reply = upstream.create(sdk_client(clients), request)
        if usage is not None:
            usage.append((reply.input_tokens, reply.output_tokens))
        return reply.text

    return summarise
