"""The OpenAI Chat Completions wire format: request validation, chunks, completions.

Notes:

1. Chunks are the SDK's own ``ChatCompletionChunk`` objects, dumped with
   ``exclude_unset``; ``finish_reason: null`` and ``content: ""`` in the role chunk
   are set on purpose, as the real API sends them.
2. The stream is: a role chunk (``delta.role = "assistant"``), content or
   ``tool_calls`` deltas, a chunk with ``finish_reason``, then — only with
   ``stream_options.include_usage`` — a chunk with empty ``choices`` and the usage
   (every earlier chunk then carries ``usage: null``), then ``data: [DONE]``.
3. Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; in a
   stream they arrive as a ``data:`` line holding that body, which the SDK raises as
   ``APIError``.
4. ``tool_choice="required"`` or a named function forces a tool call (sim engine);
   OpenAI has no assistant prefill, so a trailing assistant message is history.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as CompletionChoice
from openai.types.chat.chat_completion_chunk import (
    Choice,
    ChoiceDelta,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
)
from openai.types.chat.chat_completion_message_function_tool_call import (
    ChatCompletionMessageFunctionToolCall,
    Function,
)
from openai.types.completion_usage import PromptTokensDetails

from .constants import CONTEXT_WINDOW
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

__all__ = ["collect_completion", "error_body", "parse_chat_request", "stream_chunks"]

#: Anthropic error type → (OpenAI error type, code).
_OPENAI_ERRORS = {
    "invalid_request_error": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
    "permission_error": ("invalid_request_error", "permission_denied"),
    "not_found_error": ("invalid_request_error", "model_not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("requests", "rate_limit_exceeded"),
    "api_error": ("server_error", None),
    "timeout_error": ("server_error", "timeout"),
    "overloaded_error": ("server_error", "overloaded"),
}

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
}


def _invalid(message: str) -> EngineError:
    return EngineError("invalid_request_error", message)


def error_body(
    error_type: str, message: str, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body for one of labkit's (Anthropic-named) error types."""
    kind, default_code = _OPENAI_ERRORS.get(error_type, ("server_error", None))
    return {
        "error": {"message": message, "type": kind, "param": param, "code": code or default_code}
    }


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, p in enumerate(content):
            if not isinstance(p, dict):
                raise _invalid(f"{where}[{i}]: each content part must be an object.")
            if p.get("type") == "text":
                parts.append(str(p.get("text", "")))
            else:
                parts.append(f"[{p.get('type')} omitted: the local model reads text only]")
        return "".join(parts)
    raise _invalid(f"{where}: content must be a string or a list of content parts.")


def parse_chat_request(
    body: Any, *, sim: dict[str, str], cache: bool, t0: float, count: Any = None
) -> tuple[str, GenerationRequest, bool]:
    """``(model, request, include_usage)`` from a ``POST /v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("you must provide a model parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid(
            "messages: at least one message is required ('messages' must be a non-empty array)"
        )
    system_parts: list[str] = []
    out: list[ChatMessage] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid(f"messages[{i}]: must be an object with a role")
        role = m.get("role")
        if role in ("system", "developer"):
            system_parts.append(_content_text(m.get("content"), f"messages[{i}].content"))
            continue
        if role == "tool":
            text = f"[tool result: {_content_text(m.get('content'), f'messages[{i}].content')}]"
            role = "user"
        elif role in ("user", "assistant"):
            text = _content_text(m.get("content"), f"messages[{i}].content")
            for call in m.get("tool_calls") or []:
                fn = (call or {}).get("function") or {}
                text += f"[tool call {fn.get('name')}: {fn.get('arguments', '')}]"
        else:
            raise _invalid(
                f"messages[{i}].role: Invalid value {role!r}; supported values are 'system', "
                "'developer', 'user', 'assistant' and 'tool'."
            )
        if out and out[-1].role == role:
            out[-1] = ChatMessage(role, out[-1].text + "\n\n" + text)
        else:
            out.append(ChatMessage(role, text))
    if not out:
        raise _invalid("messages: at least one user message is required")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise _invalid(f"max_tokens: must be a positive integer (got {max_tokens!r})")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise _invalid("n: only n=1 is supported by the local API")
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, int | float) or not 0 <= temperature <= 2
    ):
        raise _invalid("temperature: must be a number between 0 and 2")
    top_p = body.get("top_p")
    if top_p is not None and (not isinstance(top_p, int | float) or not 0 <= top_p <= 1):
        raise _invalid("top_p: must be a number between 0 and 1")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _invalid("stop: must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and not isinstance(seed, int):
        raise _invalid("seed: must be an integer")
    tools: list[ToolSpec] = []
    for i, t in enumerate(body.get("tools") or []):
        fn = (t or {}).get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _invalid(f"tools[{i}].function.name: required")
        tools.append(ToolSpec(fn["name"], fn.get("description", ""), fn.get("parameters") or {}))
    choice = body.get("tool_choice")
    tool_choice, tool_name = None, None
    if choice == "required":
        tool_choice = "any"
    elif choice in ("auto", "none"):
        tool_choice = choice
    elif isinstance(choice, dict):
        tool_choice = "tool"
        tool_name = (choice.get("function") or {}).get("name")
        if tool_name not in {t.name for t in tools}:
            raise _invalid(f"tool_choice: no function named {tool_name!r} in tools")
    elif choice is not None:
        raise _invalid("tool_choice: must be 'none', 'auto', 'required' or a named function")
    if tool_choice in ("any", "tool") and not tools:
        raise _invalid("tool_choice: 'required' needs at least one tool")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    req = GenerationRequest(
        system="\n\n".join(system_parts),
        messages=out,
        max_tokens=max_tokens or CONTEXT_WINDOW,
        temperature=float(temperature) if temperature is not None else None,
        top_p=top_p,
        stop=stop,
        seed=seed,
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        cache=cache,
        sim=sim,
        t0=t0,
    )
    return model, req, include_usage


def _usage(started: Started, output_tokens: int) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=started.input_tokens,
        completion_tokens=output_tokens,
        total_tokens=started.input_tokens + output_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=started.cached_tokens),
    )


def _data(obj: Any) -> bytes:
    return b"data: " + obj.model_dump_json(exclude_unset=True).encode() + b"\n\n"


async def stream_chunks(
    started: Started,
    events: AsyncIterator[Event],
    *,
    model: str,
    include_usage: bool,
    on_first: Any = None,
) -> AsyncIterator[bytes]:
    """The ``data:`` frames of one streamed chat completion, ending with ``[DONE]``."""
    cid = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: ChoiceDelta, finish: str | None = None) -> bytes:
        return _data(
            ChatCompletionChunk(
                id=cid,
                object="chat.completion.chunk",
                created=created,
                model=model,
                choices=[Choice(index=0, delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
                **extra,
            )
        )

    yield chunk(ChoiceDelta(role="assistant", content=""))
    first = True
    tool_index = -1
    async for ev in events:
        if isinstance(ev, TextPiece):
            if first and on_first is not None:
                on_first()
            first = False
            yield chunk(ChoiceDelta(content=ev.text))
        elif isinstance(ev, ToolStart):
            if first and on_first is not None:
                on_first()
            first = False
            tool_index += 1
            call = ChoiceDeltaToolCall(
                index=tool_index,
                id="call_" + ev.id.removeprefix("toolu_"),
                type="function",
                function=ChoiceDeltaToolCallFunction(name=ev.name, arguments=""),
            )
            yield chunk(ChoiceDelta(tool_calls=[call]))
        elif isinstance(ev, ToolInput):
            call = ChoiceDeltaToolCall(
                index=tool_index, function=ChoiceDeltaToolCallFunction(arguments=ev.partial_json)
            )
            yield chunk(ChoiceDelta(tool_calls=[call]))
        elif isinstance(ev, Finished):
            yield chunk(ChoiceDelta(), _FINISH.get(ev.stop_reason, "stop"))
            if include_usage:
                yield _data(
                    ChatCompletionChunk(
                        id=cid,
                        object="chat.completion.chunk",
                        created=created,
                        model=model,
                        choices=[],
                        usage=_usage(started, ev.output_tokens),
                    )
                )
            yield b"data: [DONE]\n\n"
            return


async def collect_completion(
    started: Started, events: AsyncIterator[Event], *, model: str, on_first: Any = None
) -> dict[str, Any]:
    """The non-streaming ChatCompletion (as a JSON-ready dict)."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    finished: Finished | None = None
    first = True
    async for ev in events:
        if first and isinstance(ev, TextPiece | ToolStart) and on_first is not None:
            on_first()
            first = False
        if isinstance(ev, TextPiece):
            text.append(ev.text)
        elif isinstance(ev, ToolStart):
            calls.append(
                {"id": "call_" + ev.id.removeprefix("toolu_"), "name": ev.name, "args": []}
            )
        elif isinstance(ev, ToolInput) and calls:
            calls[-1]["args"].append(ev.partial_json)
        elif isinstance(ev, Finished):
            finished = ev
            break
    assert finished is not None
    tool_calls = [
        ChatCompletionMessageFunctionToolCall(
            id=c["id"],
            type="function",
            function=Function(name=c["name"], arguments="".join(c["args"])),
        )
        for c in calls
    ]
    message = ChatCompletionMessage(
        role="assistant",
        content="".join(text) if text or not calls else None,
        **({"tool_calls": tool_calls} if tool_calls else {}),
    )
    completion = ChatCompletion(
        id="chatcmpl-" + secrets.token_hex(12),
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[
            CompletionChoice(
                index=0,
                message=message,
                finish_reason=_FINISH.get(finished.stop_reason, "stop"),  # type: ignore[arg-type]
                logprobs=None,
            )
        ],
        usage=_usage(started, finished.output_tokens),
    )
    return completion.model_dump(mode="json", exclude_unset=True)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
