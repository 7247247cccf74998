"""Running the local API: ``serve()`` in this process, or :class:`LocalAPIServer` in a child.

Notes:

1. The child binds its own socket (port 0 → a free port chosen by the kernel, no
   race) and writes the port to a file the parent polls; the parent then waits for
   ``GET /health``.
2. The child runs in its own session (Ctrl+C in a notebook does not kill it) and
   watches its parent: when the parent dies (even by SIGKILL) the child exits
   within a second. The parent also stops it at exit (``atexit``).
3. The child's log (stderr) goes to a temporary file; a failed start quotes its tail.
4. **An idle connection is kept 75 s** (``KEEP_ALIVE_SECONDS``, nginx's default), not
   uvicorn's 5 s: a server must keep a connection longer than its clients do (httpx and
   the SDKs drop an idle one after 5 s), or its close crosses a client's reuse and the
   request dies with a connection reset before the server reads it. Seen with the chat
   API relaying 1,000 streams from 2 workers with retries off: 1 to 24 turns failed in
   5 of 10 runs of 3–6 bursts a few seconds apart (the client releases a connection late
   when its event loop is saturated, so even a 4 s client expiry did not close the
   window); none in 5 runs of 6 bursts after.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from ..errors import ConfigurationError
from .constants import DEFAULT_HOST
from .engine import check_engine, make_engine
from .limits import MAX_HEADER_BYTES, header_refusal, uvicorn_http
from .metrics import Metrics, parse_prometheus
from .options import option_args

__all__ = ["KEEP_ALIVE_SECONDS", "LocalAPIServer", "serve"]

#: Seconds an idle connection is kept open (note 4).
KEEP_ALIVE_SECONDS = 75


def serve(
    engine: str = "llama",
    *,
    host: str = DEFAULT_HOST,
    port: int = 0,
    port_file: str | None = None,
    watch_parent: bool = False,
    log_level: str = "warning",
    on_listening: Any = None,
    **engine_opts: Any,
) -> None:
    """Serve the local API in this process until interrupted."""
    import uvicorn

    from .app import create_app

    metrics = Metrics()
    eng = make_engine(engine, metrics=metrics, **engine_opts)
    app = create_app(eng, metrics)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot listen on {host}:{port}: {exc.strerror}.",
            hint="Choose another --port (0 picks a free one).",
        ) from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="off",
        timeout_graceful_shutdown=1,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        **uvicorn_http(MAX_HEADER_BYTES, header_refusal),
    )
    server = uvicorn.Server(config)
    if port_file:
        tmp = Path(port_file + ".tmp")
        tmp.write_text(str(bound))
        tmp.replace(port_file)
    if on_listening is not None:
        on_listening(host, bound)
    if watch_parent:
        parent = os.getppid()

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            server.should_exit = True
            time.sleep(3)
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    server.run(sockets=[sock])


class LocalAPIServer:
    """The local API in a child process, for tests, notebooks and ``providers.client()``.

    >>> with LocalAPIServer("sim", ttft_ms=0, itl_ms=0) as api:   # doctest: +SKIP
    ...     anthropic.Anthropic(base_url=api.base_url, api_key="local")
    """

    def __init__(
        self,
        engine: str = "llama",
        *,
        host: str = DEFAULT_HOST,
        port: int = 0,
        startup_timeout: float = 90.0,
        **engine_opts: Any,
    ) -> None:
        self.engine = check_engine(engine)
        self.host = host
        self.requested_port = port
        self.engine_opts = engine_opts
        self.startup_timeout = startup_timeout
        self._args = option_args(engine, engine_opts)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def base_url(self) -> str:
        """What the Anthropic SDK takes as ``base_url`` (no ``/v1``)."""
        if self.port is None:
            raise ConfigurationError(
                "The local API is not running.", hint="Call start() or use it as a context manager."
            )
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """What the OpenAI SDK takes as ``base_url`` (with ``/v1``)."""
        return self.base_url + "/v1"

    def _log_tail(self) -> str:
        if self._dir is None:
            return ""
        try:
            return (Path(self._dir.name) / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> LocalAPIServer:
        """Start the child and wait until ``/health`` answers."""
        if self.proc is not None:
            return self
        self._dir = tempfile.TemporaryDirectory(prefix="labkit-localapi-")
        port_file = Path(self._dir.name) / "port"
        log = open(Path(self._dir.name) / "server.log", "wb")  # noqa: SIM115 - handed to the child
        cmd = [
            sys.executable,
            "-m",
            "labkit.localapi",
            "--host",
            self.host,
            "--port",
            str(self.requested_port),
            "--port-file",
            str(port_file),
            "--watch-parent",
            *self._args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + self.startup_timeout
        try:
            while self.port is None:
                if self.proc.poll() is not None:
                    raise ConfigurationError(
                        f"The local API ({self.engine}) exited during start-up:\n{self._log_tail()}",
                        hint="Run `labkit local-api` in a terminal to see the full error.",
                    )
                if port_file.exists():
                    self.port = int(port_file.read_text())
                    break
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"The local API did not start within {self.startup_timeout:g} s."
                    )
                time.sleep(0.02)
            while True:
                try:
                    if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"The local API did not become healthy:\n{self._log_tail()}",
                        hint="Run `labkit local-api` in a terminal to see the full error.",
                    )
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 5 s)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self.port = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def requests(self, limit: int = 0) -> list[dict[str, Any]]:
        """The request bodies the API received last, oldest first (``GET /v1/labkit/requests``).

        Each entry has ``method``, ``path``, ``received_at`` (epoch seconds), ``headers``
        (the ``x-labkit-*`` ones), ``body`` (the parsed JSON; None above 1 MB) and
        ``body_bytes``. ``limit`` keeps only the newest ``limit`` entries.
        """
        params = {"limit": limit} if limit else None
        resp = httpx.get(self.base_url + "/v1/labkit/requests", params=params, timeout=10.0)
        resp.raise_for_status()
        return list(resp.json()["requests"])

    def metrics(self) -> dict[str, float]:
        """``/metrics`` parsed: ``{"labkit_streams_cancelled_total": 1.0, ...}``."""
        text = httpx.get(self.base_url + "/metrics", timeout=5.0).text
        return parse_prometheus(text)

    def __enter__(self) -> LocalAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.base_url if self.port else "not running"
        return f"LocalAPIServer(engine={self.engine!r}, {where})"
