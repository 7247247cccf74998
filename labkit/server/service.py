"""The chat API's turn logic: validate, lock, select the context, stream from the model,
store the whole turn; and the session queries the routes answer.

:class:`ChatService` is everything the routes call; it knows the store and the model API
(:mod:`labkit.server.model_api`), and nothing of HTTP routing. A turn is
``prepare`` (validate, create or lock the session) → ``run`` (the events) → ``finish``
(release the lock); ``complete`` runs the same turn for the non-streaming endpoint.

Notes (deliberate choices):

1. **A turn is stored only when the upstream reply completed.** The store's unit of
   writing is a whole turn (``append_turn`` writes user message, reply and usage
   atomically), so the history always alternates user/assistant. When the upstream
   fails — before the first byte or mid-stream — *nothing* of the turn is stored:
   not the user message, not the partial reply. The client gets an error event and a
   done event with ``"stored": false`` and may simply resend the message.
2. **Client disconnect = the turn is abandoned.** sse-starlette notices the
   ``http.disconnect`` and cancels the event generator; cancellation unwinds
   ``labkit.upstream.astream`` (the SDK's ``async with messages.stream(...)``), which
   closes the upstream HTTP response, so the upstream stops generating at once (the
   local API counts it as a cancelled stream).
   By note 1 the partial reply is dropped and nothing is stored. Cancellation is not
   an error: nothing is logged beyond uvicorn's access line.
3. **A session is created when its first request is accepted**, before the first
   event, so the id can be sent at once (``X-Session-Id`` header and first event) and a
   client whose first turn failed can retry on the same id. The system prompt is taken
   then; for an existing session a ``system_prompt`` in the body is ignored.
4. **Concurrent requests on one session: the second gets 409** (``session_busy``),
   immediately, instead of waiting: a chat client that sends twice is racing itself,
   and waiting would pile up requests behind a slow reply. The lock is the store's
   ``turn_lock`` lease (a row in SQLite, a key in Redis), so it also holds across
   server processes sharing one store; an in-process set answers the common case
   without a store round trip. ``DELETE`` of a busy session is also 409. The lock is
   released when the response finishes however it finishes (completed, failed,
   client gone), by the response object itself, not the generator (a generator that
   never started would never run its ``finally``).
5. **Context rule** (the course's): when the history plus the new message would
   exceed ``context_budget`` tokens (tiktoken estimate, ``labkit.history.KeepLastTurns``),
   only the last ``keep_turns`` turns are sent. The full history stays stored; what was
   sent (strategy, applied, dropped turns, estimated tokens) is returned in the done
   event and kept in the turn's ``meta``, from which ``/stats`` reports the last turn.
   A message that alone exceeds the budget is refused with 413 before anything is stored.
6. **Bad input never reaches the store.** Everything is validated before the session
   is created or locked: id format (400), unknown session (404), malformed JSON (400),
   wrong fields (422), empty message (422), message over ``max_message_chars`` (413).
   Every error body is ``{"error": <type>, "message": <what is wrong>, "hint": <what
   to do>}`` (:mod:`labkit.server.errors`).
7. **Where store calls run.** The store is synchronous. SQLite calls (WAL, no fsync
   per commit) take a fraction of a millisecond, less than handing them to a thread
   under load costs (the worker must win the GIL from a busy event loop, up to the
   5 ms switch interval per hand-off), so with SQLite they run inline on the event
   loop. Redis calls wait on the network, so with Redis they run on one dedicated
   store thread (one hop per phase of a turn: prepare, commit, release), and a slow
   Redis never stalls the loop that relays other streams. ``store_io`` overrides it.
8. **Usage is measured or labelled.** An upstream that sends no usage (llama.cpp's
   ``llama_cpp.server`` ignores ``stream_options.include_usage``) gets the turn stored
   with labkit's tiktoken estimate (the selected prompt, the reply's text), and the done
   event's ``usage.source`` and the turn's ``meta["usage_source"]`` say
   ``tiktoken_estimate`` (``server_usage`` when measured).
9. **The upstream request goes out before the first event.** The session event is
   written once the upstream has answered with its headers (or with its error), not
   before the request is sent: each write wakes the client, and on a busy machine that
   wake-up competed with sending the request, on the path to the first token (traced:
   the response start plus the session event cost 1–5 ms of a sequential turn's TTFT
   on a loaded 2-core machine). The session id is in the ``X-Session-Id`` header from
   the first byte, and the session event still comes first in the stream.
10. **A new session's upstream request goes out before the store is touched.** A new
    session has no history, so what is sent upstream is known from the request alone:
    ``prepare`` sends it and waits for the answer's head, and only then creates the
    session and takes its lock, while the model works on the first token. This is for
    the stores that run inline (SQLite, note 7); a store on the store thread (Redis)
    still creates and locks first: its hop queued behind an event loop busy with the
    streams already opened (tried: at 300 streams the first tokens waited ~2 s for their
    sessions and then arrived in a burst, ITL p50 33–51 ms). The store's two writes
    (~0.4 ms with SQLite) and the response's setup leave the path to the first token
    (sequential added TTFT in ``benchmarks/chat_api.py``: 3.6–3.7 → 2.6–3.0 ms, the
    course's server 3.0–3.6 in the same runs). If the store then refuses, the open
    upstream response is closed (the model stops) and the client gets the store's error;
    an upstream refusal is kept and told in the stream after the session event, as
    before. A client that leaves while the head is awaited is noticed when it arrives
    (the response's disconnect watch starts then) and its upstream response is closed.
    An existing session is locked, then its history read under the lock, then sent: its
    context depends on the history, and a turn finishing in another process must not
    slip in between the read and the lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import upstream
from ..errors import (
    InvalidSessionIdError,
    LabkitError,
    SessionBusyError,
    UpstreamError,
)
from .errors import HTTPError, http_error, unexpected
from .model_api import ModelAPI
from .models import ChatRequest
from .redact import add_secret, redact
from .settings import Settings

__all__ = ["ChatService", "PreparedTurn"]

log = logging.getLogger("labkit.server")
T = TypeVar("T")


@dataclass
class PreparedTurn:
    """A validated, locked turn, ready to be sent upstream."""

    session_id: str
    created: bool
    system: str
    message: str
    #: What is sent upstream (the selected history + the new user message).
    messages: list[dict[str, Any]]
    #: The context report (done event, turn meta, /stats).
    context: dict[str, Any]
    #: Releases the store's turn lock.
    release: Callable[[], None]
    #: Set once the lock has been released (release is idempotent per turn).
    released: bool = False
    #: The stored reply, once the turn is stored (note 1).
    reply: str | None = None
    #: Why the turn failed, once it has (its body is the stream's error event).
    error: HTTPError | None = None
    #: The done event, once sent.
    done: dict[str, Any] | None = None
    #: The open upstream response (its exit stack and text stream), between ``_open``
    #: and the end of ``run`` (note 10).
    opened: contextlib.AsyncExitStack | None = None
    stream: upstream.AsyncTextStream | None = None
    #: The upstream's refusal of a new session's request, reported in its stream.
    open_error: UpstreamError | None = None


def _no_lock() -> None:
    """The release of a turn not locked yet."""


def _busy(session_id: str) -> HTTPError:
    return http_error(SessionBusyError(f"Session {session_id} is already answering a message."))


def _usage(reply: upstream.Reply, estimated_input: int) -> dict[str, Any]:
    """The turn's usage as reported, or labkit's labelled estimate when the upstream sent
    none (``Reply.usage_reported`` is False): the prompt the context rule selected and
    the reply's text, counted with tiktoken — never zeros that look measured."""
    if reply.usage_reported:
        return {
            "input": reply.input_tokens,
            "output": reply.output_tokens,
            "cached": reply.cached_tokens,
            "source": "server_usage",
        }
    from ..tokens import shared_counter

    return {
        "input": estimated_input,
        "output": shared_counter().text(reply.text) if reply.text else 0,
        "cached": 0,
        "source": "tiktoken_estimate",
    }


class ChatService:
    """The turn logic, shared by the streaming and the JSON endpoints, and the session
    queries. Call ``await start()`` before use and ``await stop()`` after."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Note 7: one thread owns the store.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="labkit-store")
        self.store: Any = None
        self.model_api: ModelAPI | None = None
        self._busy: set[str] = set()
        self._inline = False  # decided in start() (note 7)
        self._strategy: Any = None  # the context rule, built once (note 5)

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._inline:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    # ── lifecycle ─────────────────────────────────────────────────────────────

    async def start(self) -> None:
        """Open the store and the model API client."""
        from ..store import open_store

        s = self.settings
        self.store = await self._io(
            open_store, s.store_url, ttl=s.store_ttl, archive=s.store_archive
        )
        mode = s.store_io
        if mode == "auto":
            mode = "inline" if str(self.store.url).startswith("sqlite") else "thread"
        self._inline = mode == "inline"
        self.model_api = await asyncio.to_thread(ModelAPI, s)
        add_secret(self.model_api.clients.api_key)  # never in a body or a log line
        await asyncio.to_thread(self._warm_up)

    def _warm_up(self) -> None:
        """Pay one-time costs now, not on the first requests: the tokenizer load, the
        lazy imports of the turn path, and the SDK client with its connection pool."""
        from ..history import KeepLastTurns
        from ..store import new_session_id, validate_session_id

        validate_session_id(new_session_id())
        self._strategy = KeepLastTurns(self.settings.context_budget, self.settings.keep_turns)
        self._strategy.select([{"role": "user", "content": "warm up"}])
        assert self.model_api is not None
        self.model_api.client()
        upstream.sdk_errors()

    async def stop(self) -> None:
        """Close the model API client and the store."""
        if self.model_api is not None:
            await self.model_api.close()
        if self.store is not None:
            await self._io(self.store.close)
        self._pool.shutdown(wait=True)

    def describe(self) -> dict[str, Any]:
        """What ``/health`` reports: the model API and the store URL (passwords redacted),
        and, for the tiered store, whether Redis is up and where reads were served from."""
        upstream = self.model_api.describe() if self.model_api else {}
        store = getattr(self.store, "url", None)
        out = {
            "upstream": {k: redact(v) if isinstance(v, str) else v for k, v in upstream.items()},
            "store": redact(store) if store else store,
        }
        if hasattr(self.store, "stats"):
            stats = self.store.stats()
            out["store_stats"] = {
                k: redact(v) if isinstance(v, str) else v for k, v in stats.items()
            }
        return out

    # ── validation (note 6) ───────────────────────────────────────────────────

    def check_message(self, req: ChatRequest) -> None:
        s = self.settings
        msg = req.message
        if not msg.strip():
            raise HTTPError(
                422, "empty_message", "The message is empty.", "Send some text in 'message'."
            )
        if len(msg) > s.max_message_chars:
            raise HTTPError(
                413,
                "message_too_long",
                f"The message has {len(msg):,} characters; this server accepts at most "
                f"{s.max_message_chars:,}.",
                "Shorten the message or split it over several turns.",
            )
        sp = req.system_prompt or ""
        if len(sp) > s.max_system_prompt_chars:
            raise HTTPError(
                413,
                "system_prompt_too_long",
                f"The system prompt has {len(sp):,} characters; this server accepts at most "
                f"{s.max_system_prompt_chars:,}.",
                "Shorten the system prompt.",
            )
        for name, text in (("message", msg), ("system_prompt", sp)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise HTTPError(
                    422,
                    "invalid_text",
                    f"The {name} is not valid Unicode text (it contains a lone surrogate).",
                    "Send UTF-8 text.",
                ) from None

    @staticmethod
    def check_id(session_id: str, *, allow_new: bool = False) -> str:
        if allow_new and session_id == "new":
            return session_id
        from ..store import validate_session_id

        try:
            return validate_session_id(session_id)
        except InvalidSessionIdError as exc:
            extra = ' Use "new" to start a session.' if allow_new else ""
            raise HTTPError(400, "invalid_session_id", exc.message + extra, exc.hint) from None

    # ── a turn ────────────────────────────────────────────────────────────────

    def _select(
        self, history: list[dict[str, Any]], system: str, message: str
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """What is sent upstream and the context report (note 5). ContextBudgetError →
        413, before anything is stored."""
        from ..history import KeepLastTurns

        s = self.settings
        if self._strategy is None:
            self._strategy = KeepLastTurns(s.context_budget, s.keep_turns)
        sel = self._strategy.select([*history, {"role": "user", "content": message}], system)
        context = {
            "strategy": "keep_last_turns",
            "budget_tokens": s.context_budget,
            "keep_turns": s.keep_turns,
            "applied": sel.applied,
            "dropped_turns": sel.dropped_turns,
            "sent_turns": (len(sel.messages) - 1) // 2,
            "history_turns": len(history) // 2,
            "estimated_tokens": sel.tokens,
        }
        return sel.messages, context

    def _lock_sync(self, session_id: str) -> Callable[[], None]:
        """Take the store's turn lock; the function that releases it."""
        stack = contextlib.ExitStack()
        stack.enter_context(
            self.store.turn_lock(session_id, lease_s=self.settings.turn_lease_seconds)
        )
        return stack.close

    def _continue_sync(self, session_id: str, req: ChatRequest) -> PreparedTurn:
        """Store thread, an existing session: lock it, then read its history under the
        lock (a turn finishing elsewhere cannot slip in between), then select."""
        info = self.store.get_session(session_id)  # SessionNotFoundError → 404
        release = self._lock_sync(session_id)  # SessionBusyError → 409
        try:
            history = self.store.load_history(session_id)
            messages, context = self._select(history, info.system_prompt, req.message)
        except BaseException:
            _quiet(release)()
            raise
        return PreparedTurn(
            session_id, False, info.system_prompt, req.message, messages, context, release
        )

    def _create_sync(self, turn: PreparedTurn) -> None:
        """Store thread, a new session: create it and take its lock."""
        self.store.create_session(
            system_prompt=turn.system,
            model=self.model_api.model if self.model_api else "",
            session_id=turn.session_id,
        )
        turn.release = self._lock_sync(turn.session_id)

    async def prepare(self, session_id: str, req: ChatRequest) -> PreparedTurn:
        """Validate, then create/lock the session (a new one after its upstream request
        is on its way, note 10). Raises HTTPError (nothing stored)."""
        from ..store import new_session_id

        self.check_id(session_id, allow_new=True)
        self.check_message(req)
        if session_id == "new":
            system = req.system_prompt or ""
            try:
                messages, context = self._select([], system, req.message)
            except LabkitError as exc:
                raise http_error(exc) from None
            turn = PreparedTurn(
                new_session_id(), True, system, req.message, messages, context, _no_lock
            )
            try:
                await self._open_and_create(turn)
            except LabkitError as exc:
                raise http_error(exc) from None
            self._busy.add(turn.session_id)
            return turn
        if session_id in self._busy:
            raise _busy(session_id)
        self._busy.add(session_id)
        try:
            return await self._io(self._continue_sync, session_id, req)
        except LabkitError as exc:
            self._busy.discard(session_id)
            if isinstance(exc, SessionBusyError):
                raise _busy(session_id) from None
            raise http_error(exc) from None
        except BaseException:
            self._busy.discard(session_id)
            raise

    async def _open_and_create(self, turn: PreparedTurn) -> None:
        """A new session (note 10): create and lock it, and send its upstream request;
        with an inline store (SQLite) the request goes first. Raises LabkitError from the
        store (an upstream response already open is then closed); an upstream refusal is
        kept on the turn, to be told in its stream."""
        if not self._inline:
            await self._io(self._create_sync, turn)
        try:
            try:
                await self._open(turn)
            except UpstreamError as exc:
                turn.open_error = exc
            if self._inline:
                self._create_sync(turn)
        except BaseException:
            await self.finish(turn)  # closes an open upstream response, releases a lock
            raise

    async def _open(self, turn: PreparedTurn) -> None:
        """Send the turn's upstream request and wait for the answer's head; the open
        stream (and the pool lease) are kept on the turn until ``run`` or ``finish``
        closes them. Raises UpstreamError."""
        assert self.model_api is not None
        stack = contextlib.AsyncExitStack()
        try:
            client = stack.enter_context(self.model_api.lease())
            request = self.model_api.request(turn.system, turn.messages)
            turn.stream = await stack.enter_async_context(upstream.astream(client, request))
        except BaseException:
            await stack.aclose()
            raise
        turn.opened = stack

    async def finish(self, turn: PreparedTurn) -> None:
        """Close the upstream response if still open, release the turn lock (idempotent);
        safe under cancellation: closing is what stops the upstream generating, so it runs
        even in a cancelled task."""
        stack, turn.opened = turn.opened, None
        if stack is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(stack.aclose())
        if turn.released:
            return
        turn.released = True
        self._busy.discard(turn.session_id)
        if self._inline:
            _quiet(turn.release)()
            return
        fut = asyncio.get_running_loop().run_in_executor(self._pool, _quiet(turn.release))
        # Shielded: a cancelled request must still release its lock.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(fut)

    async def run(self, turn: PreparedTurn) -> AsyncIterator[dict[str, Any]]:
        """The turn as events: session, text deltas, [error], done (notes 1 and 2)."""
        sid = turn.session_id
        usage: dict[str, Any] = {"input": 0, "output": 0, "cached": 0}
        turn_count: int | None = None
        stream: upstream.AsyncTextStream | None = None
        announced = False
        try:
            if turn.open_error is not None:
                raise turn.open_error
            if turn.opened is None:
                await self._open(turn)
            assert turn.opened is not None and turn.stream is not None
            stream = turn.stream
            async with turn.opened:
                # Note 9: the request is on its way before the session event is written.
                announced = True
                yield {"session_id": sid}
                async for text in stream.text_stream:
                    if text:
                        yield {"text": text}
                reply = await stream.reply()
            turn.opened = None
            estimate = int(turn.context.get("estimated_tokens") or 0)
            usage = _usage(reply, estimate)
            if not reply.text.strip():
                raise HTTPError(
                    502,
                    "empty_reply",
                    "The model returned an empty reply; nothing was stored.",
                    "Resend the message.",
                )
            meta = {
                "context": turn.context,
                "stop_reason": reply.stop_reason,
                "usage_source": usage["source"],
            }
            turn_count = await self._io(
                self.store.append_turn,
                sid,
                turn.message,
                reply.text,
                input_tokens=usage["input"],
                output_tokens=usage["output"],
                meta=meta,
            )
            turn.reply = reply.text
        except HTTPError as exc:
            turn.error = exc
        except UpstreamError as exc:
            log.warning("upstream failed on session %s: %s", sid, exc.message)
            if stream is not None:
                usage = _usage(stream.partial(), int(turn.context.get("estimated_tokens") or 0))
            turn.error = http_error(exc)
        except LabkitError as exc:
            turn.error = http_error(exc)
        except Exception as exc:  # a bug, not a fault: log it, still end the stream cleanly
            turn.error = unexpected(exc, f"in a turn of session {sid}")
        if not announced:
            yield {"session_id": sid}
        if turn.error is not None:
            yield turn.error.body()
        # Release before the done event: a client may send its next message the
        # moment it reads "done" (the response's on_close is only the safety net).
        await self.finish(turn)
        done: dict[str, Any] = {
            "done": True,
            "usage": usage,
            "session_id": sid,
            "context": turn.context,
            "stored": turn.reply is not None,
        }
        if turn_count is not None:
            done["turn_count"] = turn_count
        turn.done = done
        yield done

    async def complete(self, turn: PreparedTurn) -> PreparedTurn:
        """Run the turn to its end without streaming; its ``reply`` or ``error`` and
        ``done`` are then set. The lock is released however it ends."""
        try:
            async with contextlib.aclosing(self.run(turn)) as events:
                async for _event in events:
                    pass
        finally:
            await self.finish(turn)
        if turn.reply is None and turn.error is None:  # pragma: no cover - run always sets one
            turn.error = HTTPError(502, "api_error", "The turn failed.", "Resend the message.")
        return turn

    # ── sessions ──────────────────────────────────────────────────────────────

    async def list_sessions(self) -> list[dict[str, Any]]:
        """Every session's summary, as ``SessionInfo.to_dict()``."""
        infos = await self._io(self.store.list_sessions)
        return [i.to_dict() for i in infos]

    async def history(self, session_id: str) -> dict[str, Any]:
        """The system prompt, the messages and per-turn usage of one session."""
        self.check_id(session_id)

        def load() -> dict[str, Any]:
            info = self.store.get_session(session_id)
            turns = self.store.load_turns(session_id)
            messages = []
            for t in turns:
                messages.append({"role": "user", "content": t.user})
                messages.append({"role": "assistant", "content": t.assistant})
            return {
                "session_id": session_id,
                "system_prompt": info.system_prompt,
                "turn_count": len(turns),
                "messages": messages,
                "turns": [
                    {
                        "index": t.index,
                        "input_tokens": t.input_tokens,
                        "output_tokens": t.output_tokens,
                        "created_at": t.created_at.isoformat(),
                    }
                    for t in turns
                ],
            }

        return await self._io(load)

    async def stats(self, session_id: str) -> dict[str, Any]:
        """Turn count, tokens, age, and the context strategy of the last turn (note 5)."""
        self.check_id(session_id)
        s = self.settings

        def load() -> dict[str, Any]:
            info = self.store.get_session(session_id)
            last = self.store.load_turns(session_id, 1)
            return {
                "session_id": session_id,
                "turn_count": info.turn_count,
                "input_tokens": info.input_tokens,
                "output_tokens": info.output_tokens,
                "total_tokens": info.input_tokens + info.output_tokens,
                "age_seconds": round(info.age_seconds, 3),
                "created_at": info.created_at.isoformat(),
                "updated_at": info.updated_at.isoformat(),
                "model": info.model,
                "context_strategy": {
                    "name": "keep_last_turns",
                    "budget_tokens": s.context_budget,
                    "keep_turns": s.keep_turns,
                },
                "last_turn_context": (last[-1].meta.get("context") if last else None),
            }

        return await self._io(load)

    async def delete(self, session_id: str) -> bool:
        """Delete a session; 409 while it is answering (note 4)."""
        self.check_id(session_id)
        busy = http_error(SessionBusyError(f"Session {session_id} is answering a message."))
        if session_id in self._busy:
            raise busy

        def drop() -> bool:
            self.store.get_session(session_id)
            with self.store.turn_lock(session_id, lease_s=30):
                return self.store.delete_session(session_id)

        try:
            return await self._io(drop)
        except SessionBusyError:
            raise busy from None


def _quiet(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # a lost lease must not break the response
            log.warning("releasing a turn lock failed: %s", exc)

    return run
