"""A stored session bound to a conversation manager: the glue behind ``labkit chat``.

>>> store = open_store("sqlite:///conversations.db")
>>> clients = providers.client()               # the edge builds the SDK clients
>>> chat = ChatSession(store, clients=clients, system="Be brief.")
>>> chat.send("Hi, I'm Ada.", on_text=lambda text: print(text, end=""))
>>> ChatSession(store, session_id=chat.id, clients=clients).manager.turn_count  # resumed
1

Notes:

1. **Only complete turns are saved.** The turn (the message, the whole reply and
   their token usage) is written in one atomic ``append_turn`` after the reply has
   ended; an error or a KeyboardInterrupt during the reply leaves nothing behind, so
   the stored history is always well-formed.
2. The model call and the context strategy are :class:`labkit.history.ConversationManager`'s;
   this module only loads the stored turns into it and saves each new one.
3. ``summarise=True`` uses :class:`labkit.history.Summarise`: once a conversation has
   more than :data:`SUMMARISE_AFTER_TURNS` turns, its older turns are folded into a
   running summary (made by the same model) and only the last
   :data:`KEEP_RECENT_TURNS` are sent verbatim. The summary is persisted with the
   session (``set_summary``) and restored on resume, so it is not recomputed.
4. Every turn holds the session's ``turn_lock``, so two ``labkit chat`` processes
   (or a chat and ``labkit serve``) never interleave turns on one session; before
   each turn the stored turn count is compared with ours and the history reloaded if
   another writer added turns.
5. **Usage is measured or labelled.** A server that sends no usage (llama.cpp's
   ``llama_cpp.server`` ignores ``stream_options.include_usage``) leaves the turn's
   token counts unknown. The turn is then stored with labkit's tiktoken estimate (the
   prompt the strategy selected, and the reply's text) and ``meta["usage_source"] =
   "tiktoken_estimate"`` — never zeros that look measured; measured turns carry
   ``"server_usage"``. Reloaded, an estimated turn's counts stay unknown to the
   manager (``None``), as they were when it was made.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import SessionNotFoundError
from ..history import ConversationManager, FullHistory, Summarise, Turn, model_summariser
from ..store import SessionStore, validate_session_id

__all__ = ["ESTIMATED", "KEEP_RECENT_TURNS", "MEASURED", "SUMMARISE_AFTER_TURNS", "ChatSession"]

#: ``meta["usage_source"]`` of a turn whose token counts the server reported (note 5).
MEASURED = "server_usage"
#: ``meta["usage_source"]`` of a turn whose token counts are labkit's estimate (note 5).
ESTIMATED = "tiktoken_estimate"

#: ``summarise=True`` folds history once a conversation has more turns than this.
SUMMARISE_AFTER_TURNS = 20
#: Turns sent verbatim after the summary (folding happens in steps of this many).
KEEP_RECENT_TURNS = 10


class ChatSession:
    """A :class:`~labkit.history.ConversationManager` bound to one stored session."""

    def __init__(
        self,
        store: SessionStore,
        *,
        session_id: str | None = None,
        clients: Any,
        system: str | None = None,
        summarise: bool = False,
        max_tokens: int = 512,
        temperature: float | None = None,
    ) -> None:
        self.store = store
        self.clients = clients
        self.resumed = session_id is not None
        if session_id is not None:
            validate_session_id(session_id)
            try:
                self.info = store.get_session(session_id)
            except SessionNotFoundError as exc:
                raise SessionNotFoundError(
                    session_id,
                    hint="List stored sessions with `labkit sessions list` (same --store), "
                    "or leave out --session to start a new one.",
                ) from exc
        else:
            self.info = store.create_session(
                system_prompt=system or "", model=getattr(clients, "model", "") or ""
            )
        self.id = self.info.id
        if summarise:
            strategy: Any = Summarise(
                model_summariser(clients, max_tokens=256),
                keep_recent=KEEP_RECENT_TURNS,
                every=SUMMARISE_AFTER_TURNS - KEEP_RECENT_TURNS,
            )
        else:
            strategy = FullHistory()
        self.manager = ConversationManager(
            clients,
            system_prompt=self.info.system_prompt,
            max_tokens=max_tokens,
            strategy=strategy,
            temperature=temperature,
        )
        self.summary_loaded = False
        self.reload()

    @property
    def strategy(self) -> Any:
        return self.manager.strategy

    def reload(self) -> None:
        """Load the stored turns (and summary) into the manager."""
        turns = self.store.load_turns(self.id)
        history = []
        for t in turns:
            history.append(Turn("user", t.user))
            measured = t.meta.get("usage_source") != ESTIMATED  # note 5
            history.append(
                Turn(
                    "assistant",
                    t.assistant,
                    tokens=t.output_tokens if measured else None,
                    input_tokens=t.input_tokens if measured else None,
                    meta=dict(t.meta),
                )
            )
        self.manager.history = history
        if isinstance(self.strategy, Summarise):
            summary = self.store.get_summary(self.id)
            if summary is not None and summary.covers_turns <= len(turns):
                self.strategy.restore(summary.summary, summary.covers_turns)
                self.summary_loaded = True
            else:
                self.strategy.reset()

    def summary(self) -> tuple[str, int] | None:
        s = self.strategy
        if isinstance(s, Summarise) and s.covers_turns:
            return s.summary, s.covers_turns
        return None

    def send(self, message: str, on_text: Callable[[str], None]) -> str:
        """One turn: stream the reply through ``on_text``; save the turn when complete.

        A KeyboardInterrupt (or any error) during the reply propagates and nothing is
        saved (note 1).
        """
        with self.store.turn_lock(self.id):
            if self.store.get_session(self.id).turn_count != self.manager.turn_count:
                self.reload()  # another writer added turns (note 4)
            before = self.summary()
            for text in self.manager.chat_stream(message):
                on_text(text)
            reply = self.manager.history[-1]
            meta = {k: v for k, v in reply.meta.items() if k != "elapsed_s"}
            meta["elapsed_s"] = round(reply.meta.get("elapsed_s", 0.0), 4)
            if reply.input_tokens is None or reply.tokens is None:  # no usage sent (note 5)
                input_tokens = int(meta.get("estimated_tokens") or 0)
                output_tokens = self.manager.counter.text(reply.content)
                meta["usage_source"] = ESTIMATED
            else:
                input_tokens, output_tokens = reply.input_tokens, reply.tokens
                meta["usage_source"] = MEASURED
            self.store.append_turn(
                self.id,
                message,
                reply.content,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                meta=meta,
            )
            after = self.summary()
            if after is not None and after != before:
                self.store.set_summary(self.id, after[0], after[1])
            return reply.content
