"""Running the chat API: in this process (``serve``) or as a child process (``ChatServer``).

Notes:

1. ``serve`` binds the listening socket itself, then prints one line
   ``labkit serve: listening on http://HOST:PORT`` and hands the socket to uvicorn.
   With ``port=0`` the OS picks a free port and the line says which: that is how
   :class:`ChatServer` (tests, notebook 04, the benchmark) learns it without racing.
2. :class:`ChatServer` runs ``python -m labkit.cli serve ...``: the exact command a
   user types, so tests exercise the CLI path too. ``restart()`` stops the process
   and starts a new one on the same port, which is what "the server restarted" means
   to a client (and to the browser's ``localStorage``, which is per origin).
3. The child's stderr goes to a file (``.log_path``) so tests can assert that no
   traceback was logged; the child stops itself when its parent is gone (it watches
   ``getppid()``), and ``atexit`` stops it on a normal exit.
4. ``ChatServer(server_key=...)`` gives the key to the child as ``LABKIT_SERVER_KEY``
   in its environment, never on its command line (``ps`` shows command lines to every
   user of the machine).
5. uvicorn runs with the head bound of :mod:`labkit.server.limits` and the logging
   configuration of :mod:`labkit.server.redact` (secrets redacted, no tracebacks below
   ``debug``).
6. ``workers=N`` (``labkit serve --workers N``) runs N server processes on one port. The
   parent binds N listening sockets to the port with ``SO_REUSEPORT`` (the kernel spreads
   new connections over them by address hash, so no worker has to win an accept race),
   forks one worker per socket before any thread or event loop exists, then only
   supervises: it forwards SIGINT/SIGTERM to the workers and starts a new worker in
   place of one that died. Workers share nothing but the store, which already holds the
   sessions and the turn locks (a lock is a row in SQLite, a key in Redis), so a session
   may move from worker to worker between turns. The local provider needs ``--base-url``
   with workers: each worker would otherwise load its own model.
7. **The garbage collector is tuned once the server has started.** Relaying 1,000
   streams, CPython's default thresholds ran a full (oldest-generation) collection every
   couple of seconds, each walking the ~250,000 objects of the imported libraries: 12 in
   two bursts, 241 ms each at the median and 294 ms at most, every stream frozen
   meanwhile (a 240 ms stop in a 20-event stream adds 12 ms to its mean gap: the ITL p99
   line of ``benchmarks/chat_api.py``). After start-up the server collects once, then
   ``gc.freeze()`` moves every object alive into a generation the collector never walks
   (they live as long as the process anyway; after a fork, the workers' pages stay
   shared), and the thresholds become ``GC_THRESHOLDS``: measured the same way, full
   collections 12 → 4, GC time 3.9 s → 1.1 s, events/s 1,890 → 2,230, ITL p99 119 → 109
   ms. Garbage without cycles is freed by reference counting as before; cycles wait for
   the larger young-generation threshold (20,000 allocations instead of 700).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ..errors import ConfigurationError
from .app import create_app
from .auth import KEY_ENV
from .limits import uvicorn_options
from .redact import log_config
from .settings import Settings

__all__ = ["ChatServer", "serve"]

READY_PREFIX = "labkit serve: listening on "


def serve(
    settings: Settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    access_log: bool = True,
    log_level: str = "info",
    workers: int = 1,
) -> None:
    """Run the chat API in this process (or ``workers`` processes, note 6) until interrupted."""
    if workers < 1:
        raise ConfigurationError(f"--workers {workers} is not a count.", hint="Use 1 or more.")
    if workers > 1 and (settings.provider or "local") == "local" and not settings.base_url:
        raise ConfigurationError(
            "With --workers, each worker would start its own local model.",
            hint="Start one `labkit local-api` and pass its URL with --base-url.",
        )
    socks = _listen(host, port, workers)
    actual = socks[0].getsockname()[1]

    def run(sock: socket.socket) -> None:
        import uvicorn

        config = uvicorn.Config(
            create_app(settings),
            access_log=access_log,
            log_level=log_level,
            log_config=log_config(log_level),
            backlog=2048,
            timeout_graceful_shutdown=3,
            **uvicorn_options(settings),
        )
        _uvicorn_server(config).run(sockets=[sock])

    watched = int(os.environ[WATCH_ENV]) if os.environ.get(WATCH_ENV, "").isdigit() else None
    if workers == 1:
        if watched is not None:
            _watch_parent(watched)
        print(f"{READY_PREFIX}http://{host}:{actual}", flush=True)
        run(socks[0])
        return
    _supervise(socks, run, ready=f"{READY_PREFIX}http://{host}:{actual}", watched=watched)


#: Allocations between young-generation collections, and the two older generations'
#: thresholds (note 7; CPython's defaults are 700, 10, 10).
GC_THRESHOLDS = (20_000, 50, 100)


def _tune_gc() -> None:
    """Move everything alive after start-up out of the collector's reach, and collect
    less often (note 7)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _uvicorn_server(config: Any) -> Any:
    """uvicorn's ``Server``, tuning the garbage collector once started (note 7)."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            _tune_gc()

    return Server(config)


def _listen(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on one port (``SO_REUSEPORT`` when more than one)."""
    socks: list[socket.socket] = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if count > 1:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, socks[0].getsockname()[1] if socks else port))
        sock.listen(2048)
        sock.set_inheritable(True)
        socks.append(sock)
    return socks


def _supervise(
    socks: list[socket.socket],
    run: Any,
    *,
    ready: str,
    watched: int | None,
) -> None:  # pragma: no cover - the forked side runs in the workers; tested end to end
    """Fork one worker per socket, forward signals, replace a worker that died (note 6)."""
    me = os.getpid()
    children: dict[int, socket.socket] = {}
    stopping = False

    def start(sock: socket.socket) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: its own socket only, and it stops when the parent goes
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            for other in socks:
                if other is not sock:
                    other.close()
            _watch_parent(me)
            code = 0
            try:
                run(sock)
            except BaseException:
                code = 1
                raise
            finally:
                os._exit(code)
        children[pid] = sock

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for sock in socks:
        start(sock)
    if watched is not None:
        _watch_parent(watched)
    print(ready, flush=True)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        sock = children.pop(pid, None)
        if sock is not None and not stopping:
            print(
                f"labkit serve: worker {pid} exited ({os.waitstatus_to_exitcode(status)}); "
                "starting another",
                file=sys.stderr,
                flush=True,
            )
            start(sock)


WATCH_ENV = "LABKIT_SERVE_PARENT_PID"


def _watch_parent(pid: int) -> None:  # pragma: no cover - runs in the child
    """Interrupt this server when the process that started it is gone."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != pid:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
                os._exit(1)

    threading.Thread(target=watch, name="labkit-parent-watch", daemon=True).start()


class ChatServer:
    """``labkit serve`` in a child process. Use as a context manager.

    ``ChatServer(store_url=..., base_url=..., provider=..., **settings)``; attributes
    ``workers=N`` runs ``labkit serve --workers N`` (note 6). Attributes
    ``.url``, ``.port``, ``.log_path``, ``.server_key``; methods ``start()``, ``stop()``,
    ``restart()``, ``log_text()``, ``client()`` (a :class:`ChatClient` with the key).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_log: bool = False,
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
        workers: int = 1,
        **settings: Any,
    ) -> None:
        Settings(**settings)  # fail early on a wrong name
        self.workers = workers
        self.settings = settings
        self.server_key: str | None = settings.get("server_key")
        self.host = host
        self.port = port
        self.access_log = access_log
        self.env = env
        self.startup_timeout = startup_timeout
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None
        fd, name = tempfile.mkstemp(prefix="labkit-serve-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "labkit.cli", "serve", "--host", self.host]
        cmd += ["--port", str(self.port)]
        flags = {
            "store_url": "--store",
            "store_archive": "--archive",
            "store_ttl": "--ttl",
            "provider": "--provider",
            "base_url": "--base-url",
            "model": "--model",
            "engine": "--engine",
            "context_budget": "--context-budget",
            "keep_turns": "--keep-turns",
            "max_message_chars": "--max-message-chars",
            "max_system_prompt_chars": "--max-system-prompt-chars",
            "max_header_bytes": "--max-header-bytes",
            "max_tokens": "--max-tokens",
            "temperature": "--temperature",
            "max_retries": "--max-retries",
            "ping_seconds": "--ping-seconds",
        }
        for key, value in self.settings.items():
            if value is None or key == "server_key":  # the key goes in the environment (note 4)
                continue
            if key == "loopback_hosts_only":
                if not value:
                    cmd.append("--insecure-no-auth")
                continue
            if key not in flags:
                raise TypeError(f"ChatServer cannot pass {key!r} to `labkit serve`")
            cmd += [flags[key], str(value)]
        if not self.access_log:
            cmd.append("--no-access-log")
        if self.workers != 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    def start(self) -> ChatServer:
        env = {k: v for k, v in os.environ.items() if k != KEY_ENV}  # only its own key (note 4)
        env.update(self.env or {})
        if self.settings.get("server_key"):
            env[KEY_ENV] = self.settings["server_key"]
        env.setdefault("PYTHONUNBUFFERED", "1")
        env[WATCH_ENV] = str(os.getpid())
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=env,
        )
        log.close()
        atexit.register(self.stop)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX) :].strip()
                self.port = int(self.url.rsplit(":", 1)[1])
                break
        if not self.url:
            self.stop()
            raise RuntimeError(f"labkit serve did not start:\n{self.log_text()[-3000:]}")
        self._wait_healthy(deadline)
        return self

    def _wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"labkit serve exited:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"labkit serve not healthy in time:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        atexit.unregister(self.stop)

    def restart(self) -> ChatServer:
        """Stop, then start again on the same port."""
        self.stop()
        return self.start()

    def client(self, **kwargs: Any) -> Any:
        """A :class:`~labkit.server.client.ChatClient` of this server, with its key."""
        from .client import ChatClient

        return ChatClient(self.url, api_key=self.server_key, **kwargs)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
