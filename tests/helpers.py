"""Helpers the tests share (imported as ``from helpers import ...``; pytest puts tests/ on
``sys.path``). Fixtures live in conftest.py; plain functions and constants live here.

1. The sim engine's options are named once: ``CHAT_SIM`` (the chat-server tests'
   upstream), ``SLOW_SIM`` (a reply slow enough to interrupt) and ``ZERO_LATENCY``
   (tests that set their ground truth per request with the ``x-labkit-sim`` header).
   The ``sim_factory`` fixture shares one running server per distinct set of options.
2. ``wait_for`` polls with a deadline: tests never sleep a fixed time and then hope.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anthropic
import openai

USER = [{"role": "user", "content": "Say hello."}]

ZERO_LATENCY: dict[str, Any] = {"ttft_ms": 0, "itl_ms": 0}
CHAT_SIM: dict[str, Any] = {"ttft_ms": 5, "itl_ms": 1, "reply_tokens": 12, "seed": 7}
# 60 deltas 40 ms apart: 2.4 s of reply, time enough to press Ctrl+C or drop the connection.
SLOW_SIM: dict[str, Any] = {**CHAT_SIM, "ttft_ms": 20, "itl_ms": 40, "reply_tokens": 60}


def sim_header(**opts: object) -> dict[str, str]:
    """The ``x-labkit-sim`` header setting sim options for one request."""
    return {"x-labkit-sim": ";".join(f"{k}={v}" for k, v in opts.items())}


def anthropic_sdk(api: Any) -> anthropic.Anthropic:
    """An Anthropic client for a local API, with the SDK's retries off."""
    return anthropic.Anthropic(base_url=api.base_url, api_key="test", max_retries=0)


def openai_sdk(api: Any) -> openai.OpenAI:
    """An OpenAI client for a local API, with the SDK's retries off."""
    return openai.OpenAI(base_url=api.openai_base_url, api_key="test", max_retries=0)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, every: float = 0.02) -> bool:
    """Poll ``predicate`` until it is truthy (True) or ``timeout`` seconds pass (False)."""
    end = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(every)
