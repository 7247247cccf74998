"""Lab 2: the sliding window (chronological), and a ConversationManager that keeps a turn
only when the reply arrived."""

from __future__ import annotations

from typing import Any

from labkit.tokens import count_tokens


def sliding_window(
    messages: list[dict], max_tokens: int = 100_000, min_turns: int = 2
) -> list[dict]:
    """The newest user message, plus as many of the newest user+assistant pairs as fit in
    ``max_tokens`` (at least ``min_turns`` of them), in chronological order."""
    pairs = []
    i = 0
    while i < len(messages) - 1:
        if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant":
            pairs.append((messages[i], messages[i + 1]))
            i += 2
        else:
            i += 1
    tail: list[dict] = []
    used = 0
    if messages and messages[-1]["role"] == "user":
        tail = [messages[-1]]
        used = count_tokens(messages[-1]["content"])
    kept: list[tuple[dict, dict]] = []
    for user, assistant in reversed(pairs):
        cost = count_tokens(user["content"]) + count_tokens(assistant["content"])
        if used + cost > max_tokens and len(kept) >= min_turns:
            break
        kept.append((user, assistant))
        used += cost
    kept.reverse()
    return [m for pair in kept for m in pair] + tail


class ConversationManager:
    """The course's manager, with the SDK client passed in and an atomic turn."""

    def __init__(self, client: Any, model: str, system_prompt: str = "", max_tokens: int = 256):
        self.client = client
        self.model = model
        self.system_prompt = system_prompt
        self.max_tokens = max_tokens
        self.history: list[dict] = []

    def chat(self, user_message: str) -> str:
        messages = [*self.history, {"role": "user", "content": user_message}]
        kwargs: dict[str, Any] = {}
        if self.system_prompt:
            kwargs["system"] = self.system_prompt
        response = self.client.messages.create(
            model=self.model, max_tokens=self.max_tokens, messages=messages, **kwargs
        )
        reply = response.content[0].text
        self.history = [*messages, {"role": "assistant", "content": reply}]
        return reply

    def clear(self) -> None:
        self.history = []

    @property
    def turn_count(self) -> int:
        return sum(1 for m in self.history if m["role"] == "user")
