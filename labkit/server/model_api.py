"""The model API the chat server relays to: one pooled official SDK client, built here.

The server is an edge, so it builds its client (through :func:`labkit.providers.client`)
and hands it to :mod:`labkit.upstream`, which builds each request, streams it, normalises
the usage and turns SDK failures into :class:`~labkit.errors.UpstreamError`. This module
only knows what is particular to a server: pool size, timeouts, retries.

Notes:

1. **Upstream** is the official async SDK: ``AsyncAnthropic.messages.stream`` (the
   default; providers ``local`` and ``anthropic``) or ``AsyncOpenAI.chat.completions``
   (provider ``openai``), both through :func:`labkit.upstream.astream`. The stored reply
   is taken from ``get_final_message()`` on Anthropic (the OpenAI stream has no final
   message: its chunks are folded by :class:`labkit.upstream.ChunkAccumulator`). The
   HTTP pool allows ``max_upstream_connections`` (the SDK's default is 1,000, which
   would queue the 1,001st stream).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .. import upstream
from .settings import Settings

__all__ = ["ModelAPI"]


def _sdk_httpx() -> Any:
    """The httpx flavour the SDKs are built on (``httpx2`` in the late-2026 releases)."""
    try:
        import httpx2

        return httpx2
    except ImportError:  # pragma: no cover - older SDKs
        import httpx

        return httpx


class ModelAPI:
    """The model API the server relays: provider, model, and the pooled SDK client."""

    def __init__(self, settings: Settings) -> None:
        from ..providers import client

        self.settings = settings
        self.clients = client(
            settings.provider,
            model=settings.model,
            base_url=settings.base_url,
            engine=settings.engine,
        )
        self.provider: str = self.clients.provider
        self.model: str = self.clients.model
        self._sdk: Any = None

    def client(self) -> Any:
        """The async SDK client with the server's pool, timeouts and retries (built once)."""
        if self._sdk is None:
            httpx = _sdk_httpx()
            s = self.settings
            limits = httpx.Limits(
                max_connections=s.max_upstream_connections,
                max_keepalive_connections=min(256, s.max_upstream_connections),
            )
            timeout = httpx.Timeout(s.upstream_timeout, connect=5.0)
            if self.provider == "openai":
                import openai

                base = self.clients.async_openai
                http = openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
            else:
                import anthropic

                base = self.clients.async_anthropic
                http = anthropic.DefaultAsyncHttpxClient(limits=limits, timeout=timeout)
            self._sdk = base.with_options(
                http_client=http, max_retries=s.max_retries, timeout=timeout
            )
        return self._sdk

    def request(self, system: str, messages: Sequence[dict[str, Any]]) -> upstream.Request:
        """One turn's request with the server's model, ``max_tokens`` and temperature."""
        s = self.settings
        return upstream.Request(
            model=self.model,
            messages=messages,
            max_tokens=s.max_tokens,
            system=system,
            temperature=s.temperature,
        )

    def describe(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.model, "base_url": self.clients.base_url}

    async def close(self) -> None:
        if self._sdk is not None:
            await self._sdk.close()
