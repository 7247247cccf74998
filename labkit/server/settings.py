"""Settings of the chat API: everything ``labkit serve`` can be told, in one dataclass.

``labkit serve`` builds one from its flags; tests, notebook 04 and the benchmark pass the
same names to :class:`labkit.server.ChatServer`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Settings"]


@dataclass
class Settings:
    """Everything ``labkit serve`` can be told."""

    #: Store URL (``sqlite:///path.db`` or ``redis://host:port/db``); None → $LABKIT_STORE → sqlite:///conversations.db.
    store_url: str | None = None
    #: Redis TTL in seconds (None: the store's default).
    store_ttl: int | None = None
    #: "local" (default), "anthropic" or "openai"; None → $LABKIT_PROVIDER → local.
    provider: str | None = None
    #: Any compatible server (e.g. a ``labkit local-api --engine sim``).
    base_url: str | None = None
    #: Model id (None: the provider's default).
    model: str | None = None
    #: Engine of the local API when the provider is local and no base_url is given.
    engine: str = "llama"
    #: Token budget above which only the last ``keep_turns`` turns are sent.
    context_budget: int = 50_000
    #: Turns kept when the budget is exceeded.
    keep_turns: int = 10
    #: Longest user message accepted, in characters.
    max_message_chars: int = 32_000
    #: Longest system prompt accepted, in characters.
    max_system_prompt_chars: int = 16_000
    #: ``max_tokens`` of each upstream request.
    max_tokens: int = 512
    #: Sampling temperature (None: the upstream's default).
    temperature: float | None = None
    #: SDK retries of failed requests before the first byte (the SDK's default is 2).
    max_retries: int = 2
    #: Upstream read timeout in seconds.
    upstream_timeout: float = 120.0
    #: Connection pool size towards the upstream.
    max_upstream_connections: int = 4096
    #: Seconds between SSE keep-alive comments.
    ping_seconds: float = 15.0
    #: Where store calls run: "inline" (on the event loop), "thread" (one store thread),
    #: or "auto" (inline for SQLite, a thread for Redis; note 7 of labkit.server.service).
    store_io: str = "auto"
    #: Lease of the per-session turn lock (a crashed server blocks a session at most this long).
    turn_lease_seconds: float = 300.0
