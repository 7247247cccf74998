"""labkit: labs and benchmarks for LLM streaming and conversation state."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import (
    ConfigurationError,
    ContextBudgetError,
    InvalidMessageError,
    InvalidSessionIdError,
    LabkitError,
    SessionBusyError,
    SessionNotFoundError,
    StoreError,
    StoreUnavailableError,
    TokenizerUnavailableError,
    UpstreamError,
)
from .tokens import count_tokens, get_encoding

try:
    __version__ = version("labkit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ConfigurationError",
    "ContextBudgetError",
    "InvalidMessageError",
    "InvalidSessionIdError",
    "LabkitError",
    "SessionBusyError",
    "SessionNotFoundError",
    "StoreError",
    "StoreUnavailableError",
    "TokenizerUnavailableError",
    "UpstreamError",
    "__version__",
    "count_tokens",
    "get_encoding",
]
