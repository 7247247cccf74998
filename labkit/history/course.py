"""The course's own context code, verbatim, for comparison with labkit's.

Notebook 02 and ``benchmarks/context.py`` put these next to
:class:`~labkit.history.strategies.SlidingWindow` to show what labkit changes and why.

Notes:

1. :func:`course_sliding_window` is the course's ``sliding_window`` unchanged: it
   returns the kept pairs newest-first (``[u3, a3, u2, a2, u1, a1, u4]``), so the
   model reads the conversation backwards, and it re-encodes every kept message on
   every call. labkit's :class:`~labkit.history.strategies.SlidingWindow` keeps
   chronological order and cached per-message counts.
2. :func:`course_count_tokens` is the course's ``count_tokens``; only the encoding
   comes from labkit's offline loader (:func:`labkit.tokens.get_encoding`), so it runs
   without a network.
"""

from __future__ import annotations

from ..tokens import get_encoding

__all__ = ["course_count_tokens", "course_sliding_window"]


def course_count_tokens(text: str, model: str = "cl100k_base") -> int:
    """Approximate token count. cl100k_base works for GPT-4 and Claude.

    The course's ``count_tokens``; the encoding comes from labkit's offline loader.
    """
    enc = get_encoding(model)
    return len(enc.encode(text))


# fmt: off
def course_sliding_window(
    messages: list[dict],
    max_tokens: int = 100_000,
    min_turns: int = 2
) -> list[dict]:
    """
    Keep as many recent messages as fit within max_tokens.
    Always keep at least min_turns (user+assistant pairs).
    """
    count_tokens = course_count_tokens
    # Always keep messages in pairs (user + assistant)
    # Start from most recent, work backwards
    result = []
    token_count = 0
    pairs = []

    # Group into user+assistant pairs
    i = 0
    while i < len(messages) - 1:
        if messages[i]["role"] == "user" and messages[i+1]["role"] == "assistant":
            pairs.append((messages[i], messages[i+1]))
            i += 2
        else:
            i += 1

    # Always include last user message
    if messages and messages[-1]["role"] == "user":
        result = [messages[-1]]
        token_count = count_tokens(messages[-1]["content"])
        pairs_to_check = pairs
    else:
        pairs_to_check = pairs

    # Add pairs from most recent backwards until we hit the limit
    included = []
    for user_msg, asst_msg in reversed(pairs_to_check):
        pair_tokens = count_tokens(user_msg["content"]) + count_tokens(asst_msg["content"])
        if token_count + pair_tokens > max_tokens and len(included) >= min_turns:
            break
        included.insert(0, (user_msg, asst_msg))
        token_count += pair_tokens

    for u, a in included:
        result = [u, a] + result  # noqa: RUF005 (the course's code, verbatim)

    return result
# fmt: on
