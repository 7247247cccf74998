"""The milestone: a streaming chat API with persistent sessions (``labkit serve``).

``create_app(settings)`` builds a FastAPI app (OpenAPI docs at ``/docs``):

- ``POST /chat/stream/{session_id}`` — one turn as SSE; ``session_id = "new"`` starts a
  session. Events (one JSON object per ``data:`` line, as the course's clients read
  them): ``{"session_id"}`` first, ``{"text"}`` deltas, then ``{"done": true, "usage":
  {"input", "output", "cached"}, "session_id", "context", "turn_count", "stored"}``; a failure
  is ``{"error": "<type>", "message", "hint"}`` followed by the done event.
- ``POST /chat/{session_id}`` — the same turn as JSON ``{session_id, reply, turn_count,
  usage, context}``.
- ``GET /sessions``, ``GET /sessions/{id}/history``, ``GET /sessions/{id}/stats``,
  ``DELETE /sessions/{id}``, and ``GET /`` (the chat page).

Notes (deliberate choices):

1. **A turn is stored only when the upstream reply completed.** The store's unit of
   writing is a whole turn (``append_turn`` writes user message, reply and usage
   atomically), so the history always alternates user/assistant. When the upstream
   fails — before the first byte or mid-stream — *nothing* of the turn is stored:
   not the user message, not the partial reply. The client gets an error event and a
   done event with ``"stored": false`` and may simply resend the message.
2. **Client disconnect = the turn is abandoned.** sse-starlette notices the
   ``http.disconnect`` and cancels the event generator; cancellation unwinds the SDK's
   ``async with messages.stream(...)``, which closes the upstream HTTP response, so the
   upstream stops generating at once (the local API counts it as a cancelled stream).
   By note 1 the partial reply is dropped and nothing is stored. Cancellation is not
   an error: nothing is logged beyond uvicorn's access line.
3. **A session is created when its first request is accepted**, before the upstream
   is called, so the id can be sent at once (``X-Session-Id`` header and first event)
   and a client whose first turn failed can retry on the same id. The system prompt
   is taken then; for an existing session a ``system_prompt`` in the body is ignored.
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
   to do>}``.
7. **Where store calls run.** The store is synchronous. SQLite calls (WAL, no fsync
   per commit) take a fraction of a millisecond, less than handing them to a thread
   under load costs (the worker must win the GIL from a busy event loop, up to the
   5 ms switch interval per hand-off), so with SQLite they run inline on the event
   loop. Redis calls wait on the network, so with Redis they run on one dedicated
   store thread (one hop per phase of a turn: prepare, commit, release), and a slow
   Redis never stalls the loop that relays other streams. ``store_io`` overrides it.
8. **Upstream** is the official async SDK: ``AsyncAnthropic.messages.stream`` (the
   default; providers ``local`` and ``anthropic``) or ``AsyncOpenAI.chat.completions``
   (provider ``openai``). The stored reply is taken from ``get_final_message()``, never
   assembled from chunks. The HTTP pool allows ``max_upstream_connections`` (the
   SDK's default is 1,000, which would queue the 1,001st stream).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ContextBudgetError,
    InvalidMessageError,
    InvalidSessionIdError,
    LabkitError,
    SessionBusyError,
    SessionNotFoundError,
    StoreUnavailableError,
)
from .sse import encode_event, event_response

__all__ = [
    "ChatReply",
    "ChatRequest",
    "Settings",
    "create_app",
]

log = logging.getLogger("labkit.server")
T = TypeVar("T")


# ── settings ──────────────────────────────────────────────────────────────────


@dataclass
class Settings:
    """Everything ``labkit serve`` can be told."""

    #: Store URL (``sqlite:///path.db`` or ``redis://host:port/db``); None → $LABKIT_STORE → sqlite:///conversations.db.
    store_url: str | None = None
    #: Redis TTL in seconds (None: the store's default).
    store_ttl: int | None = None
    #: "local" (default), "anthropic" or "openai"; None → $LABKIT_PROVIDER → local.
    provider: str | None = None
    #: Any compatible server (e.g. a ``labkit local-api --engine sim``).
    base_url: str | None = None
    #: Model id (None: the provider's default).
    model: str | None = None
    #: Engine of the local API when the provider is local and no base_url is given.
    engine: str = "llama"
    #: Token budget above which only the last ``keep_turns`` turns are sent.
    context_budget: int = 50_000
    #: Turns kept when the budget is exceeded.
    keep_turns: int = 10
    #: Longest user message accepted, in characters.
    max_message_chars: int = 32_000
    #: Longest system prompt accepted, in characters.
    max_system_prompt_chars: int = 16_000
    #: ``max_tokens`` of each upstream request.
    max_tokens: int = 512
    #: Sampling temperature (None: the upstream's default).
    temperature: float | None = None
    #: SDK retries of failed requests before the first byte (the SDK's default is 2).
    max_retries: int = 2
    #: Upstream read timeout in seconds.
    upstream_timeout: float = 120.0
    #: Connection pool size towards the upstream.
    max_upstream_connections: int = 4096
    #: Seconds between SSE keep-alive comments.
    ping_seconds: float = 15.0
    #: Where store calls run: "inline" (on the event loop), "thread" (one store thread),
    #: or "auto" (inline for SQLite, a thread for Redis; note 7).
    store_io: str = "auto"
    #: Lease of the per-session turn lock (a crashed server blocks a session at most this long).
    turn_lease_seconds: float = 300.0


# ── request and response models ───────────────────────────────────────────────


class ChatRequest(BaseModel):
    """Body of ``POST /chat/stream/{session_id}`` and ``POST /chat/{session_id}``."""

    model_config = ConfigDict(extra="forbid")

    message: str = Field(description="The user's message (non-empty; at most max_message_chars).")
    system_prompt: str | None = Field(
        default=None, description="System prompt; taken when the session is created only."
    )


class Usage(BaseModel):
    #: Prompt tokens the upstream read, cached or not (grows with the history sent).
    input: int = 0
    #: Output tokens reported by the upstream.
    output: int = 0
    #: Of ``input``, tokens served from the upstream's prompt cache.
    cached: int = 0


class ChatReply(BaseModel):
    """Answer of ``POST /chat/{session_id}``."""

    session_id: str
    reply: str
    turn_count: int
    usage: Usage
    context: dict[str, Any]


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: str = Field(description="Machine-readable error type, e.g. session_not_found.")
    message: str = Field(description="What is wrong.")
    hint: str = Field(default="", description="What to do instead.")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 409, 413, 422, 429, 502, 503, 504)
}


# ── errors ────────────────────────────────────────────────────────────────────


class HTTPError(Exception):
    """An error answer: status, type, message, hint."""

    def __init__(self, status: int, error: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.error, self.message, self.hint = status, error, message, hint

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": self.error, "message": self.message, "hint": self.hint}
        return JSONResponse(body, status_code=self.status, headers=headers)


def _translate(exc: LabkitError) -> HTTPError:
    """Domain error → HTTP error (the only place this mapping lives)."""
    table: list[tuple[type[LabkitError], int, str]] = [
        (InvalidSessionIdError, 400, "invalid_session_id"),
        (SessionNotFoundError, 404, "session_not_found"),
        (SessionBusyError, 409, "session_busy"),
        (ContextBudgetError, 413, "context_budget_exceeded"),
        (InvalidMessageError, 422, "invalid_message"),
        (StoreUnavailableError, 503, "store_unavailable"),
    ]
    for cls, status, name in table:
        if isinstance(exc, cls):
            return HTTPError(status, name, exc.message, exc.hint)
    return HTTPError(500, "internal_error", exc.message, exc.hint)


@dataclass
class UpstreamFailure:
    """An upstream failure as the client sees it."""

    #: Short type: rate_limit, overloaded, api_error, connection_error, timeout, invalid_request...
    error: str
    #: Human-readable message.
    message: str
    #: HTTP status the non-streaming endpoint answers with.
    status: int
    #: What to do.
    hint: str = ""


_UPSTREAM_TYPES = {
    "rate_limit_error": (
        "rate_limit",
        429,
        "Too many requests upstream. Wait a moment and resend.",
    ),
    "overloaded_error": ("overloaded", 503, "The model is overloaded. Resend in a few seconds."),
    "invalid_request_error": (
        "invalid_request",
        502,
        "The model API refused the request (a conversation too long for its window?).",
    ),
    "authentication_error": ("authentication", 502, "Check the server's API key."),
    "permission_error": ("permission", 502, "Check the server's API key and model access."),
    "not_found_error": ("model_not_found", 502, "Check --model and --base-url."),
    "request_too_large": (
        "request_too_large",
        502,
        "The conversation is too large for the model API.",
    ),
    "api_error": ("api_error", 502, "The model API failed. Resend the message."),
}


def _sdk_httpx() -> Any:
    """The httpx flavour the SDKs are built on (``httpx2`` in recent releases)."""
    try:
        import httpx2

        return httpx2
    except ImportError:  # pragma: no cover - older SDKs
        import httpx

        return httpx


def classify_upstream(exc: BaseException) -> UpstreamFailure:
    """Map an SDK or transport exception to an :class:`UpstreamFailure`."""
    import anthropic
    import httpx
    import openai

    hx = _sdk_httpx()

    kind = None
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            kind = err.get("type") or err.get("code")
        elif isinstance(body.get("type"), str) and body.get("type") != "error":
            kind = body.get("type")
    if kind is None and status is not None:
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            529: "overloaded_error",
        }.get(status, "api_error")
    if kind == "rate_limit_exceeded":  # OpenAI's code
        kind = "rate_limit_error"
    if kind is not None:
        name, http, hint = _UPSTREAM_TYPES.get(str(kind), _UPSTREAM_TYPES["api_error"])
        msg = getattr(exc, "message", None) or str(exc)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            msg = body["error"].get("message") or msg
        return UpstreamFailure(name, f"Upstream {kind}: {msg}", http, hint)
    timeouts = (anthropic.APITimeoutError, openai.APITimeoutError, httpx.TimeoutException)
    if isinstance(exc, (*timeouts, hx.TimeoutException)):
        return UpstreamFailure(
            "timeout", "The model API did not answer in time.", 504, "Resend the message."
        )
    transport = (anthropic.APIConnectionError, openai.APIConnectionError, httpx.TransportError)
    if isinstance(exc, (*transport, hx.TransportError)):
        return UpstreamFailure(
            "connection_error",
            f"The connection to the model API failed: {exc}",
            502,
            "Resend the message; if it keeps failing, check that the model API is running.",
        )
    return UpstreamFailure(
        "internal_error", f"{type(exc).__name__}: {exc}", 502, "Resend the message."
    )


def _upstream_errors() -> tuple[type[BaseException], ...]:
    import anthropic
    import httpx
    import openai

    return (anthropic.APIError, openai.APIError, httpx.HTTPError, _sdk_httpx().HTTPError)


# ── upstream ──────────────────────────────────────────────────────────────────


@dataclass
class UpstreamResult:
    """A completed reply."""

    #: The reply text, from the SDK's final message.
    reply: str
    #: Prompt tokens the upstream read for this turn, cached or not (Anthropic:
    #: ``input_tokens`` + ``cache_read_input_tokens`` + ``cache_creation_input_tokens``;
    #: OpenAI: ``prompt_tokens``), so the figure grows with the history sent.
    input_tokens: int
    #: Output tokens reported by the upstream.
    output_tokens: int
    #: Why generation stopped (end_turn, max_tokens, ...).
    stop_reason: str | None
    #: Of ``input_tokens``, those served from the upstream's prompt cache.
    cached_tokens: int = 0


def _anthropic_input(usage: Any) -> tuple[int, int]:
    """(all prompt tokens, cache reads) of an Anthropic ``Usage``."""
    cached = getattr(usage, "cache_read_input_tokens", 0) or 0
    created = getattr(usage, "cache_creation_input_tokens", 0) or 0
    return (usage.input_tokens or 0) + cached + created, cached


class _AnthropicStream:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.text_stream: AsyncIterator[str] = stream.text_stream

    async def result(self) -> UpstreamResult:
        msg = await self._stream.get_final_message()
        reply = "".join(b.text for b in msg.content if getattr(b, "type", "") == "text")
        total, cached = _anthropic_input(msg.usage)
        return UpstreamResult(reply, total, msg.usage.output_tokens or 0, msg.stop_reason, cached)

    def partial_usage(self) -> tuple[int, int]:
        snap = getattr(self._stream, "current_message_snapshot", None)
        if snap is None:
            return 0, 0
        return _anthropic_input(snap.usage)[0], snap.usage.output_tokens or 0


class _OpenAIStream:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._parts: list[str] = []
        self._usage: Any = None
        self._finish: str | None = None
        self.text_stream = self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        async for chunk in self._stream:
            if chunk.usage is not None:
                self._usage = chunk.usage
            for choice in chunk.choices:
                if choice.finish_reason:
                    self._finish = choice.finish_reason
                text = choice.delta.content if choice.delta else None
                if text:
                    self._parts.append(text)
                    yield text

    async def result(self) -> UpstreamResult:
        u = self._usage
        details = getattr(u, "prompt_tokens_details", None)
        return UpstreamResult(
            "".join(self._parts),
            getattr(u, "prompt_tokens", 0) or 0,
            getattr(u, "completion_tokens", 0) or 0,
            self._finish,
            getattr(details, "cached_tokens", 0) or 0,
        )

    def partial_usage(self) -> tuple[int, int]:
        return 0, len(self._parts)


class Upstream:
    """The model API the server relays, through the official async SDK."""

    def __init__(self, settings: Settings) -> None:
        from ..providers import client

        self.settings = settings
        self.clients = client(
            settings.provider,
            model=settings.model,
            base_url=settings.base_url,
            engine=settings.engine,
        )
        self.provider: str = self.clients.provider
        self.model: str = self.clients.model
        self._sdk: Any = None

    def _client(self) -> Any:
        if self._sdk is None:
            httpx = _sdk_httpx()
            s = self.settings
            limits = httpx.Limits(
                max_connections=s.max_upstream_connections,
                max_keepalive_connections=min(256, s.max_upstream_connections),
            )
            timeout = httpx.Timeout(s.upstream_timeout, connect=5.0)
            if self.provider == "openai":
                import openai

                base = self.clients.async_openai
                http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
            else:
                import anthropic

                base = self.clients.async_anthropic
                http = anthropic.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
            self._sdk = base.with_options(
                http_client=http, max_retries=s.max_retries, timeout=timeout
            )
        return self._sdk

    def describe(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "base_url": self.clients.base_url}

    @asynccontextmanager
    async def stream(self, system: str, messages: list[dict[str, Any]]) -> AsyncIterator[Any]:
        """Open one streamed request; yields an object with ``text_stream``,
        ``await result()`` and ``partial_usage()``. Leaving the block closes the
        upstream response (that is how a disconnect cancels generation)."""
        s = self.settings
        sdk = self._client()
        extra: dict[str, Any] = {}
        if s.temperature is not None:
            extra["temperature"] = s.temperature
        if self.provider == "openai":
            msgs = ([{"role": "system", "content": system}] if system else []) + messages
            stream = await sdk.chat.completions.create(
                model=self.model,
                messages=msgs,
                max_tokens=s.max_tokens,
                stream=True,
                stream_options={"include_usage": True},
                **extra,
            )
            async with stream:
                yield _OpenAIStream(stream)
        else:
            kwargs: dict[str, Any] = {
                "model": self.model,
                "max_tokens": s.max_tokens,
                "messages": messages,
            }
            if system:
                kwargs["system"] = system
            if extra:
                kwargs["extra_body"] = extra
            async with sdk.messages.stream(**kwargs) as stream:
                yield _AnthropicStream(stream)

    async def close(self) -> None:
        if self._sdk is not None:
            await self._sdk.close()


# ── the turn ──────────────────────────────────────────────────────────────────


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


class ChatService:
    """The turn logic, shared by the streaming and the JSON endpoints."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Note 7: one thread owns the store.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="labkit-store")
        self.store: Any = None
        self.upstream: Upstream | None = None
        self._busy: set[str] = set()
        self._inline = False  # decided in start() (note 7)

    async def _io(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._inline:
            return fn(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def start(self) -> None:
        from ..store import open_store

        s = self.settings
        self.store = await self._io(open_store, s.store_url, ttl=s.store_ttl)
        mode = s.store_io
        if mode == "auto":
            mode = "inline" if str(self.store.url).startswith("sqlite") else "thread"
        self._inline = mode == "inline"
        self.upstream = await asyncio.to_thread(Upstream, s)
        await asyncio.to_thread(self._warm_up)

    def _warm_up(self) -> None:
        """Pay one-time costs now, not on the first requests: the tokenizer load, the
        lazy imports of the turn path, and the SDK client with its connection pool."""
        from ..history import KeepLastTurns
        from ..store import new_session_id, validate_session_id

        validate_session_id(new_session_id())
        KeepLastTurns(self.settings.context_budget, self.settings.keep_turns).select(
            [{"role": "user", "content": "warm up"}]
        )
        assert self.upstream is not None
        self.upstream._client()
        classify_upstream(RuntimeError("warm up"))

    async def stop(self) -> None:
        if self.upstream is not None:
            await self.upstream.close()
        if self.store is not None:
            await self._io(self.store.close)
        self._pool.shutdown(wait=True)

    # validation (note 6)

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

    def _prepare_sync(self, session_id: str, req: ChatRequest) -> PreparedTurn:
        """Runs on the store thread: select the context, create/lock the session."""
        from ..history import KeepLastTurns
        from ..store import new_session_id

        s = self.settings
        store = self.store
        created = session_id == "new"
        if created:
            history: list[dict[str, Any]] = []
            system = req.system_prompt or ""
        else:
            info = store.get_session(session_id)  # SessionNotFoundError → 404
            system = info.system_prompt
            history = store.load_history(session_id)
        strategy = KeepLastTurns(s.context_budget, s.keep_turns)
        messages = [*history, {"role": "user", "content": req.message}]
        sel = strategy.select(messages, system)  # ContextBudgetError → 413, nothing stored
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
        if created:
            session_id = new_session_id()
            store.create_session(
                system_prompt=system,
                model=self.upstream.model if self.upstream else "",
                session_id=session_id,
            )
        stack = contextlib.ExitStack()
        stack.enter_context(store.turn_lock(session_id, lease_s=s.turn_lease_seconds))
        return PreparedTurn(
            session_id, created, system, req.message, sel.messages, context, stack.close
        )

    async def prepare(self, session_id: str, req: ChatRequest) -> PreparedTurn:
        """Validate, then create/lock the session. Raises HTTPError (nothing stored)."""
        self.check_id(session_id, allow_new=True)
        self.check_message(req)
        if session_id in self._busy:
            raise _translate(
                SessionBusyError(f"Session {session_id} is already answering a message.")
            )
        if session_id != "new":
            self._busy.add(session_id)
        try:
            turn = await self._io(self._prepare_sync, session_id, req)
        except LabkitError as exc:
            self._busy.discard(session_id)
            if isinstance(exc, SessionBusyError):
                exc = SessionBusyError(f"Session {session_id} is already answering a message.")
            raise _translate(exc) from None
        except BaseException:
            self._busy.discard(session_id)
            raise
        self._busy.add(turn.session_id)
        return turn

    async def finish(self, turn: PreparedTurn) -> None:
        """Release the turn lock (idempotent); safe under cancellation."""
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
        assert self.upstream is not None
        sid = turn.session_id
        yield {"session_id": sid}
        usage = {"input": 0, "output": 0}
        stored = False
        turn_count: int | None = None
        stream = None
        try:
            async with self.upstream.stream(turn.system, turn.messages) as stream:
                async for text in stream.text_stream:
                    if text:
                        yield {"text": text}
                result = await stream.result()
            usage = {
                "input": result.input_tokens,
                "output": result.output_tokens,
                "cached": result.cached_tokens,
            }
            if not result.reply.strip():
                raise _EmptyReply()
            meta = {"context": turn.context, "stop_reason": result.stop_reason}
            turn_count = await self._io(
                self.store.append_turn,
                sid,
                turn.message,
                result.reply,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                meta=meta,
            )
            stored = True
        except _EmptyReply:
            yield {
                "error": "empty_reply",
                "message": "The model returned an empty reply; nothing was stored.",
                "hint": "Resend the message.",
            }
        except _upstream_errors() as exc:
            f = classify_upstream(exc)
            log.warning("upstream failed on session %s: %s", sid, f.message)
            if stream is not None:
                i, o = stream.partial_usage()
                usage = {"input": i, "output": o}
            yield {"error": f.error, "message": f.message, "hint": f.hint}
        except LabkitError as exc:
            e = _translate(exc)
            yield {"error": e.error, "message": e.message, "hint": e.hint}
        except Exception as exc:  # a bug, not a fault: log it, still end the stream cleanly
            log.exception("turn failed on session %s", sid)
            yield {
                "error": "internal_error",
                "message": f"{type(exc).__name__}: {exc}",
                "hint": "Resend the message; if it keeps failing, check the server log.",
            }
        # Release before the done event: a client may send its next message the
        # moment it reads "done" (the response's on_close is only the safety net).
        await self.finish(turn)
        done: dict[str, Any] = {
            "done": True,
            "usage": usage,
            "session_id": sid,
            "context": turn.context,
            "stored": stored,
        }
        if turn_count is not None:
            done["turn_count"] = turn_count
        yield done


class _EmptyReply(Exception):
    pass


def _quiet(fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception as exc:  # a lost lease must not break the response
            log.warning("releasing a turn lock failed: %s", exc)

    return run


# ── the app ───────────────────────────────────────────────────────────────────


def _validation_message(exc: RequestValidationError) -> tuple[int, str, str]:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            return (
                400,
                "invalid_json",
                f"The body is not valid JSON: {e.get('msg', '')}".rstrip(": "),
            )
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return 422, "invalid_request", "; ".join(parts) or "The request is invalid."


def create_app(settings: Settings | None = None) -> FastAPI:
    """The chat API (see the module docstring)."""
    settings = settings or Settings()
    service = ChatService(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="labkit chat API",
        description="Streaming chat with persistent sessions (the course's milestone).",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(LabkitError)
    async def _labkit_error(request: Request, exc: LabkitError) -> JSONResponse:
        return _translate(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, kind, msg = _validation_message(exc)
        hint = (
            'Send a JSON object such as {"message": "Hello"}.'
            if kind != "invalid_request" or "body" in msg
            else "Check the request against /docs."
        )
        return HTTPError(status, kind, msg, hint).response()

    @app.exception_handler(StarletteHTTPException)
    async def _starlette(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return HTTPError(exc.status_code, kind, str(exc.detail), "See /docs for the API.").response(
            headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return HTTPError(500, "internal_error", f"{type(exc).__name__}: {exc}").response()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("labkit.server").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, Any]:
        up = service.upstream.describe() if service.upstream else {}
        return {"ok": True, "upstream": up, "store": getattr(service.store, "url", None)}

    @app.post(
        "/chat/stream/{session_id}",
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": "SSE stream of JSON events.",
            },
            **_ERRORS,
        },
        summary="One turn, streamed as SSE",
    )
    async def chat_stream(session_id: str, body: ChatRequest) -> Any:
        """Stream a reply. ``session_id="new"`` starts a session (id in the
        ``X-Session-Id`` header and the first event)."""
        turn = await service.prepare(session_id, body)

        async def events() -> AsyncIterator[bytes]:
            async for ev in service.run(turn):
                yield encode_event(ev)

        return event_response(
            events(),
            headers={"X-Session-Id": turn.session_id},
            ping_seconds=settings.ping_seconds,
            on_close=lambda: service.finish(turn),
        )

    @app.post(
        "/chat/{session_id}", response_model=ChatReply, responses=_ERRORS, summary="One turn, JSON"
    )
    async def chat(session_id: str, body: ChatRequest) -> Any:
        """The same turn without streaming."""
        turn = await service.prepare(session_id, body)
        try:
            parts: list[str] = []
            error: dict[str, Any] | None = None
            done: dict[str, Any] = {}
            async for ev in service.run(turn):
                if "text" in ev:
                    parts.append(ev["text"])
                elif "error" in ev:
                    error = ev
                elif ev.get("done"):
                    done = ev
        finally:
            await service.finish(turn)
        headers = {"X-Session-Id": turn.session_id}
        if error is not None or not done.get("stored"):
            err = error or {"error": "api_error", "message": "The turn failed.", "hint": ""}
            status = _status_of(err["error"])
            return JSONResponse(
                {**err, "session_id": turn.session_id}, status_code=status, headers=headers
            )
        stored = await service._io(service.store.load_turns, turn.session_id, 1)
        reply = stored[-1].assistant if stored else "".join(parts)
        return JSONResponse(
            ChatReply(
                session_id=turn.session_id,
                reply=reply,
                turn_count=done["turn_count"],
                usage=Usage(**done["usage"]),
                context=done["context"],
            ).model_dump(),
            headers=headers,
        )

    @app.get("/sessions", summary="List sessions")
    async def list_sessions() -> dict[str, Any]:
        infos = await service._io(service.store.list_sessions)
        return {"sessions": [i.to_dict() for i in infos]}

    @app.get("/sessions/{session_id}/history", responses=_ERRORS, summary="A session's history")
    async def history(session_id: str) -> dict[str, Any]:
        service.check_id(session_id)

        def load() -> dict[str, Any]:
            info = service.store.get_session(session_id)
            turns = service.store.load_turns(session_id)
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

        return await service._io(load)

    @app.get("/sessions/{session_id}/stats", responses=_ERRORS, summary="A session's stats")
    async def stats(session_id: str) -> dict[str, Any]:
        """Turn count, tokens, age, and the context strategy of the last turn."""
        service.check_id(session_id)

        def load() -> dict[str, Any]:
            info = service.store.get_session(session_id)
            last = service.store.load_turns(session_id, 1)
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
                    "budget_tokens": settings.context_budget,
                    "keep_turns": settings.keep_turns,
                },
                "last_turn_context": (last[-1].meta.get("context") if last else None),
            }

        return await service._io(load)

    @app.delete("/sessions/{session_id}", responses=_ERRORS, summary="Delete a session")
    async def delete(session_id: str) -> dict[str, Any]:
        service.check_id(session_id)
        if session_id in service._busy:
            raise _translate(SessionBusyError(f"Session {session_id} is answering a message."))

        def drop() -> bool:
            service.store.get_session(session_id)
            with service.store.turn_lock(session_id, lease_s=30):
                return service.store.delete_session(session_id)

        try:
            deleted = await service._io(drop)
        except SessionBusyError:
            raise _translate(
                SessionBusyError(f"Session {session_id} is answering a message.")
            ) from None
        return {"session_id": session_id, "deleted": deleted}

    return app


def _status_of(error: str) -> int:
    for name, status, _hint in _UPSTREAM_TYPES.values():
        if name == error:
            return status
    return {"timeout": 504, "connection_error": 502, "empty_reply": 502}.get(error, 502)
