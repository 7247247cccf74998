"""The Anthropic Messages wire format: request validation, SSE events, Message objects.

Notes:

1. Wire objects are the SDK's own pydantic types (``anthropic.types``), dumped with
   ``exclude_unset`` so that the fields set to ``None`` on purpose are sent as
   ``null`` (``stop_reason: null`` in ``message_start``, as the real API sends) and
   the fields never set (newer optional ones) are left out.
2. Each SSE frame is formatted once, as bytes, and handed to sse-starlette unchanged
   (its cheapest path; see ``app.py``).
3. The text content block is opened lazily at the first piece of text, because a
   forced tool call starts with a ``tool_use`` block instead.
4. Validation messages follow the real API's wording where it is known
   (``prompt is too long: N tokens > M maximum``), and otherwise say what is wrong.
5. Every request field is accounted for (:data:`FIELDS`): implemented, without effect
   by nature here (``metadata``, ``service_tier``, routing and caching hints: the
   prefix cache is automatic), or refused with a 400 that names it when set to
   something the local model cannot do (``thinking`` enabled, ``output_config.effort``,
   server tools, ``container``, ``mcp_servers``...). Unknown fields are refused as the
   real API refuses them ("Extra inputs are not permitted"). ``temperature``, ``top_p``,
   ``top_k`` and labkit's own ``seed`` are read from the body (``extra_body``).
6. Forced tool use (``tool_choice`` ``any``/``tool``) and ``output_config.format``
   (``json_schema``, what ``messages.parse(output_format=...)`` sends) promise JSON
   valid against a schema; the schemas are checked by ``schema.check_schema`` (a 400
   names what cannot be constrained) and the engine keeps the promise.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from anthropic.types import (
    InputJSONDelta,
    Message,
    MessageDeltaUsage,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    ToolUseBlock,
    Usage,
)
from anthropic.types.raw_message_delta_event import Delta

from .engine import (
    ChatMessage,
    EngineError,
    Event,
    Finished,
    GenerationRequest,
    Started,
    TextPiece,
    ToolInput,
    ToolSpec,
    ToolStart,
)
from .schema import check_schema

__all__ = [
    "FIELDS",
    "collect_message",
    "error_body",
    "frame",
    "parse_messages_request",
    "stream_frames",
    "text_delta_frame",
]


def _invalid(message: str) -> EngineError:
    return EngineError("invalid_request_error", message)


#: Request fields the local API knows (note 5); any other is refused with a 400.
FIELDS = (
    # implemented
    "model",
    "messages",
    "max_tokens",
    "system",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "tools",
    "tool_choice",
    "output_config",
    # no effect by nature on a local model (or refused below when set to something it cannot do)
    "metadata",
    "service_tier",
    "inference_geo",
    "speed",
    "cache_control",
    "user_profile_id",
    "workspace_id",
    "diagnostics",
    "thinking",
    "container",
    "mcp_servers",
    "context_management",
)

#: Fields refused whenever they are set (not null).
_REFUSED = {
    "container": "code execution containers",
    "mcp_servers": "MCP servers",
    "context_management": "server-side context management",
}


def _check_fields(body: dict[str, Any]) -> None:
    for key in body:
        if key not in FIELDS:
            raise _invalid(f"{key}: Extra inputs are not permitted")
    for key, what in _REFUSED.items():
        if body.get(key) not in (None, [], {}):
            raise _invalid(f"{key}: the local API has no {what}; remove {key}.")
    thinking = body.get("thinking")
    if thinking is not None and (
        not isinstance(thinking, dict) or thinking.get("type") != "disabled"
    ):
        raise _invalid(
            "thinking: the local model (SmolLM2-135M-Instruct) has no extended thinking; "
            'remove thinking or send {"type": "disabled"}.'
        )


def _output_format(body: dict[str, Any]) -> dict[str, Any] | None:
    config = body.get("output_config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _invalid("output_config: Input should be an object")
    for key in config:
        if key not in ("format", "effort"):
            raise _invalid(f"output_config.{key}: Extra inputs are not permitted")
    if config.get("effort") is not None:
        raise _invalid("output_config.effort: the local model has no effort levels; remove effort.")
    fmt = config.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _invalid("output_config.format.type: Input should be 'json_schema'")
    if not isinstance(fmt.get("schema"), dict):
        raise _invalid("output_config.format.schema: Field required (a JSON Schema object)")
    return check_schema(fmt["schema"], "output_config.format.schema")


def error_body(error_type: str, message: str) -> dict[str, Any]:
    """The JSON body of an Anthropic error (HTTP body or SSE ``error`` event)."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def frame(event: str, payload: Any) -> bytes:
    """One SSE frame with an ``event:`` name."""
    if hasattr(payload, "model_dump_json"):
        data = payload.model_dump_json(exclude_unset=True)
    else:
        data = json.dumps(payload, separators=(",", ":"))
    return f"event: {event}\ndata: {data}\n\n".encode()


_encode_str = json.JSONEncoder(ensure_ascii=False).encode


def text_delta_frame(index: int, text: str) -> bytes:
    """The ``content_block_delta`` frame of a text piece, the one frame sent per token.

    Byte for byte what :func:`frame` makes of ``RawContentBlockDeltaEvent(index=index,
    delta=TextDelta(text=text))`` (the test suite checks), without building the models.
    """
    return (
        'event: content_block_delta\ndata: {"delta":{"text":'
        f'{_encode_str(text)},"type":"text_delta"}},"index":{index},"type":"content_block_delta"}}\n\n'
    ).encode()


def _block_text(block: Any, where: str) -> str:
    if not isinstance(block, dict):
        raise _invalid(f"{where}: each content block must be an object.")
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        if not isinstance(text, str):
            raise _invalid(f"{where}.text: Field required (a string).")
        return text
    if kind == "tool_use":
        return f"[tool call {block.get('name')}: {json.dumps(block.get('input', {}))}]"
    if kind == "tool_result":
        content = block.get("content", "")
        if isinstance(content, list):
            content = "\n".join(_block_text(b, where + ".content") for b in content)
        return f"[tool result: {content}]"
    if kind in ("image", "document"):
        return f"[{kind} omitted: the local model reads text only]"
    if kind in ("thinking", "redacted_thinking"):
        return ""
    raise _invalid(f"{where}.type: unknown content block type {kind!r}.")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_block_text(b, f"{where}.{i}") for i, b in enumerate(content))
    raise _invalid(f"{where}: content must be a string or a list of content blocks.")


def _system_text(system: Any) -> str:
    if system is None:
        return ""
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "".join(_block_text(b, f"system.{i}") for i, b in enumerate(system))
    raise _invalid("system: must be a string or a list of text blocks.")


def parse_messages(body: dict[str, Any]) -> tuple[str, list[ChatMessage], str]:
    """``(system, messages, prefill)`` from a Messages request body, validated."""
    messages = body.get("messages")
    if messages is None:
        raise _invalid("messages: Field required")
    if not isinstance(messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not messages:
        raise _invalid("messages: at least one message is required")
    out: list[ChatMessage] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid(f"messages.{i}: Input should be an object with role and content")
        role = m.get("role")
        if role == "system":
            raise _invalid(
                f'messages.{i}.role: Unexpected role "system". The Messages API accepts a '
                'top-level `system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            raise _invalid(
                f"messages.{i}.role: Input should be 'user' or 'assistant' (got {role!r})"
            )
        if "content" not in m:
            raise _invalid(f"messages.{i}.content: Field required")
        text = _content_text(m["content"], f"messages.{i}.content")
        if out and out[-1].role == role:  # the real API merges consecutive same-role turns
            out[-1] = ChatMessage(role, out[-1].text + "\n\n" + text)
        else:
            out.append(ChatMessage(role, text))
    prefill = ""
    if out[-1].role == "assistant":
        prefill = out.pop().text
        if prefill != prefill.rstrip():
            raise _invalid("messages: final assistant content cannot end with trailing whitespace")
    return _system_text(body.get("system")), out, prefill


def parse_messages_request(
    body: Any, *, sim: dict[str, str], cache: bool, t0: float
) -> tuple[str, GenerationRequest]:
    """``(model, request)`` from a ``POST /v1/messages`` body, or EngineError (400)."""
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model: Field required")
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _invalid("max_tokens: Field required")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _invalid("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        raise _invalid(f"max_tokens: Input should be greater than or equal to 1 (got {max_tokens})")
    _check_fields(body)
    json_schema = _output_format(body)
    system, messages, prefill = parse_messages(body)
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or not 0.0 <= temperature <= 1.0
    ):
        raise _invalid("temperature: Input should be a number between 0 and 1")
    top_p = body.get("top_p")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0.0 <= top_p <= 1.0):
        raise _invalid("top_p: Input should be a number between 0 and 1")
    top_k = body.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise _invalid("top_k: Input should be a non-negative integer")
    stop = body.get("stop_sequences") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop_sequences: Input should be a list of strings")
    tools = []
    for i, t in enumerate(body.get("tools") or []):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise _invalid(f"tools.{i}.name: Field required")
        if t.get("type") not in (None, "custom"):
            raise _invalid(
                f"tools.{i}.type: {t['type']!r} is a server tool the local API does not run; "
                "define a client tool (name, description, input_schema) instead."
            )
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise _invalid(f"tools.{i}.input_schema: Field required (a JSON Schema object)")
        tools.append(ToolSpec(t["name"], t.get("description") or "", schema))
    choice = body.get("tool_choice")
    tool_choice, tool_name = None, None
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in (
            "auto",
            "any",
            "tool",
            "none",
        ):
            raise _invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        tool_choice = choice["type"]
        if tool_choice == "tool":
            tool_name = choice.get("name")
            if tool_name not in {t.name for t in tools}:
                raise _invalid(f"tool_choice.name: no tool named {tool_name!r} in tools")
        if tool_choice in ("any", "tool") and not tools:
            raise _invalid("tool_choice: a forcing tool_choice needs at least one tool in tools")
        for i, t in enumerate(tools):  # forced: the input schemas will be enforced (note 6)
            if tool_choice == "any" or (tool_choice == "tool" and t.name == tool_name):
                t.input_schema = check_schema(t.input_schema, f"tools.{i}.input_schema")
    # the Messages API has no seed; labkit reads one from the body (``extra_body={"seed": 7}``)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _invalid("seed: Input should be a valid integer")
    req = GenerationRequest(
        system=system,
        messages=messages,
        max_tokens=max_tokens,
        temperature=float(temperature) if temperature is not None else None,
        top_p=top_p,
        top_k=top_k,
        stop=stop,
        seed=seed,
        prefill=prefill,
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        json_schema=json_schema,
        json_hint=str(json_schema.get("title", "")) if json_schema else "",
        cache=cache,
        sim=sim,
        t0=t0,
    )
    return model, req


def partial_json(raw: str) -> Any:
    """``raw`` parsed, or as much of it as parses when ``max_tokens`` cut it short (as the
    SDK's stream accumulator reads ``input_json_delta`` pieces)."""
    import jiter

    try:
        return json.loads(raw)
    except ValueError:
        return jiter.from_json(raw.encode(), partial_mode="trailing-strings")


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def _usage(started: Started, output_tokens: int) -> Usage:
    return Usage(
        input_tokens=started.input_tokens - started.cached_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=started.cached_tokens,
        cache_creation_input_tokens=0,
    )


async def stream_frames(
    started: Started, events: AsyncIterator[Event], *, model: str, on_first: Any = None
) -> AsyncIterator[bytes]:
    """The SSE frames of one streamed Message, from an engine's events after Started.

    Raises what the engine raises (EngineError / DropConnection); the app turns an
    EngineError into an ``error`` event.
    """
    msg_id = new_message_id()
    start = Message(
        id=msg_id,
        type="message",
        role="assistant",
        model=model,
        content=[],
        stop_reason=None,
        stop_sequence=None,
        usage=_usage(started, 1),
    )
    yield frame("message_start", RawMessageStartEvent(type="message_start", message=start))
    yield frame("ping", {"type": "ping"})
    index = -1
    open_kind: str | None = None
    first = True
    async for ev in events:
        if isinstance(ev, TextPiece):
            if open_kind != "text":
                if open_kind is not None:
                    yield frame(
                        "content_block_stop",
                        RawContentBlockStopEvent(type="content_block_stop", index=index),
                    )
                index += 1
                open_kind = "text"
                yield frame(
                    "content_block_start",
                    RawContentBlockStartEvent(
                        type="content_block_start",
                        index=index,
                        content_block=TextBlock(type="text", text=""),
                    ),
                )
            if first and on_first is not None:
                on_first()
            first = False
            yield text_delta_frame(index, ev.text)
        elif isinstance(ev, ToolStart):
            if open_kind is not None:
                yield frame(
                    "content_block_stop",
                    RawContentBlockStopEvent(type="content_block_stop", index=index),
                )
            index += 1
            open_kind = "tool_use"
            if first and on_first is not None:
                on_first()
            first = False
            yield frame(
                "content_block_start",
                RawContentBlockStartEvent(
                    type="content_block_start",
                    index=index,
                    content_block=ToolUseBlock(type="tool_use", id=ev.id, name=ev.name, input={}),
                ),
            )
        elif isinstance(ev, ToolInput):
            yield frame(
                "content_block_delta",
                RawContentBlockDeltaEvent(
                    type="content_block_delta",
                    index=index,
                    delta=InputJSONDelta(type="input_json_delta", partial_json=ev.partial_json),
                ),
            )
        elif isinstance(ev, Finished):
            if open_kind is not None:
                yield frame(
                    "content_block_stop",
                    RawContentBlockStopEvent(type="content_block_stop", index=index),
                )
            usage = MessageDeltaUsage(
                output_tokens=ev.output_tokens,
                input_tokens=started.input_tokens - started.cached_tokens,
                cache_read_input_tokens=started.cached_tokens,
                cache_creation_input_tokens=0,
            )
            yield frame(
                "message_delta",
                RawMessageDeltaEvent(
                    type="message_delta",
                    delta=Delta(stop_reason=ev.stop_reason, stop_sequence=ev.stop_sequence),  # type: ignore[arg-type]
                    usage=usage,
                ),
            )
            yield frame("message_stop", RawMessageStopEvent(type="message_stop"))
            return


async def collect_message(
    started: Started, events: AsyncIterator[Event], *, model: str, on_first: Any = None
) -> dict[str, Any]:
    """The non-streaming Message (as a JSON-ready dict) from an engine's events."""
    content: list[Any] = []
    text: list[str] = []
    tool: dict[str, Any] | None = None
    finished: Finished | None = None

    def flush_text() -> None:
        if text:
            content.append(TextBlock(type="text", text="".join(text)))
            text.clear()

    first = True
    async for ev in events:
        if first and isinstance(ev, TextPiece | ToolStart) and on_first is not None:
            on_first()
            first = False
        if isinstance(ev, TextPiece):
            text.append(ev.text)
        elif isinstance(ev, ToolStart):
            flush_text()
            tool = {"id": ev.id, "name": ev.name, "json": []}
        elif isinstance(ev, ToolInput) and tool is not None:
            tool["json"].append(ev.partial_json)
        elif isinstance(ev, Finished):
            finished = ev
            break
    flush_text()
    if tool is not None:
        raw = "".join(tool["json"]) or "{}"
        content.append(
            ToolUseBlock(type="tool_use", id=tool["id"], name=tool["name"], input=partial_json(raw))
        )
    assert finished is not None
    msg = Message(
        id=new_message_id(),
        type="message",
        role="assistant",
        model=model,
        content=content,
        stop_reason=finished.stop_reason,  # type: ignore[arg-type]
        stop_sequence=finished.stop_sequence,
        usage=_usage(started, finished.output_tokens),
    )
    return msg.model_dump(mode="json", exclude_unset=True)
