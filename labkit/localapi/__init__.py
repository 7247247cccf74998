"""labkit's local API: the Anthropic Messages and OpenAI Chat Completions wire formats
served on 127.0.0.1 by a real small model (``llama``: SmolLM2-135M-Instruct) or by a
latency-and-fault simulator (``sim``). Start it with :class:`LocalAPIServer` or
``labkit local-api``; point the official SDKs at it with ``base_url``.

Modules, from the bottom up: ``constants`` (imports nothing), ``engine`` (the engine
contract and :func:`make_engine`), ``sim`` and ``llama`` (the two engines),
``metrics``, ``wire`` / ``anthropic_wire`` / ``openai_wire`` (the HTTP side),
``app`` (the FastAPI app), ``options`` (the command line) and ``server`` (running it).

Importing this package costs only ``constants``: the other names below are loaded on
first use, so ``from labkit.localapi.constants import MODEL_ID`` (or ``MODEL_ID``
from here) never imports the server, FastAPI or llama-cpp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .constants import CONTEXT_WINDOW, ENGINES, MODEL_ID

if TYPE_CHECKING:
    from .llama import model_path
    from .metrics import parse_prometheus
    from .server import LocalAPIServer, serve
    from .sim import SimOptions

__all__ = [
    "CONTEXT_WINDOW",
    "ENGINES",
    "MODEL_ID",
    "LocalAPIServer",
    "SimOptions",
    "model_path",
    "parse_prometheus",
    "serve",
]

_LAZY = {
    "LocalAPIServer": "server",
    "serve": "server",
    "SimOptions": "sim",
    "model_path": "llama",
    "parse_prometheus": "metrics",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
