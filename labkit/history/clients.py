"""Which SDK client to call, from what the edge passed in.

:class:`~labkit.history.manager.ConversationManager` and
:func:`~labkit.history.summarise.model_summariser` never build a client: the edges
(the CLI, the widget, a notebook) pass one in, and this module picks the SDK client
a call needs from it.

Notes:

1. **Two shapes are accepted.** A bundle with ``provider`` and ``model`` and the
   attributes ``anthropic``, ``openai``, ``async_anthropic``, ``async_openai`` (what
   :func:`labkit.providers.client` returns; ``provider == "openai"`` speaks OpenAI,
   anything else Anthropic), or one official SDK client (``anthropic.Anthropic``,
   ``openai.AsyncOpenAI``...), which then serves only its own kind of call (sync or
   async) and needs ``model=`` since it does not know which model to use.
2. Reading a bundle attribute may create the SDK object (the bundle builds them
   lazily), which opens no connection and starts no process.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError

__all__ = ["model_of", "require_clients", "sdk_client"]

_HINT = (
    "Pass the clients in: ConversationManager(labkit.providers.client(), ...) "
    "or an anthropic/openai SDK client with model=..."
)


def _is_sdk_client(obj: Any) -> bool:
    return type(obj).__module__.split(".", 1)[0] in ("anthropic", "openai")


def require_clients(clients: Any, who: str) -> Any:
    """``clients`` itself, or a :class:`~labkit.errors.ConfigurationError` when it is None."""
    if clients is None:
        raise ConfigurationError(f"{who} needs clients to talk to a model.", hint=_HINT)
    return clients


def sdk_client(clients: Any, *, asynchronous: bool = False) -> Any:
    """The SDK client for one call (note 1)."""
    require_clients(clients, "A model call")
    if _is_sdk_client(clients):
        is_async = type(clients).__name__.startswith("Async")
        if is_async != asynchronous:
            kind = "an async" if asynchronous else "a sync"
            raise ConfigurationError(
                f"{type(clients).__name__} cannot make {kind} call.",
                hint="Use chat/chat_stream with a sync client and achat/achat_stream with an "
                "Async client, or pass labkit.providers.client() (it has both).",
            )
        return clients
    api = "openai" if getattr(clients, "provider", "") == "openai" else "anthropic"
    name = f"async_{api}" if asynchronous else api
    try:
        return getattr(clients, name)
    except AttributeError:
        raise ConfigurationError(
            f"{type(clients).__name__} has no {name} client.", hint=_HINT
        ) from None


def model_of(clients: Any, model: str | None) -> str:
    """``model`` when given, else the bundle's model (note 1)."""
    chosen = model or getattr(clients, "model", None)
    if not chosen:
        raise ConfigurationError(
            "No model to ask.",
            hint="Pass model=... (an SDK client does not know which model to use).",
        )
    return str(chosen)
