"""Record the SSE transcripts in this folder from the sim engine of labkit's local API.

    python tests/data/sse/record.py        # from the repository root; rewrites the *.txt

Each transcript is the raw body of one streamed response, byte for byte as the local
API sent it (Anthropic Messages or OpenAI Chat Completions wire format). The timing
tests (tests/test_timing_replay.py) replay them through an httpx MockTransport, so the
SDKs parse real wire bytes with no server running. Message ids and ``created`` times
differ between recordings; the sim's seed fixes everything else.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from labkit.localapi import MODEL_ID, LocalAPIServer

HERE = Path(__file__).resolve().parent
USER = [{"role": "user", "content": "Say hello."}]
TOOL = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}

# name → (path, JSON body, sim options for the x-labkit-sim header)
TRANSCRIPTS: dict[str, tuple[str, dict, dict]] = {
    "anthropic_text": (
        "/v1/messages",
        {"model": MODEL_ID, "max_tokens": 50, "messages": USER, "stream": True},
        {"reply_tokens": 5},
    ),
    "anthropic_error_after_2_deltas": (
        "/v1/messages",
        {"model": MODEL_ID, "max_tokens": 50, "messages": USER, "stream": True},
        {"reply_tokens": 5, "fail_after": 2, "fail_with": "overloaded_error"},
    ),
    "anthropic_tool_use": (
        "/v1/messages",
        {
            "model": MODEL_ID,
            "max_tokens": 100,
            "messages": USER,
            "stream": True,
            "tools": [TOOL],
            "tool_choice": {"type": "any"},
        },
        {},
    ),
    "openai_text_with_usage": (
        "/v1/chat/completions",
        {
            "model": MODEL_ID,
            "max_tokens": 50,
            "messages": USER,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        {"reply_tokens": 4},
    ),
    "openai_text_without_usage": (
        "/v1/chat/completions",
        {"model": MODEL_ID, "max_tokens": 50, "messages": USER, "stream": True},
        {"reply_tokens": 4},
    ),
}


def main() -> None:
    with LocalAPIServer("sim", ttft_ms=0, itl_ms=0, seed=1) as api:
        for name, (path, body, sim) in TRANSCRIPTS.items():
            header = {"x-labkit-sim": ";".join(f"{k}={v}" for k, v in sim.items())} if sim else {}
            response = httpx.post(api.base_url + path, json=body, headers=header, timeout=30)
            assert response.headers["content-type"].startswith("text/event-stream"), response.text
            (HERE / f"{name}.txt").write_bytes(response.content)
            print(f"{name}.txt: {len(response.content)} bytes")


if __name__ == "__main__":
    main()
