"""The engine contract: what the local API's app asks of an engine, and how one is chosen.

An engine knows nothing about HTTP or wire formats. The wire modules turn a request
into a :class:`GenerationRequest`; the engine answers with an async stream of
:class:`Started`, :class:`TextPiece`, :class:`ToolStart`, :class:`ToolInput` and
:class:`Finished`, or raises :class:`EngineError` / :class:`DropConnection`. The two
engines are ``llama`` (:mod:`.llama`, the real SmolLM2 model) and ``sim``
(:mod:`.sim`, latency and faults on demand); :func:`make_engine` builds one by name.

Notes on deliberate choices:

1. Prompts are rendered as hand-written ChatML (:func:`render_chatml`, the GGUF's own
   template). No default system prompt is injected (the GGUF template's default one
   doubles the TTFT of a short question).
2. An :class:`EngineError` carries an error *type*, named as the Anthropic API names
   them (:data:`ERROR_TYPES`). The HTTP status each type is sent with and the error
   bodies of the two wire formats belong to the wire layer (``wire.py`` and the
   ``*_wire.py`` modules), not to engines.
3. Engine names are checked in one place, :func:`check_engine`, and each engine's
   options in one place, :func:`check_options`. :func:`make_engine` imports the
   engine's module only when asked, so the contract costs nothing to import and
   ``llama_cpp`` is loaded by the llama engine alone.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigurationError
from .constants import ENGINES

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = [
    "ERROR_TYPES",
    "ChatMessage",
    "DropConnection",
    "Engine",
    "EngineError",
    "Event",
    "Finished",
    "GenerationRequest",
    "Started",
    "TextPiece",
    "ToolInput",
    "ToolSpec",
    "ToolStart",
    "check_engine",
    "check_options",
    "engine_options",
    "forced_tool",
    "make_engine",
    "render_chatml",
]

#: The error types an engine (or the app) may report, as the Anthropic API names them (note 2).
ERROR_TYPES = (
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "request_too_large",
    "rate_limit_error",
    "api_error",
    "timeout_error",
    "overloaded_error",
)


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
    #: OpenAI's frequency penalty (-2..2; 0 is none).
    frequency_penalty: float = 0.0
    #: OpenAI's presence penalty (-2..2; 0 is none).
    presence_penalty: float = 0.0
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
    #: Constrain the text reply to JSON valid against this schema (checked by
    #: ``schema.check_schema``; ``{"type": "object"}`` for OpenAI's ``json_object``).
    json_schema: dict[str, Any] | None = None
    #: What the JSON reply is (a schema's name and description), for the model's prompt.
    json_hint: str = ""
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
    """A failure to report to the client with the API's own error type (note 2)."""

    def __init__(
        self, error_type: str, message: str, *, code: str | None = None, param: str | None = None
    ) -> None:
        if error_type not in ERROR_TYPES:
            raise ConfigurationError(
                f"Unknown error type {error_type!r}.",
                hint=f"Use one of: {', '.join(ERROR_TYPES)} (or 'disconnect' for fail_with).",
            )
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        #: A machine-readable code for OpenAI's error body (e.g. ``context_length_exceeded``).
        self.code = code
        #: The request parameter at fault, for OpenAI's error body.
        self.param = param


class DropConnection(Exception):
    """Close the connection without a proper response (an injected network failure)."""


class Engine(Protocol):
    """What the app needs from an engine."""

    name: str
    context_window: int
    #: Whether the engine reuses a cached prompt prefix when a request allows it
    #: (the app echoes the honoured state in the ``x-labkit-cache`` response header).
    prefix_cache: bool

    def count_tokens(self, req: GenerationRequest) -> int:
        """Exact prompt tokens for ``req`` (what ``stream`` would feed)."""
        ...

    def stream(self, req: GenerationRequest) -> AsyncIterator[Event]:
        """Started, then pieces, then Finished; or raise EngineError/DropConnection.

        A forced tool call (``tool_choice`` "any"/"tool") yields ToolStart and ToolInput
        pieces whose JSON is valid against the tool's input schema (unless cut by
        ``max_tokens``); a request with ``json_schema`` yields text that is such JSON.
        """
        ...


def forced_tool(req: GenerationRequest) -> ToolSpec | None:
    """The tool a request forces by name (``tool_choice="tool"``, or "any" with one tool)."""
    if req.tool_choice == "tool":
        return next(t for t in req.tools if t.name == req.tool_name)
    if req.tool_choice == "any" and len(req.tools) == 1:
        return req.tools[0]
    return None


def render_chatml(system: str, messages: list[ChatMessage], prefill: str = "") -> str:
    """The ChatML prompt for a conversation, ending in an open assistant turn (note 1)."""
    parts = []
    if system:
        parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m.role}\n{m.text}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n" + prefill)
    return "".join(parts)


# ── choosing an engine (note 3) ──────────────────────────────────────────────


def check_engine(name: str) -> str:
    """``name`` if it is one of :data:`~.constants.ENGINES`, else ConfigurationError."""
    if name not in ENGINES:
        raise ConfigurationError(
            f"Unknown engine {name!r}: the local API's engines are {', '.join(ENGINES)}.",
            hint="Use " + " or ".join(f"--engine {e}" for e in ENGINES) + ".",
        )
    return name


def engine_options(name: str) -> tuple[str, ...]:
    """The options engine ``name`` takes (as :func:`make_engine` keywords)."""
    if check_engine(name) == "sim":
        from .sim import SimOptions

        return tuple(f.name for f in fields(SimOptions))
    from .llama import LLAMA_OPTIONS

    return LLAMA_OPTIONS


def check_options(name: str, opts: dict[str, Any], *, spell: Callable[[str], str] = str) -> None:
    """ConfigurationError if ``opts`` holds an option engine ``name`` does not take.

    ``spell`` names an option in the message (the command line passes its flag names).
    """
    known = engine_options(name)
    unknown = [k for k in opts if k not in known]
    if not unknown:
        return
    owner = next(
        (e for e in ENGINES if e != name and all(k in engine_options(e) for k in unknown)), None
    )
    if owner is not None:
        hint = f"Those are {owner} options: use --engine {owner} (engine={owner!r}), or drop them."
    else:
        hint = f"The {name} engine takes: {', '.join(spell(k) for k in known)}."
    raise ConfigurationError(
        f"The {name} engine does not take {', '.join(spell(k) for k in unknown)}.", hint=hint
    )


def make_engine(name: str, *, metrics: Metrics | None = None, **opts: Any) -> Engine:
    """Build the ``llama`` or ``sim`` engine from options (as LocalAPIServer passes them)."""
    check_options(name, opts)
    if name == "sim":
        from .sim import SimEngine, SimOptions

        return SimEngine(SimOptions(**opts), metrics=metrics)
    from .llama import LlamaEngine

    return LlamaEngine(metrics=metrics, **opts)
