"""Lab 1: time to first token of a streamed request, total time of a plain one."""

from __future__ import annotations

import time
from typing import Any


def ttft(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """Milliseconds from just before the request to the first non-empty text delta."""
    start = time.perf_counter()
    with client.messages.stream(model=model, max_tokens=max_tokens, messages=messages) as stream:
        for text in stream.text_stream:
            if text:
                first = time.perf_counter()
                break
        else:
            raise RuntimeError("the stream carried no text")
    return (first - start) * 1000


def ttft_openai(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """The same with the OpenAI SDK: the first chunk whose delta has content."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, messages=messages, stream=True
    )
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                return (time.perf_counter() - start) * 1000
    finally:
        stream.close()
    raise RuntimeError("the stream carried no text")


def total_time(client: Any, model: str, messages: list[dict], max_tokens: int) -> float:
    """Milliseconds from just before a non-streaming request until its content is available."""
    start = time.perf_counter()
    response = client.messages.create(model=model, max_tokens=max_tokens, messages=messages)
    _ = response.content
    return (time.perf_counter() - start) * 1000
