"""The one adapter to the model APIs: build a request for either official SDK, send it
(streamed or not, sync or async), normalise the reply's usage, and map SDK failures to
:class:`~labkit.errors.UpstreamError`.

``history``, ``timing`` and the chat server all talk to a model through this module;
none of them builds request keyword arguments or catches SDK exceptions itself. Clients
are always passed in (``labkit.providers`` or the caller builds them): this module never
starts a model or reads a key.

Notes (deliberate choices):

1. **The wire format follows the client.** A call takes an ``anthropic.Anthropic`` /
   ``AsyncAnthropic`` or an ``openai.OpenAI`` / ``AsyncOpenAI`` client and speaks that
   SDK's format (:func:`api_of`). Anthropic takes ``system`` as a top-level field and
   ``temperature`` through ``extra_body`` (the 2026 SDKs dropped the keyword); OpenAI
   takes the system prompt as the first message and ``temperature`` as a keyword.
2. **Input tokens mean the whole prompt sent.** Anthropic reports cache reads and cache
   writes apart from ``input_tokens``; :class:`Reply.input_tokens` adds them back, so the
   figure grows with the history sent whether or not a prompt cache served part of it.
   ``Reply.cached_tokens`` is the cached part (Anthropic ``cache_read_input_tokens``,
   OpenAI ``prompt_tokens_details.cached_tokens``). A server that sends no usage at all
   (some OpenAI-compatible servers ignore ``stream_options.include_usage``) gives
   ``usage_reported=False`` and zeros: callers must not show those zeros as measured.
3. **Streams relay the server's events as JSON.** A streamed request goes through the
   SDK's own request path (``client.post`` with ``stream=True``: auth headers, retries,
   timeouts, its SSE decoder, ``event: error`` raised as ``APIStatusError``) with
   ``cast_to=object``, so each event stays the JSON object the server sent, and is
   folded by a pure accumulator (:class:`MessageAccumulator`, :class:`ChunkAccumulator`).
   The SDK's ``messages.stream`` helper would build a pydantic model per event and copy
   a message snapshot per delta; under the chat server's load that was the largest cost
   of a relayed turn (``benchmarks/chat_api.py``, profile in its docstring). Skipping it
   also keeps a stream readable when a server breaks the event order (llama.cpp's
   ``llama-server`` sometimes sends no ``message_start``, which the SDK helper meets with
   a bare ``AssertionError``). OpenAI's ``.stream()`` helper is not used either: it
   parses every chunk twice and raises ``LengthFinishReasonError`` at ``max_tokens``,
   which is an ordinary stop here.
4. **One error taxonomy.** Every SDK error (``APIError`` of either SDK, which includes
   connection errors and timeouts) and every transport error of the HTTP library under
   the SDKs (``httpx`` or, in the late-2026 SDKs, ``httpx2``; a connection dropped
   mid-stream surfaces as one of those) becomes an ``UpstreamError`` with a ``kind``, the
   HTTP ``status`` a relaying server should answer, and a hint (:func:`translate`).
   Cancellation (a client going away) is not an error and passes through untouched.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigurationError, UpstreamError

__all__ = [
    "AsyncTextStream",
    "ChunkAccumulator",
    "MessageAccumulator",
    "Reply",
    "Request",
    "TextStream",
    "UpstreamError",
    "acreate",
    "anthropic_input",
    "api_of",
    "astream",
    "create",
    "reply_from_completion",
    "reply_from_message",
    "sdk_errors",
    "stream",
    "translate",
]

Message = Mapping[str, Any]


# ── requests ──────────────────────────────────────────────────────────────────


def api_of(client: Any) -> str:
    """``"anthropic"`` or ``"openai"``: the wire format of an official SDK client (note 1)."""
    package = type(client).__module__.split(".", 1)[0]
    if package in ("anthropic", "openai"):
        return package
    raise ConfigurationError(
        f"Not an Anthropic or OpenAI SDK client: {type(client).__name__}.",
        hint="Pass a client from labkit.client(...) or from the anthropic/openai packages.",
    )


@dataclass(frozen=True)
class Request:
    """One request to a model, independent of the wire format."""

    model: str
    #: The conversation: ``{"role": "user" | "assistant", "content": ...}`` dicts.
    messages: Sequence[Message]
    max_tokens: int = 1024
    #: The system prompt ("" for none).
    system: str = ""
    #: Sampling temperature (None: the API's default).
    temperature: float | None = None
    #: Extra HTTP headers (e.g. ``x-labkit-cache: off`` for labkit's local API).
    extra_headers: Mapping[str, str] | None = None

    def kwargs(self, api: str, *, stream: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``messages.create``/``.stream`` (``api="anthropic"``) or
        ``chat.completions.create`` (``api="openai"``; ``stream=True`` asks for usage)."""
        kw: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens}
        if api == "anthropic":
            kw["messages"] = list(self.messages)
            if self.system:
                kw["system"] = self.system
            if self.temperature is not None:
                kw["extra_body"] = {"temperature": self.temperature}
        elif api == "openai":
            system = [{"role": "system", "content": self.system}] if self.system else []
            kw["messages"] = [*system, *self.messages]
            if self.temperature is not None:
                kw["temperature"] = self.temperature
            if stream:
                kw["stream"] = True
                kw["stream_options"] = {"include_usage": True}
        else:
            raise ConfigurationError(
                f"Unknown wire format {api!r}.", hint="Use anthropic or openai."
            )
        if self.extra_headers:
            kw["extra_headers"] = dict(self.extra_headers)
        return kw


# ── replies ───────────────────────────────────────────────────────────────────


@dataclass
class Reply:
    """A completed (or, from ``partial()``, interrupted) reply with normalised usage."""

    text: str
    #: Every prompt token the API read for this request, cached or not (note 2).
    input_tokens: int
    output_tokens: int
    #: Why generation stopped (``end_turn``, ``max_tokens``, ``stop``, ``length``...).
    stop_reason: str | None
    #: Of ``input_tokens``, those served from the API's prompt cache.
    cached_tokens: int = 0
    #: False when the server sent no usage: the token figures are then zeros, not counts.
    usage_reported: bool = True
    #: The SDK's final object (``Message`` or ``ChatCompletion``), for callers that need more.
    raw: Any = field(default=None, repr=False)


def anthropic_input(usage: Any) -> tuple[int, int]:
    """``(all prompt tokens, cache reads)`` of an Anthropic ``Usage`` (note 2)."""
    cached = getattr(usage, "cache_read_input_tokens", 0) or 0
    created = getattr(usage, "cache_creation_input_tokens", 0) or 0
    return (getattr(usage, "input_tokens", 0) or 0) + cached + created, cached


def reply_from_message(msg: Any) -> Reply:
    """A :class:`Reply` from an Anthropic ``Message``."""
    text = "".join(b.text for b in msg.content if getattr(b, "type", "") == "text")
    usage = getattr(msg, "usage", None)
    if usage is None:
        return Reply(text, 0, 0, msg.stop_reason, usage_reported=False, raw=msg)
    total, cached = anthropic_input(usage)
    return Reply(text, total, usage.output_tokens or 0, msg.stop_reason, cached, raw=msg)


def _openai_usage(usage: Any) -> tuple[int, int, int]:
    details = getattr(usage, "prompt_tokens_details", None)
    return (
        getattr(usage, "prompt_tokens", 0) or 0,
        getattr(usage, "completion_tokens", 0) or 0,
        getattr(details, "cached_tokens", 0) or 0,
    )


def reply_from_completion(completion: Any) -> Reply:
    """A :class:`Reply` from an OpenAI ``ChatCompletion``."""
    choice = completion.choices[0]
    text = choice.message.content or ""
    if completion.usage is None:
        return Reply(text, 0, 0, choice.finish_reason, usage_reported=False, raw=completion)
    prompt, output, cached = _openai_usage(completion.usage)
    return Reply(text, prompt, output, choice.finish_reason, cached, raw=completion)


def _as_dict(event: Any) -> Mapping[str, Any]:
    """An event or chunk as the JSON object the server sent (SDK models are dumped)."""
    if isinstance(event, Mapping):
        return event
    return event.model_dump(exclude_none=True)


class ChunkAccumulator:
    """Folds OpenAI chat-completion chunks into a :class:`Reply` (note 3): the JSON
    objects the server sent, or the SDK's ``ChatCompletionChunk`` models.

    ``add(chunk)`` returns the chunk's text delta ("" when it has none: a role-only first
    chunk, a ``None`` content, or a usage chunk whose ``choices`` list is empty).
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.usage: Mapping[str, Any] | None = None
        self.finish_reason: str | None = None

    def add(self, chunk: Any) -> str:
        chunk = _as_dict(chunk)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        text = ""
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                text += delta
        if text:
            self.parts.append(text)
        return text

    def reply(self) -> Reply:
        text = "".join(self.parts)
        if self.usage is None:
            return Reply(text, 0, 0, self.finish_reason, usage_reported=False)
        details = self.usage.get("prompt_tokens_details") or {}
        return Reply(
            text,
            self.usage.get("prompt_tokens") or 0,
            self.usage.get("completion_tokens") or 0,
            self.finish_reason,
            details.get("cached_tokens") or 0,
        )


class MessageAccumulator:
    """Folds Anthropic stream events (``message_start`` … ``message_stop``, as the JSON
    objects the server sent or as SDK models) into a :class:`Reply` (note 3).

    ``add(event)`` returns the event's text delta ("" for every other event). Usage comes
    from ``message_start`` and is updated by ``message_delta``, as the SDK's own
    accumulator does; a stream that carried no prompt count (no ``message_start``, or no
    usage at all) gives ``usage_reported=False`` rather than a zero that looks measured.
    A server that omits ``message_start`` (llama.cpp's ``llama-server`` sometimes does)
    still yields its text: :attr:`saw_message_start` records the lapse.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.usage: dict[str, Any] = {}
        self.stop_reason: str | None = None
        self.saw_message_start = False

    def add(self, event: Any) -> str:
        event = _as_dict(event)
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            text = delta.get("text") if delta.get("type") == "text_delta" else None
            if text:
                self.parts.append(text)
                return text
            return ""
        if kind == "message_start":
            self.saw_message_start = True
            message = event.get("message") or {}
            self.usage.update(_given(message.get("usage")))
            self.stop_reason = message.get("stop_reason") or self.stop_reason
        elif kind == "message_delta":
            self.usage.update(_given(event.get("usage")))
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
        return ""

    def reply(self) -> Reply:
        text = "".join(self.parts)
        if self.usage.get("input_tokens") is None:
            # No prompt count (no message_start, or a server that sends no usage): output
            # tokens alone would store a measured-looking zero for the prompt.
            return Reply(text, 0, 0, self.stop_reason, usage_reported=False)
        cached = self.usage.get("cache_read_input_tokens") or 0
        created = self.usage.get("cache_creation_input_tokens") or 0
        total = (self.usage.get("input_tokens") or 0) + cached + created
        return Reply(text, total, self.usage.get("output_tokens") or 0, self.stop_reason, cached)


def _given(usage: Mapping[str, Any] | None) -> dict[str, Any]:
    """The usage fields a server actually sent (``None`` means not sent)."""
    return {k: v for k, v in (usage or {}).items() if v is not None}


# ── errors ────────────────────────────────────────────────────────────────────

#: API error type → (kind, HTTP status for a relaying server, hint).
_KINDS: dict[str, tuple[str, int, str]] = {
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
    "authentication_error": ("authentication", 502, "Check the API key."),
    "permission_error": ("permission", 502, "Check the API key and its access to the model."),
    "not_found_error": ("model_not_found", 502, "Check the model name and the base URL."),
    "request_too_large": (
        "request_too_large",
        502,
        "The conversation is too large for the model API.",
    ),
    "api_error": ("api_error", 502, "The model API failed. Resend the message."),
}
_STATUS_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
#: OpenAI's ``code``/``type`` names for the same failures.
_ALIASES = {
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "invalid_request": "invalid_request_error",
    "server_error": "api_error",
}


def _httpx_modules() -> list[Any]:
    import httpx

    mods = [httpx]
    try:  # the SDKs of late 2026 are built on httpx2
        import httpx2

        mods.append(httpx2)
    except ImportError:  # pragma: no cover - older SDKs
        pass
    return mods


def sdk_errors() -> tuple[type[BaseException], ...]:
    """Every exception type :func:`translate` maps (note 4)."""
    import anthropic
    import openai

    return (anthropic.APIError, openai.APIError, *(m.HTTPError for m in _httpx_modules()))


def _error_type(exc: BaseException) -> tuple[str | None, str | None]:
    """``(API error type, API message)`` from an SDK error's body, when it names a known one.

    Anthropic bodies are ``{"type": "error", "error": {"type", "message"}}``; the OpenAI
    SDK keeps the inner object, ``{"message", "type", "code"}``, whose ``type`` may be a
    generic word (``"requests"``) and whose ``code`` the specific one."""
    body = getattr(exc, "body", None)
    if not isinstance(body, dict):
        return None, None
    inner = body.get("error") if isinstance(body.get("error"), dict) else body
    for name in (inner.get("type"), inner.get("code")):
        if isinstance(name, str):
            name = _ALIASES.get(name, name)
            if name in _KINDS:
                return name, inner.get("message")
    return None, inner.get("message")


def translate(exc: BaseException) -> UpstreamError:
    """An :class:`UpstreamError` for an SDK or transport exception (note 4)."""
    import anthropic
    import openai

    status = getattr(exc, "status_code", None)
    kind, detail = _error_type(exc)
    if kind is None and status is not None:
        kind = _STATUS_KINDS.get(status, "api_error")
    if kind is not None:
        name, http, hint = _KINDS[kind]
        msg = detail or getattr(exc, "message", None) or str(exc)
        # An error event inside a streamed 200 response carries the stream's status.
        where = f" ({status})" if status and status >= 400 else " mid-stream" if status else ""
        return UpstreamError(
            f"The model API failed{where}: {kind}: {msg}",
            hint=hint,
            kind=name,
            status=http,
            upstream_status=status,
        )
    mods = _httpx_modules()
    timeouts = (anthropic.APITimeoutError, openai.APITimeoutError)
    if isinstance(exc, timeouts + tuple(m.TimeoutException for m in mods)):
        return UpstreamError(
            "The model API did not answer in time.",
            hint="Resend the message.",
            kind="timeout",
            status=504,
        )
    cause = exc.__cause__ or exc.__context__
    why = f" ({type(cause).__name__}: {str(cause) or 'no detail'})" if cause is not None else ""
    return UpstreamError(
        f"The connection to the model API failed: {exc or type(exc).__name__}{why}",
        hint="Resend the message; if it keeps failing, check that the model API is running.",
        kind="connection_error",
        status=502,
    )


# ── calls ─────────────────────────────────────────────────────────────────────


def create(client: Any, request: Request) -> Reply:
    """Send ``request`` without streaming; the whole reply."""
    api = api_of(client)
    try:
        if api == "anthropic":
            return reply_from_message(client.messages.create(**request.kwargs(api)))
        return reply_from_completion(client.chat.completions.create(**request.kwargs(api)))
    except sdk_errors() as exc:
        raise translate(exc) from exc


async def acreate(client: Any, request: Request) -> Reply:
    """Async twin of :func:`create` (``AsyncAnthropic`` / ``AsyncOpenAI`` client)."""
    api = api_of(client)
    try:
        if api == "anthropic":
            return reply_from_message(await client.messages.create(**request.kwargs(api)))
        completion = await client.chat.completions.create(**request.kwargs(api))
        return reply_from_completion(completion)
    except sdk_errors() as exc:
        raise translate(exc) from exc


def _accumulator(api: str) -> ChunkAccumulator | MessageAccumulator:
    return MessageAccumulator() if api == "anthropic" else ChunkAccumulator()


def _raw_stream_call(client: Any, request: Request, stream_cls: Any) -> tuple[str, dict[str, Any]]:
    """``client.post`` arguments for a streamed request whose events stay JSON (note 3)."""
    api = api_of(client)
    kw = request.kwargs(api, stream=True)
    headers = kw.pop("extra_headers", None)
    extra = kw.pop("extra_body", {})
    body = {**kw, **extra, "stream": True}
    path = "/v1/messages" if api == "anthropic" else "/chat/completions"
    options = {"headers": headers} if headers else {}
    return path, {
        "body": body,
        "options": options,
        "cast_to": object,
        "stream": True,
        "stream_cls": stream_cls[object],
    }


class TextStream:
    """An open streamed reply: iterate ``text_stream``, then call ``reply()``."""

    def __init__(self, api: str, events: Any) -> None:
        self.api = api
        self._events = events
        self._acc = _accumulator(api)
        self.text_stream: Iterator[str] = self._texts()

    def _texts(self) -> Iterator[str]:
        for event in self._events:
            text = self._acc.add(event)
            if text:
                yield text

    def reply(self) -> Reply:
        """The final reply (drains whatever the caller did not read)."""
        for _ in self.text_stream:
            pass
        return self._acc.reply()

    def partial(self) -> Reply:
        """What arrived so far, for a stream that failed or was abandoned."""
        return self._acc.reply()


class AsyncTextStream:
    """Async twin of :class:`TextStream`."""

    def __init__(self, api: str, events: Any) -> None:
        self.api = api
        self._events = events
        self._acc = _accumulator(api)
        self.text_stream: AsyncIterator[str] = self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        async for event in self._events:
            text = self._acc.add(event)
            if text:
                yield text

    async def reply(self) -> Reply:
        async for _ in self.text_stream:
            pass
        return self._acc.reply()

    def partial(self) -> Reply:
        return self._acc.reply()


def _stream_classes(api: str) -> tuple[Any, Any]:
    if api == "anthropic":
        from anthropic import AsyncStream, Stream
    else:
        from openai import AsyncStream, Stream
    return Stream, AsyncStream


@contextmanager
def stream(client: Any, request: Request) -> Iterator[TextStream]:
    """Open one streamed request; leaving the block closes the HTTP response, which is how
    an abandoned stream stops the model. SDK failures, at the start or mid-stream inside
    the block, are raised as :class:`UpstreamError`."""
    api = api_of(client)
    try:
        path, kw = _raw_stream_call(client, request, _stream_classes(api)[0])
        events = client.post(path, **kw)
        with events:
            yield TextStream(api, events)
    except sdk_errors() as exc:
        raise translate(exc) from exc


@asynccontextmanager
async def astream(client: Any, request: Request) -> AsyncIterator[AsyncTextStream]:
    """Async twin of :func:`stream`."""
    api = api_of(client)
    try:
        path, kw = _raw_stream_call(client, request, _stream_classes(api)[1])
        events = await client.post(path, **kw)
        async with events:
            yield AsyncTextStream(api, events)
    except sdk_errors() as exc:
        raise translate(exc) from exc
