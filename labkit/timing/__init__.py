"""Timing a streamed LLM reply: timestamps, TTFT, ITL, TPOT, e2e, tokens/s.

Wrap the official SDK stream helpers without changing how the code reads::

    with timed(client.messages.stream(model=m, max_tokens=200, messages=msgs)) as stream:
        for text in stream.text_stream:
            print(text, end="")
    stream.timing.ttft_ms, stream.timing.itl_p50_ms, stream.timing.output_tokens

- :mod:`~labkit.timing.records`: :class:`StreamTiming` / :class:`CallTiming` (the raw
  stamps, the derived metrics and their definitions), :func:`percentile`, :func:`summarize`.
- :mod:`~labkit.timing.events`: which SDK events carry text, tool input or usage
  (:func:`observe_event`, :func:`finish`); input tokens are the whole prompt, cached
  part apart.
- :mod:`~labkit.timing.transport`: httpx hooks that stamp the request leaving and the
  first and last body bytes (:func:`instrument`).
- :mod:`~labkit.timing.wrappers`: :class:`timed`, :func:`timed_call`, :func:`atimed_call`.

The Lab 1 runner (prompts × trials, streamed and not) lives in :mod:`labkit.bench.lab1`.
Everything listed in ``__all__`` is importable from ``labkit.timing`` directly.
"""

from __future__ import annotations

from .events import finish, observe_event, usage_counts
from .records import CallTiming, StreamEvent, StreamTiming, percentile, summarize
from .transport import instrument
from .wrappers import AsyncTimedStream, TimedStream, atimed_call, timed, timed_call

__all__ = [
    "AsyncTimedStream",
    "CallTiming",
    "StreamEvent",
    "StreamTiming",
    "TimedStream",
    "atimed_call",
    "finish",
    "instrument",
    "observe_event",
    "percentile",
    "summarize",
    "timed",
    "timed_call",
    "usage_counts",
]
