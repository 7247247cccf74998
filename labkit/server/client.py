"""A small client of the chat API, written the course's way (httpx + ``data:`` lines).

Used by notebook 04 and the tests; anything that can read ``data:`` lines works as
well (the browser page, ``curl -N``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .sse import parse_data_line

__all__ = ["ChatAPIError", "ChatClient", "StreamedTurn"]


class ChatAPIError(Exception):
    """A 4xx/5xx answer of the chat API (``status``, ``body`` with error/message/hint)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {body.get('error')}: {body.get('message')}")
        self.status = status
        self.body = body


@dataclass
class StreamedTurn:
    """Everything one streamed turn produced."""

    #: The session id (from the first event).
    session_id: str = ""
    #: The text deltas joined.
    text: str = ""
    #: Every event in order, as parsed JSON objects.
    events: list[dict[str, Any]] = field(default_factory=list)
    #: The error event, if any.
    error: dict[str, Any] | None = None
    #: The done event (None if the stream ended without one).
    done: dict[str, Any] | None = None
    #: The response headers.
    headers: dict[str, str] = field(default_factory=dict)
    #: Request sent → first text event, ms (``time.perf_counter``; None without text).
    ttft_ms: float | None = None
    #: Request sent → end of the stream (or the client's hang-up), ms.
    e2e_ms: float | None = None

    @property
    def deltas(self) -> list[str]:
        """The text deltas, in order."""
        return [e["text"] for e in self.events if "text" in e]


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
        try:
            body = response.json()
        except ValueError:
            body = {"error": "http_error", "message": response.text}
        raise ChatAPIError(response.status_code, body)


class ChatClient:
    """``ChatClient("http://127.0.0.1:8000")``: stream turns and read sessions.

    ``api_key``: the server key, sent as ``Authorization: Bearer <key>`` on every
    request (a server started with ``--api-key`` / ``LABKIT_SERVER_KEY`` needs it).
    """

    def __init__(self, base_url: str, *, timeout: float = 60.0, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def stream(
        self,
        session_id: str,
        message: str,
        *,
        system_prompt: str | None = None,
        on_text: Callable[[str], Any] | None = None,
        stop_after_deltas: int | None = None,
    ) -> StreamedTurn:
        """One turn through ``POST /chat/stream/{session_id}``. ``stop_after_deltas``
        closes the connection after that many text deltas (a client disconnect)."""
        turn = StreamedTurn()
        body: dict[str, Any] = {"message": message}
        if system_prompt is not None:
            body["system_prompt"] = system_prompt
        t0 = time.perf_counter()
        with self.http.stream("POST", f"/chat/stream/{session_id}", json=body) as response:
            _raise_for(response)
            turn.headers = dict(response.headers)
            for line in response.iter_lines():
                data = parse_data_line(line)
                if data is None:
                    continue
                turn.events.append(data)
                if data.get("done"):
                    turn.done = data
                elif "error" in data:
                    turn.error = data
                elif "text" in data:
                    if turn.ttft_ms is None:
                        turn.ttft_ms = (time.perf_counter() - t0) * 1000
                    turn.text += data["text"]
                    if on_text is not None:
                        on_text(data["text"])
                    if stop_after_deltas is not None and len(turn.deltas) >= stop_after_deltas:
                        break
                elif "session_id" in data:
                    turn.session_id = data["session_id"]
        turn.e2e_ms = (time.perf_counter() - t0) * 1000
        return turn

    def chat(
        self, session_id: str, message: str, *, system_prompt: str | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"message": message}
        if system_prompt is not None:
            body["system_prompt"] = system_prompt
        r = self.http.post(f"/chat/{session_id}", json=body)
        _raise_for(r)
        return r.json()

    def _get(self, path: str) -> dict[str, Any]:
        r = self.http.get(path)
        _raise_for(r)
        return r.json()

    def sessions(self) -> list[dict[str, Any]]:
        return self._get("/sessions")["sessions"]

    def history(self, session_id: str) -> dict[str, Any]:
        return self._get(f"/sessions/{session_id}/history")

    def stats(self, session_id: str) -> dict[str, Any]:
        return self._get(f"/sessions/{session_id}/stats")

    def delete(self, session_id: str) -> dict[str, Any]:
        r = self.http.delete(f"/sessions/{session_id}")
        _raise_for(r)
        return r.json()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
