"""The course's own server code, as a learner would first run it for the milestone.

The course's "FastAPI Streaming Endpoint — SSE Pattern" (``generate()`` relaying
``text_stream`` as ``data:`` lines, then a done event with usage) with the error
handling of its "Error-safe streaming generator" (``generate_safe``), served at the
milestone's route ``POST /chat/stream/{session_id}``. Nothing else is changed: the SDK
client reads its base URL and key from the environment (``ANTHROPIC_BASE_URL``,
``ANTHROPIC_API_KEY``), which is how a checker points it at a local API.

tests/test_exercises.py runs ``check_chat_api`` on it: it must fail, and say why
(no session ids, no stored history, nothing survives a restart...).
"""

import json

import anthropic
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

app = FastAPI()
client = anthropic.AsyncAnthropic()  # async client for FastAPI


class ChatRequest(BaseModel):
    message: str
    session_id: str = "default"


# ── Streaming endpoint ────────────────────────────────
@app.post("/chat/stream/{session_id}")
async def chat_stream(session_id: str, request: ChatRequest):
    async def generate_safe():
        try:
            async with client.messages.stream(
                model="claude-3-5-sonnet-20241022",
                max_tokens=2048,
                messages=[{"role": "user", "content": request.message}],
            ) as stream:
                async for text in stream.text_stream:
                    # SSE format: "data: {payload}\n\n"
                    yield f"data: {json.dumps({'text': text})}\n\n"

                # Send final event with usage stats
                final = await stream.get_final_message()
                yield f"data: {json.dumps({'done': True, 'usage': {'input': final.usage.input_tokens, 'output': final.usage.output_tokens}})}\n\n"
        except anthropic.RateLimitError:
            yield f"data: {json.dumps({'error': 'rate_limit', 'message': 'Too many requests. Please wait a moment.'})}\n\n"
        except anthropic.APIStatusError as e:
            yield f"data: {json.dumps({'error': 'api_error', 'status': e.status_code})}\n\n"
        except Exception as e:
            yield f"data: {json.dumps({'error': 'unknown', 'message': str(e)})}\n\n"
        finally:
            yield 'data: {"done": true}\n\n'  # always send done event

    return StreamingResponse(
        generate_safe(),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # disable nginx buffering
        },
    )
