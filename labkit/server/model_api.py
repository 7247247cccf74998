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
   HTTP pools allow ``max_upstream_connections`` in all (the SDK's default is 1,000,
   which would queue the 1,001st stream).
2. **Several small pools, not one large one.** httpcore's pool walks every connection
   it holds each time a request is assigned or a response closed, and probes every idle
   one (a ``poll`` of its socket, through anyio's ``extra_attributes``), so one pool of
   n connections costs O(n) per stream event of the pool and O(n²) per burst. Profiled
   under 300 concurrent streams (py-spy, ``benchmarks/chat_api.py`` load), that walk
   was a tenth of the server's CPU. The server holds ``ceil(max_upstream_connections /
   POOL_CONNECTIONS)`` clients, each with its own pool of at most ``POOL_CONNECTIONS``,
   and :meth:`ModelAPI.lease` hands a turn the client with the fewest turns in flight
   (the first on a tie): the same connections in all, a walk 1/k as long under load,
   and the one warm pool when requests come one at a time (round-robin over cold pools
   added 7 ms to a sequential turn's TTFT, measured).
3. **Idle connections are dropped after 4 s**, before the usual upstream's 5 s (uvicorn's
   default, so ``llama_cpp.server``'s): with equal timers the server's close can cross
   the client's reuse, and the request fails with a connection reset before the server
   reads it. It narrows the window without closing it (a saturated event loop releases
   a connection late: 2 workers relaying 1,000 streams with retries off still lost a
   turn now and then), so the server's retries (``max_retries``, default 2) stay on,
   and labkit's own local API keeps idle connections 75 s
   (:mod:`labkit.localapi.server` note 4).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

from .. import upstream
from .settings import Settings

__all__ = ["KEEPALIVE_EXPIRY", "POOL_CONNECTIONS", "ModelAPI"]

#: Connections per upstream HTTP pool (note 2).
POOL_CONNECTIONS = 128
#: Seconds an idle upstream connection is kept for reuse (note 3).
KEEPALIVE_EXPIRY = 4.0


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
        self._sdks: list[Any] = []
        self._in_flight: list[int] = []

    def client(self) -> Any:
        """An async SDK client with the server's timeouts and retries (the first of the
        server's pools, note 2; all are built on first use)."""
        if not self._sdks:
            s = self.settings
            pools = max(1, math.ceil(s.max_upstream_connections / POOL_CONNECTIONS))
            per_pool = math.ceil(s.max_upstream_connections / pools)
            keepalive = max(1, min(256, s.max_upstream_connections) // pools)
            self._sdks = [self._build(per_pool, keepalive) for _ in range(pools)]
            self._in_flight = [0] * pools
        return self._sdks[0]

    @contextlib.contextmanager
    def lease(self) -> Iterator[Any]:
        """The client with the fewest turns in flight, for the length of one turn (note 2)."""
        self.client()
        counts = self._in_flight
        i = counts.index(min(counts))
        counts[i] += 1
        try:
            yield self._sdks[i]
        finally:
            counts[i] -= 1

    def _build(self, connections: int, keepalive: int) -> Any:
        httpx = _sdk_httpx()
        s = self.settings
        limits = httpx.Limits(
            max_connections=connections,
            max_keepalive_connections=keepalive,
            keepalive_expiry=KEEPALIVE_EXPIRY,
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
        return base.with_options(http_client=http, max_retries=s.max_retries, timeout=timeout)

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
        for sdk in self._sdks:
            await sdk.close()
        self._sdks = []
