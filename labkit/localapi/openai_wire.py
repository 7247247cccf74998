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
4. ``tool_choice="required"`` or a named function forces a tool call whose
   arguments are valid against the function's ``parameters`` (both engines; the
   llama engine constrains its output with a grammar). OpenAI has no assistant
   prefill, so a trailing assistant message is history.
5. Every request field is accounted for (:data:`FIELDS`): implemented
   (``response_format`` ``json_object``/``json_schema`` included), without effect by
   nature here (``metadata``, ``user``, ``store=false``, caching and routing hints,
   ``parallel_tool_calls``: at most one call is made), or refused with a 400 naming
   it when set to something the local API does not do (``logprobs``,
   ``logit_bias``, ``audio``, ``reasoning_effort``...). Unknown fields are refused as
   the real API refuses them ("Unrecognized request argument supplied").
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
from .schema import check_schema

__all__ = ["FIELDS", "collect_completion", "error_body", "parse_chat_request", "stream_chunks"]

#: Request fields the local API knows (note 5); any other is refused with a 400.
FIELDS = (
    # implemented
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "response_format",
    "frequency_penalty",
    "presence_penalty",
    # no effect by nature on a local model (or refused below when set to something it cannot do)
    "metadata",
    "user",
    "safety_identifier",
    "service_tier",
    "store",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "parallel_tool_calls",
    "modalities",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "audio",
    "prediction",
    "reasoning_effort",
    "verbosity",
    "web_search_options",
    "functions",
    "function_call",
    "moderation",
)

#: Fields refused whenever they are set (not null/false/empty), with what to do instead.
_REFUSED = {
    "logprobs": "token log-probabilities are not returned by the local API (POST "
    "/v1/labkit/score ranks candidate answers by log-likelihood on the llama engine)",
    "top_logprobs": "token log-probabilities are not returned by the local API",
    "logit_bias": "logit_bias takes token ids of OpenAI's tokenizers, which SmolLM2 does not use",
    "audio": "the local model has no audio output",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "SmolLM2-135M-Instruct is not a reasoning model",
    "verbosity": "verbosity is not supported by the local model",
    "web_search_options": "the local API has no web search",
    "functions": "the deprecated functions field is not supported; use tools",
    "function_call": "the deprecated function_call field is not supported; use tool_choice",
    "moderation": "the local API has no moderation",
    "store": "stored completions are not kept by the local API",
}

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


def _check_fields(body: dict[str, Any]) -> None:
    for key in body:
        if key not in FIELDS:
            raise EngineError(
                "invalid_request_error",
                f"Unrecognized request argument supplied: {key}",
                code="unknown_parameter",
                param=key,
            )
    for key, why in _REFUSED.items():
        if body.get(key) not in (None, False, 0, [], {}):
            raise EngineError(
                "invalid_request_error",
                f"Unsupported parameter: {key!r}: {why}; remove {key}.",
                code="unsupported_parameter",
                param=key,
            )
    modalities = body.get("modalities")
    if modalities not in (None, ["text"]):
        raise EngineError(
            "invalid_request_error",
            'Unsupported value: modalities: the local model answers in text only; use ["text"].',
            code="unsupported_value",
            param="modalities",
        )


def _response_format(
    body: dict[str, Any], messages: list[Any]
) -> tuple[dict[str, Any] | None, str]:
    """``(checked schema or None, hint)`` from ``response_format`` (note 5)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None, ""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, ""
    if kind == "json_object":
        if "json" not in json.dumps(messages).lower():
            raise _invalid(
                "'messages' must contain the word 'json' in some form, to use "
                "'response_format' of type 'json_object'."
            )
        return {"type": "object"}, ""
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise _invalid("response_format.json_schema.name: required")
        schema = spec.get("schema", {"type": "object"})
        hint = spec["name"] + (f": {spec['description']}" if spec.get("description") else "")
        return check_schema(schema, "response_format.json_schema.schema"), hint
    raise _invalid(
        f"response_format.type: must be 'text', 'json_object' or 'json_schema' (got {kind!r})"
    )


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
    _check_fields(body)
    json_schema, json_hint = _response_format(body, messages)
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
    penalties = {}
    for key in ("frequency_penalty", "presence_penalty"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not -2 <= value <= 2
        ):
            raise _invalid(f"{key}: must be a number between -2 and 2")
        penalties[key] = float(value or 0.0)
    tools: list[ToolSpec] = []
    for i, t in enumerate(body.get("tools") or []):
        fn = (t or {}).get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _invalid(f"tools[{i}].function.name: required")
        if t.get("type", "function") != "function":
            raise _invalid(
                f"tools[{i}].type: only 'function' tools are supported (got {t.get('type')!r})"
            )
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _invalid(f"tools[{i}].function.parameters: must be a JSON Schema object")
        tools.append(ToolSpec(fn["name"], fn.get("description") or "", params))
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
    for i, t in enumerate(tools):  # forced: the parameters will be enforced (note 4)
        if tool_choice == "any" or (tool_choice == "tool" and t.name == tool_name):
            t.input_schema = check_schema(t.input_schema, f"tools[{i}].function.parameters")
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
        json_schema=json_schema,
        json_hint=json_hint,
        cache=cache,
        **penalties,
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
