"""A milestone server that does everything but persist: sessions live in a dict.

Known-wrong for tests/test_exercises.py: check_chat_api must pass it on every
requirement except "history survives a server restart", and say why.
"""

import json
import time
import uuid

import anthropic
from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from labkit.tokens import count_tokens

app = FastAPI()
client = anthropic.AsyncAnthropic()
SESSIONS: dict[str, dict] = {}


class ChatRequest(BaseModel):
    message: str
    system_prompt: str = ""


def window(history: list[dict]) -> list[dict]:
    if sum(count_tokens(m["content"]) for m in history) > 50_000:
        return history[-20:]
    return history


@app.post("/chat/stream/{session_id}")
async def chat_stream(session_id: str, request: ChatRequest):
    if session_id == "new":
        session_id = uuid.uuid4().hex
    session = SESSIONS.setdefault(
        session_id,
        {"messages": [], "system": request.system_prompt, "created": time.time(), "tokens": 0},
    )
    messages = [*window(session["messages"]), {"role": "user", "content": request.message}]

    async def generate():
        yield f"data: {json.dumps({'session_id': session_id})}\n\n"
        try:
            async with client.messages.stream(
                model="claude-3-5-sonnet-20241022",
                max_tokens=1024,
                system=session["system"],
                messages=messages,
            ) as stream:
                async for text in stream.text_stream:
                    yield f"data: {json.dumps({'text': text})}\n\n"
                final = await stream.get_final_message()
        except anthropic.APIError as e:
            yield f"data: {json.dumps({'error': 'api_error', 'message': str(e)})}\n\n"
            yield f"data: {json.dumps({'done': True})}\n\n"
            return
        reply = "".join(b.text for b in final.content if b.type == "text")
        session["messages"] += [
            {"role": "user", "content": request.message},
            {"role": "assistant", "content": reply},
        ]
        session["tokens"] += final.usage.input_tokens + final.usage.output_tokens
        yield f"data: {json.dumps({'done': True})}\n\n"

    return StreamingResponse(
        generate(), media_type="text/event-stream", headers={"X-Session-Id": session_id}
    )


def get(session_id: str) -> dict:
    if session_id not in SESSIONS:
        raise HTTPException(404, "no such session")
    return SESSIONS[session_id]


@app.get("/sessions/{session_id}/history")
async def history(session_id: str):
    return {"session_id": session_id, "messages": get(session_id)["messages"]}


@app.get("/sessions/{session_id}/stats")
async def stats(session_id: str):
    s = get(session_id)
    return {
        "turn_count": len(s["messages"]) // 2,
        "total_tokens": s["tokens"],
        "age_seconds": time.time() - s["created"],
    }


@app.delete("/sessions/{session_id}")
async def delete(session_id: str):
    get(session_id)
    del SESSIONS[session_id]
    return {"deleted": True}
