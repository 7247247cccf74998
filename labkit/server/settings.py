"""Settings of the chat API: everything ``labkit serve`` can be told, in one dataclass.

``labkit serve`` builds one from its flags; tests, notebook 04 and the benchmark pass the
same names to :class:`labkit.server.ChatServer`.

Notes:

1. **The body bound follows from the text limits.** A valid request body is
   ``{"message": ..., "system_prompt": ...}`` and nothing else (extra fields are
   refused). JSON may write any character as an escape: ``\\uXXXX`` (6 bytes), or a
   surrogate pair (12 bytes) for a character outside the Basic Multilingual Plane,
   which Python counts as one character. So the largest valid body is
   ``12 × (max_message_chars + max_system_prompt_chars)`` bytes of text plus
   ``JSON_OVERHEAD_BYTES`` (4 KiB: the keys, quotes, braces and any whitespace a
   client's JSON encoder adds). With the defaults: ``12 × (32,000 + 16,000) + 4,096 =
   580,096`` bytes (567 KiB). A body larger than :attr:`Settings.max_body_bytes` cannot
   be valid, so it is refused (413) before it is read: from its ``Content-Length``, or
   as a chunked body passes the bound (:mod:`labkit.server.limits`).
2. **The key.** ``server_key`` (``labkit serve --api-key`` or ``LABKIT_SERVER_KEY``)
   turns on authentication (:mod:`labkit.server.auth`). It is never printed or logged,
   and :class:`~labkit.server.ChatServer` hands it to its child in the environment, not
   on the command line (which other users of the machine can read in ``ps``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["JSON_OVERHEAD_BYTES", "MAX_BYTES_PER_CHAR", "Settings"]

#: Most bytes one character can take in a JSON string (a surrogate pair of escapes; note 1).
MAX_BYTES_PER_CHAR = 12
#: Room for the JSON around the two text fields of a request body (note 1).
JSON_OVERHEAD_BYTES = 4096


@dataclass
class Settings:
    """Everything ``labkit serve`` can be told."""

    #: Store URL (``sqlite:///path.db`` or ``redis://host:port/db``); None → $LABKIT_STORE → sqlite:///conversations.db.
    store_url: str | None = None
    #: Durable archive behind a Redis store (``sqlite:///…`` or ``postgresql://…``); None → $LABKIT_ARCHIVE → none.
    store_archive: str | None = None
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
    #: The server key: when set, every route but ``/health`` and the page needs
    #: ``Authorization: Bearer <key>`` (note 2; :mod:`labkit.server.auth`).
    server_key: str | None = field(default=None, repr=False)
    #: Without a key, answer only requests addressed to a loopback name (``Host:
    #: 127.0.0.1``, ``localhost``, ``[::1]``); ``--insecure-no-auth`` turns it off.
    loopback_hosts_only: bool = True
    #: Largest request line plus headers, in bytes (431 beyond).
    max_header_bytes: int = 16 * 1024

    @property
    def max_body_bytes(self) -> int:
        """Largest request body read, in bytes: what the text limits allow (note 1)."""
        chars = self.max_message_chars + self.max_system_prompt_chars
        return MAX_BYTES_PER_CHAR * chars + JSON_OVERHEAD_BYTES
