"""The local API: one FastAPI app speaking the Anthropic and OpenAI wire formats.

Notes on deliberate choices:

1. SSE goes through ``sse-starlette``'s ``EventSourceResponse`` fed with frames
   already formatted as bytes (its cheapest path). It gives keep-alive pings
   (Anthropic ``event: ping`` frames / OpenAI ``: ping`` comments every 15 s, for
   long prompt evaluations), disconnect detection, and ``aclose()`` of the body on
   disconnect, at close to the cost of a plain ``StreamingResponse``; FastAPI's own
   ``EventSourceResponse`` costs several times more CPU per event and is not used
   (both measured side by side in the project's shared facts).
2. Request bodies are parsed by hand (``json.loads`` + the wire modules), not by
   FastAPI's pydantic models, so that every rejection carries the API's own error
   body and status instead of FastAPI's 422.
3. The engine's first event (``Started``) is awaited *before* the response starts,
   so a failure before any byte (a queue error, ``fail_before``) becomes a real HTTP
   status the SDKs map to their exception classes; later failures become an SSE
   ``error`` event (Anthropic) or an ``{"error": …}`` data line (OpenAI).
4. An injected ``disconnect`` raises :class:`DropConnection` inside the response
   body after the headers, so uvicorn closes the socket mid-body; a log filter keeps
   that expected event out of the server log.
5. ``t0`` (request arrival) is stamped by the outermost ASGI middleware; the sim
   engine's deadlines and the TTFT metric start there.
6. A non-streaming request is watched for a client disconnect every 100 ms while the
   engine works (uvicorn does not cancel a handler whose client left), so a
   cancelled ``messages.create`` frees the model as a cancelled stream does.
7. The app remembers the last :data:`REQUEST_LOG_SIZE` JSON request bodies it read (a
   ring buffer: older ones drop out; a body over :data:`REQUEST_LOG_MAX_BODY` bytes is
   kept without its content) and reports them at ``GET /v1/labkit/requests``, so a test
   or an exercise checker can see exactly what a client sent, e.g. whether turn *n*
   carried the turns before it. Only this process's memory holds them, as the bytes
   received, parsed only when asked for: parsed, a 1 MB body of small JSON values takes
   over 20 MB (measured: 16 such bodies held 375 MiB when they were kept parsed).
8. Every response carries a request id (``request-id`` on Anthropic routes,
   ``x-request-id`` on OpenAI routes; ``wire.wire_format`` decides), stamped by the
   outermost middleware so that errors and unknown routes have one too. Errors are
   answered in the route's own format, 404s for unknown routes included.
9. Generation responses echo the prompt-cache state the request got in an
   ``x-labkit-cache: on|off`` header ("off" when the request asked for it, when the
   server runs with ``--no-cache``, and always on the sim engine, which has no cache),
   so a client measuring cold TTFT can check that the server honoured its header.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import anthropic_wire, openai_wire
from .constants import CONTEXT_WINDOW, MODEL_ID
from .engine import (
    DropConnection,
    Engine,
    EngineError,
    Event,
    GenerationRequest,
    Started,
)
from .limits import MAX_BODY_BYTES, BodyLimit, check_request, max_body_bytes
from .metrics import Metrics
from .sim import parse_sim_header
from .wire import (
    error_headers,
    error_status,
    new_request_id,
    request_id_header,
    wire_format,
)

__all__ = [
    "MAX_BODY_BYTES",
    "REQUEST_LOG_MAX_BODY",
    "REQUEST_LOG_SIZE",
    "accepts_model",
    "create_app",
]

#: Request bodies kept for ``GET /v1/labkit/requests`` (note 7).
REQUEST_LOG_SIZE = 64
#: Larger bodies are logged without their content (note 7).
REQUEST_LOG_MAX_BODY = 1024 * 1024

_PING_SECONDS = 15.0
_DISCONNECT_POLL_S = 0.1

#: Model id prefixes answered by the local model too, so that a client configured
#: for a paid provider (LABKIT_PROVIDER=anthropic + ANTHROPIC_BASE_URL) works here.
_ALIAS_PREFIXES = ("claude-", "gpt-", "chatgpt-", "o1", "o3", "o4")


def accepts_model(model: str) -> bool:
    """Whether the local API serves ``model`` (its own id, ``sim``, or a paid model's alias)."""
    return model in (MODEL_ID, "sim") or model.startswith(_ALIAS_PREFIXES)


class _DropFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, DropConnection):
                return False
            if isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0] if exc.exceptions else None
            else:
                exc = exc.__cause__ or exc.__context__
        return True


logging.getLogger("uvicorn.error").addFilter(_DropFilter())


class _Stamp:
    """Outermost ASGI middleware: stamp arrival time, count requests by status."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["labkit.t0"] = time.perf_counter()
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        fmt = wire_format(path, headers)
        request_id = new_request_id()
        scope["labkit.format"] = fmt
        scope["labkit.request_id"] = request_id
        id_header = (request_id_header(fmt).encode(), request_id.encode())

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests[(path, message["status"])] += 1
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        await self.app(scope, receive, counting_send)


def _drop_response() -> Response:
    async def body() -> AsyncIterator[bytes]:
        raise DropConnection()
        yield b""  # pragma: no cover - makes this an async generator

    return StreamingResponse(body(), media_type="application/json")


def create_app(
    engine: Engine, metrics: Metrics | None = None, *, request_log: int = REQUEST_LOG_SIZE
) -> Any:
    """The ASGI app serving ``engine``; it keeps the last ``request_log`` bodies (note 7)."""
    metrics = metrics or getattr(engine, "metrics", None) or Metrics()
    body_bound = max_body_bytes(engine.context_window)  # limits note 1
    received: collections.deque[dict[str, Any]] = collections.deque(maxlen=max(0, request_log))
    api = FastAPI(
        title="labkit local API",
        description="Anthropic Messages and OpenAI Chat Completions wire formats over a local engine.",
        version="1",
    )

    def is_openai(request: Request) -> bool:
        fmt = request.scope.get("labkit.format")
        if fmt is None:
            fmt = wire_format(request.url.path, request.headers)
        return fmt == "openai"

    def error_response(
        request: Request,
        error_type: str,
        message: str,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> Response:
        status = status or error_status(error_type)
        if is_openai(request):
            body = openai_wire.error_body(error_type, message, code=code, param=param)
        else:
            body = anthropic_wire.error_body(error_type, message)
            if "labkit.request_id" in request.scope:
                body["request_id"] = request.scope["labkit.request_id"]
        return JSONResponse(body, status_code=status, headers=error_headers(status))

    @api.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> Response:
        return error_response(request, exc.error_type, exc.message, code=exc.code, param=exc.param)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large"}.get(
            exc.status_code, "api_error"
        )
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status_code)
        where = f"{request.method} {request.url.path}"
        if exc.status_code == 404:
            message = (
                f"Invalid URL ({where}): the local API serves POST /v1/messages (Anthropic), "
                "POST /v1/chat/completions (OpenAI), GET /v1/models and GET /v1/models/{id}."
            )
        else:
            message = f"{where}: {exc.detail}"
        return error_response(request, kind, message, exc.status_code, code=code)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > body_bound:
            raise EngineError(
                "request_too_large", f"Request exceeds the maximum size of {body_bound} bytes."
            )
        raw = await request.body()
        if len(raw) > body_bound:
            raise EngineError(
                "request_too_large", f"Request exceeds the maximum size of {body_bound} bytes."
            )
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise EngineError(
                "invalid_request_error", f"The request body is not valid JSON: {exc}"
            ) from None
        if received.maxlen:
            received.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "received_at": time.time(),
                    "headers": {
                        k: v for k, v in request.headers.items() if k.startswith("x-labkit-")
                    },
                    "body": raw if len(raw) <= REQUEST_LOG_MAX_BODY else None,
                    "body_bytes": len(raw),
                }
            )
        check_request(body, engine.context_window)
        return body

    def request_options(request: Request) -> dict[str, Any]:
        sim = parse_sim_header(request.headers.get("x-labkit-sim")) if engine.name == "sim" else {}
        cache = request.headers.get("x-labkit-cache", "on").strip().lower() not in (
            "off",
            "0",
            "false",
            "no",
        )
        return {
            "sim": sim,
            "cache": cache,
            "t0": request.scope.get("labkit.t0", time.perf_counter()),
        }

    def check_model(model: str) -> None:
        if not accepts_model(model):
            raise EngineError(
                "not_found_error",
                f"model: {model} (the local API serves {MODEL_ID!r}; see GET /v1/models)",
            )

    def check_context(
        req: GenerationRequest, *, max_tokens_given: bool = True, openai: bool = False
    ) -> int:
        n = engine.count_tokens(req)
        window = engine.context_window
        if openai and (n > window or (max_tokens_given and n + req.max_tokens > window)):
            asked = (
                f" ({n} in the messages, {req.max_tokens} in the completion)"
                if max_tokens_given
                else ""
            )
            raise EngineError(
                "invalid_request_error",
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{n + (req.max_tokens if max_tokens_given else 0)} tokens{asked}. "
                "Please reduce the length of the messages or completion.",
                code="context_length_exceeded",
            )
        if n > window:
            raise EngineError(
                "invalid_request_error", f"prompt is too long: {n} tokens > {window} maximum"
            )
        if max_tokens_given and n + req.max_tokens > window:
            raise EngineError(
                "invalid_request_error",
                f"input length and `max_tokens` exceed context limit: {n} + {req.max_tokens} > "
                f"{engine.context_window}, decrease input length or `max_tokens` and try again",
            )
        if not max_tokens_given:
            req.max_tokens = max(1, engine.context_window - n)
        return n

    async def start(req: GenerationRequest) -> tuple[Started, AsyncIterator[Event]]:
        events = engine.stream(req).__aiter__()
        try:
            started = await events.__anext__()
        except BaseException:
            await events.aclose()
            raise
        assert isinstance(started, Started)
        metrics.prompt_tokens += started.input_tokens
        metrics.cached_prompt_tokens += started.cached_tokens
        return started, events

    def cache_header(req: GenerationRequest) -> dict[str, str]:
        """The prompt-cache state ``req`` gets, echoed to the client (note 8)."""
        on = bool(getattr(engine, "prefix_cache", False)) and req.cache
        return {"x-labkit-cache": "on" if on else "off"}

    def first_token_observer(t0: float) -> Callable[[], None]:
        return lambda: metrics.observe_ttft(time.perf_counter() - t0)

    def sse(
        frames: AsyncIterator[bytes],
        events: AsyncIterator[Event],
        on_error: Callable[[EngineError], bytes],
        ping: Callable[[], ServerSentEvent],
        headers: dict[str, str],
    ) -> Response:
        async def body() -> AsyncIterator[bytes]:
            metrics.active_streams += 1
            done = False
            try:
                async for chunk in frames:
                    yield chunk
                done = True
                metrics.streams_completed += 1
            except EngineError as exc:
                done = True
                metrics.streams_failed += 1
                yield on_error(exc)
            except DropConnection:
                done = True
                metrics.streams_failed += 1
                raise
            finally:
                metrics.active_streams -= 1
                if not done:
                    metrics.streams_cancelled += 1
                with anyio.CancelScope(shield=True):
                    await events.aclose()

        return EventSourceResponse(
            body(),
            ping=_PING_SECONDS,
            ping_message_factory=ping,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers},
        )

    async def non_stream(
        request: Request,
        events: AsyncIterator[Event],
        collect: Callable[[], Awaitable[dict[str, Any]]],
        headers: dict[str, str],
    ) -> Response:
        """Collect the whole reply; stop the engine if the client leaves meanwhile (note 6)."""
        task = asyncio.ensure_future(collect())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
                if done:
                    return JSONResponse(task.result(), headers=headers)
                if await request.is_disconnected():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    metrics.streams_cancelled += 1
                    return Response(status_code=499)
        except DropConnection:
            return _drop_response()
        finally:
            if not task.done():
                task.cancel()
            await events.aclose()

    # ── routes ───────────────────────────────────────────────────────────────

    @api.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "engine": engine.name,
            "model": MODEL_ID,
            "context_window": engine.context_window,
        }

    @api.get("/metrics")
    async def get_metrics() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/labkit/requests")
    async def received_requests(limit: int = 0) -> dict[str, Any]:
        """The request bodies received last, oldest first; ``limit`` keeps the newest n (note 7)."""
        entries = list(received)
        if limit > 0:
            entries = entries[-limit:]
        entries = [
            {**e, "body": None if e["body"] is None else json.loads(e["body"])} for e in entries
        ]
        return {"requests": entries, "capacity": received.maxlen}

    def model_entry(model_id: str = MODEL_ID) -> dict[str, Any]:
        """The one model, as both formats describe a model (Anthropic ModelInfo, OpenAI Model)."""
        created = datetime(2024, 11, 1, tzinfo=UTC)
        served = f"SmolLM2-135M-Instruct Q4_1 ({engine.name} engine)"
        return {
            "id": model_id,
            "type": "model",
            "object": "model",
            "display_name": served if model_id == MODEL_ID else f"{model_id}, served by {served}",
            "created_at": created.isoformat().replace("+00:00", "Z"),
            "created": int(created.timestamp()),
            "owned_by": "labkit",
            "context_window": CONTEXT_WINDOW,
        }

    @api.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_entry(model_id)

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        entry = model_entry()
        return {
            "object": "list",
            "data": [entry],
            "has_more": False,
            "first_id": MODEL_ID,
            "last_id": MODEL_ID,
        }

    @api.post("/v1/messages")
    async def messages(request: Request) -> Response:
        body = await read_json(request)
        model, req = anthropic_wire.parse_messages_request(body, **request_options(request))
        check_model(model)
        check_context(req)
        try:
            started, events = await start(req)
        except DropConnection:
            return _drop_response()
        on_first = first_token_observer(req.t0)
        if body.get("stream"):
            return sse(
                anthropic_wire.stream_frames(started, events, model=model, on_first=on_first),
                events,
                lambda exc: anthropic_wire.frame(
                    "error", anthropic_wire.error_body(exc.error_type, exc.message)
                ),
                lambda: ServerSentEvent(event="ping", data='{"type": "ping"}'),
                cache_header(req),
            )
        return await non_stream(
            request,
            events,
            lambda: anthropic_wire.collect_message(started, events, model=model, on_first=on_first),
            cache_header(req),
        )

    @api.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise EngineError("invalid_request_error", "The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise EngineError("invalid_request_error", "model: Field required")
        check_model(model)
        # the same fields as a Messages request: tools, tool_choice and output_config change
        # the prompt fed to the model (a forced tool's instruction), so they are counted;
        # max_tokens and stream, which change no count, are taken and not needed
        _, req = anthropic_wire.parse_messages_request(
            {**body, "max_tokens": 1}, **request_options(request)
        )
        return JSONResponse({"input_tokens": engine.count_tokens(req)})

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        model, req, include_usage = openai_wire.parse_chat_request(body, **request_options(request))
        check_model(model)
        given = body.get("max_completion_tokens", body.get("max_tokens")) is not None
        check_context(req, max_tokens_given=given, openai=True)
        try:
            started, events = await start(req)
        except DropConnection:
            return _drop_response()
        on_first = first_token_observer(req.t0)
        if body.get("stream"):
            return sse(
                openai_wire.stream_chunks(
                    started, events, model=model, include_usage=include_usage, on_first=on_first
                ),
                events,
                lambda exc: (
                    b"data: "
                    + json.dumps(openai_wire.error_body(exc.error_type, exc.message)).encode()
                    + b"\n\n"
                ),
                lambda: ServerSentEvent(comment="ping"),
                cache_header(req),
            )
        return await non_stream(
            request,
            events,
            lambda: openai_wire.collect_completion(started, events, model=model, on_first=on_first),
            cache_header(req),
        )

    @api.post("/v1/labkit/score")
    async def score(request: Request) -> Response:
        body = await read_json(request)
        scorer = getattr(engine, "score", None)
        if scorer is None:
            raise EngineError(
                "invalid_request_error",
                f"/v1/labkit/score needs the llama engine (this server runs {engine.name!r}).",
            )
        if not isinstance(body, dict):
            raise EngineError("invalid_request_error", "The request body must be a JSON object.")
        candidates = body.get("candidates")
        if (
            not isinstance(candidates, list)
            or not candidates
            or not all(isinstance(c, str) and c for c in candidates)
        ):
            raise EngineError(
                "invalid_request_error",
                "candidates: a non-empty list of non-empty strings is required",
            )
        system, msgs, prefill = anthropic_wire.parse_messages(body)
        if not isinstance(body.get("system") or "", str):
            raise EngineError("invalid_request_error", "system: must be a string or null")
        scores, counts = await scorer(system, msgs, prefill, candidates)
        return JSONResponse({"scores": scores, "tokens": counts})

    return _Stamp(BodyLimit(api, body_bound), metrics)
