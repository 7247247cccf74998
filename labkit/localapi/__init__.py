"""labkit's local API: the Anthropic Messages and OpenAI Chat Completions wire formats
served on 127.0.0.1 by a real small model (``llama``: SmolLM2-135M-Instruct) or by a
latency-and-fault simulator (``sim``). Start it with :class:`LocalAPIServer` or
``labkit local-api``; point the official SDKs at it with ``base_url``.
"""

from __future__ import annotations

from .engines import CONTEXT_WINDOW, MODEL_ID, SimOptions, model_path
from .metrics import parse_prometheus
from .server import LocalAPIServer, serve

__all__ = [
    "CONTEXT_WINDOW",
    "MODEL_ID",
    "LocalAPIServer",
    "SimOptions",
    "model_path",
    "parse_prometheus",
    "serve",
]
