"""SDK clients for a provider: the local API (default), Anthropic or OpenAI.

``client()`` returns a :class:`Clients` bundle: the official ``anthropic`` and
``openai`` clients (sync and async, built lazily) and the model id to use. For
``local`` it starts the local API once per process on a free loopback port and
stops it at exit; for a paid provider it reads the key from the environment.

Notes:

1. The provider defaults to ``$LABKIT_PROVIDER``, else ``local``; the model to
   ``$LABKIT_MODEL``, else the provider's default below.
2. ``ANTHROPIC_BASE_URL`` / ``OPENAI_BASE_URL`` are left to the SDKs, which read them
   themselves; when one is set (or ``base_url=`` is given) a missing key is replaced
   by a placeholder, so a keyless compatible server (``labkit local-api --engine sim``)
   can stand behind ``LABKIT_PROVIDER=anthropic`` or ``openai``.
3. A provider speaks one wire format: ``.openai`` on an Anthropic bundle (and vice
   versa) raises ConfigurationError; the local API speaks both.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError, UpstreamError
from .localapi.constants import MODEL_ID

if TYPE_CHECKING:
    import anthropic
    import openai

    from .localapi import LocalAPIServer

__all__ = [
    "DEFAULT_MODELS",
    "PROVIDERS",
    "Clients",
    "client",
    "local_server",
    "score_candidates",
]

PROVIDERS = ("local", "anthropic", "openai")

#: Model used when neither ``model=`` nor ``$LABKIT_MODEL`` is given.
DEFAULT_MODELS = {
    "local": MODEL_ID,
    "anthropic": "claude-haiku-4-5",
    "openai": "gpt-5.4-mini",
}

_KEYS = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}
_BASE_ENV = {"anthropic": "ANTHROPIC_BASE_URL", "openai": "OPENAI_BASE_URL"}
_LOCAL_KEY = "labkit-local"

_servers: dict[str, LocalAPIServer] = {}
_servers_lock = threading.Lock()


def local_server(engine: str = "llama") -> LocalAPIServer:
    """The process-wide local API for ``engine``, started on first use, stopped at exit."""
    from .localapi import LocalAPIServer

    with _servers_lock:
        server = _servers.get(engine)
        if server is None or not server.running:
            server = LocalAPIServer(engine).start()
            _servers[engine] = server
        return server


@dataclass
class Clients:
    """The SDK clients and model id for one provider."""

    #: ``local``, ``anthropic`` or ``openai``.
    provider: str
    #: The model id to pass to ``messages.create`` / ``chat.completions.create``.
    model: str
    #: Where requests go: the local API's root (no ``/v1``), an explicit or
    #: environment base URL, or None for the provider's own endpoint.
    base_url: str | None = None
    #: ``llama`` or ``sim`` for the local provider, else None.
    engine: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def _wrong_format(self, wanted: str) -> ConfigurationError:
        other = "openai" if wanted == "anthropic" else "anthropic"
        return ConfigurationError(
            f"Provider {self.provider!r} does not speak the {wanted} API.",
            hint=f"Use the .{other} client with this provider, or LABKIT_PROVIDER=local (speaks both) "
            f"or LABKIT_PROVIDER={wanted}.",
        )

    def _anthropic_kwargs(self) -> dict[str, Any]:
        if self.provider == "openai":
            raise self._wrong_format("anthropic")
        kwargs: dict[str, Any] = {"api_key": self.api_key}
        if self.base_url:
            kwargs["base_url"] = self.base_url
        return kwargs

    def _openai_kwargs(self) -> dict[str, Any]:
        if self.provider == "anthropic":
            raise self._wrong_format("openai")
        kwargs: dict[str, Any] = {"api_key": self.api_key}
        if self.provider == "local":
            kwargs["base_url"] = f"{self.base_url}/v1"
        elif self.base_url:
            kwargs["base_url"] = self.base_url
        return kwargs

    @cached_property
    def anthropic(self) -> anthropic.Anthropic:
        """``anthropic.Anthropic`` for this provider."""
        kwargs = self._anthropic_kwargs()
        import anthropic

        return anthropic.Anthropic(**kwargs)

    @cached_property
    def async_anthropic(self) -> anthropic.AsyncAnthropic:
        """``anthropic.AsyncAnthropic`` for this provider."""
        kwargs = self._anthropic_kwargs()
        import anthropic

        return anthropic.AsyncAnthropic(**kwargs)

    @cached_property
    def openai(self) -> openai.OpenAI:
        """``openai.OpenAI`` for this provider."""
        kwargs = self._openai_kwargs()
        import openai

        return openai.OpenAI(**kwargs)

    @cached_property
    def async_openai(self) -> openai.AsyncOpenAI:
        """``openai.AsyncOpenAI`` for this provider."""
        kwargs = self._openai_kwargs()
        import openai

        return openai.AsyncOpenAI(**kwargs)

    def describe(self) -> dict[str, Any]:
        """Provider, model, engine and base URL (for provenance records)."""
        base = self.base_url
        if base is None and self.provider in _BASE_ENV:
            base = os.environ.get(_BASE_ENV[self.provider]) or None
        return {
            "provider": self.provider,
            "model": self.model,
            "engine": self.engine,
            "base_url": base,
        }


def client(
    provider: str | None = None,
    *,
    model: str | None = None,
    base_url: str | None = None,
    engine: str = "llama",
) -> Clients:
    """SDK clients and model id for ``provider`` (default ``$LABKIT_PROVIDER``, else ``local``).

    For ``local`` the local API is started once per process (``engine`` ``llama``, the
    real model, or ``sim``) unless ``base_url`` points at one already running.
    """
    chosen = (provider or os.environ.get("LABKIT_PROVIDER") or "local").strip().lower()
    if chosen not in PROVIDERS:
        raise ConfigurationError(
            f"Unknown provider {chosen!r}.",
            hint=f"Use one of: {', '.join(PROVIDERS)} (LABKIT_PROVIDER).",
        )
    model = model or os.environ.get("LABKIT_MODEL") or DEFAULT_MODELS[chosen]
    if chosen == "local":
        if engine not in ("llama", "sim"):
            raise ConfigurationError(
                f"Unknown engine {engine!r}.", hint="Use engine='llama' or engine='sim'."
            )
        url = (
            base_url.rstrip("/").removesuffix("/v1") if base_url else local_server(engine).base_url
        )
        return Clients("local", model, url, engine, _LOCAL_KEY)
    key_var = _KEYS[chosen]
    key = os.environ.get(key_var)
    if not key:
        if base_url or os.environ.get(_BASE_ENV[chosen]):
            key = "labkit-no-key"
        else:
            raise ConfigurationError(
                f"LABKIT_PROVIDER={chosen} needs an API key, but {key_var} is not set.",
                hint=f"export {key_var}=... (or unset LABKIT_PROVIDER to use the offline local model).",
            )
    return Clients(chosen, model, base_url, None, key)


def score_candidates(
    clients: Clients,
    messages: list[dict[str, Any]],
    candidates: list[str],
    system: str | None = None,
) -> list[float]:
    """Log-likelihood of each candidate as the continuation of the assistant's turn.

    Uses the local API's ``POST /v1/labkit/score`` (llama engine only): the prompt is
    evaluated once and only each candidate's tokens after it. End ``messages`` with
    an assistant message to score candidates as the continuation of that prefill.
    """
    import httpx

    if clients.provider != "local" or not clients.base_url:
        raise ConfigurationError(
            f"Scoring candidates needs the local API (provider is {clients.provider!r}).",
            hint="Use labkit.providers.client('local'); paid APIs do not expose prompt log-probabilities.",
        )
    if not candidates:
        raise ConfigurationError(
            "No candidates to score.", hint="Pass at least one candidate string."
        )
    try:
        resp = httpx.post(
            clients.base_url + "/v1/labkit/score",
            json={"system": system, "messages": messages, "candidates": candidates},
            timeout=600.0,
        )
    except httpx.HTTPError as exc:
        raise UpstreamError(
            f"The local API did not answer: {exc}", hint="Is it still running?"
        ) from exc
    if resp.status_code != 200:
        try:
            detail = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = resp.text
        raise UpstreamError(
            f"Scoring failed ({resp.status_code}): {detail}",
            hint="Scoring needs the llama engine: labkit.providers.client('local', engine='llama').",
        )
    return [float(s) for s in resp.json()["scores"]]
