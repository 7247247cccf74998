"""Running the local API: ``serve()`` in this process, or :class:`LocalAPIServer` in a child.

Notes:

1. The child binds its own socket (port 0 → a free port chosen by the kernel, no
   race) and writes the port to a file the parent polls; the parent then waits for
   ``GET /health``.
2. The child runs in its own session (Ctrl+C in a notebook does not kill it) and
   watches its parent: when the parent dies (even by SIGKILL) the child exits
   within a second. The parent also stops it at exit (``atexit``).
3. The child's log (stderr) goes to a temporary file; a failed start quotes its tail.
"""

from __future__ import annotations

import argparse
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
from .engines import SimOptions, make_engine
from .metrics import Metrics, parse_prometheus

__all__ = ["LocalAPIServer", "add_arguments", "options_from_args", "serve"]

_SIM_KEYS = ("ttft_ms", "itl_ms", "jitter_ms", "reply_tokens", "seed", "fail_before", "fail_after", "fail_with", "fail_rate")


def serve(
    engine: str = "llama",
    *,
    host: str = "127.0.0.1",
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
    config = uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=1)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The local API's command-line options (shared by ``python -m`` and ``labkit local-api``)."""
    d = SimOptions()
    parser.add_argument("--engine", choices=["llama", "sim"], default="llama", help="llama: the real SmolLM2 model (default); sim: no model, exact latency and faults.")
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8765, help="Port (0 picks a free one; default 8765).")
    parser.add_argument("--no-cache", action="store_true", help="llama: turn prefix (prompt) caching off for every request.")
    parser.add_argument("--n-threads", type=int, default=None, help="llama: threads (default: available cores).")
    sim = parser.add_argument_group("sim engine")
    sim.add_argument("--ttft-ms", type=float, default=None, help=f"Request → first text delta, ms (default {d.ttft_ms:g}).")
    sim.add_argument("--itl-ms", type=float, default=None, help=f"Gap between text deltas, ms (default {d.itl_ms:g}).")
    sim.add_argument("--jitter-ms", type=float, default=None, help="Random extra delay 0..J ms per delta (default 0).")
    sim.add_argument("--reply-tokens", type=int, default=None, help=f"Text deltas per reply (default {d.reply_tokens}).")
    sim.add_argument("--seed", type=int, default=None, help="Seed of the text, jitter and --fail-rate (default 0).")
    sim.add_argument("--fail-before", default=None, help="Fail every request before any byte with this error type (e.g. rate_limit_error, overloaded_error) or 'disconnect'.")
    sim.add_argument("--fail-after", type=int, default=None, help="Fail every stream after N text deltas (see --fail-with).")
    sim.add_argument("--fail-with", default=None, help="Mid-stream failure: an error type (SSE error event) or 'disconnect' (default api_error).")
    sim.add_argument("--fail-rate", type=float, default=None, help="Apply the fault to this share (0..1) of requests only (overloaded_error before any byte if no fault is set).")


def options_from_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(engine, engine_opts)`` from parsed arguments; sim flags with llama are an error."""
    sim = {k: getattr(args, k) for k in _SIM_KEYS if getattr(args, k, None) is not None}
    if args.engine == "sim":
        if args.no_cache or args.n_threads:
            raise ConfigurationError("--no-cache and --n-threads apply to --engine llama only.")
        return "sim", sim
    if sim:
        flags = ", ".join("--" + k.replace("_", "-") for k in sim)
        raise ConfigurationError(f"{flags}: sim options need --engine sim.", hint="Add --engine sim, or drop those flags.")
    opts: dict[str, Any] = {"cache": not args.no_cache}
    if args.n_threads:
        opts["n_threads"] = args.n_threads
    return "llama", opts


def _option_args(engine: str, opts: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in opts.items():
        if value is None:
            continue
        if key == "cache":
            if not value:
                out.append("--no-cache")
            continue
        if key not in (*_SIM_KEYS, "n_threads"):
            hint = "Sim options: " + ", ".join(_SIM_KEYS) + "; llama options: cache, n_threads."
            raise ConfigurationError(f"Unknown local API option {key!r} for engine {engine!r}.", hint=hint)
        out += ["--" + key.replace("_", "-"), str(value)]
    return out


class LocalAPIServer:
    """The local API in a child process, for tests, notebooks and ``providers.client()``.

    >>> with LocalAPIServer("sim", ttft_ms=0, itl_ms=0) as api:   # doctest: +SKIP
    ...     anthropic.Anthropic(base_url=api.base_url, api_key="local")
    """

    def __init__(
        self,
        engine: str = "llama",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 90.0,
        **engine_opts: Any,
    ) -> None:
        if engine not in ("llama", "sim"):
            raise ConfigurationError(f"Unknown engine {engine!r}.", hint="Use engine='llama' or engine='sim'.")
        self.engine = engine
        self.host = host
        self.requested_port = port
        self.engine_opts = engine_opts
        self.startup_timeout = startup_timeout
        self._args = _option_args(engine, engine_opts)
        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def base_url(self) -> str:
        """What the Anthropic SDK takes as ``base_url`` (no ``/v1``)."""
        if self.port is None:
            raise ConfigurationError("The local API is not running.", hint="Call start() or use it as a context manager.")
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
            sys.executable, "-m", "labkit.localapi", "--engine", self.engine, "--host", self.host,
            "--port", str(self.requested_port), "--port-file", str(port_file), "--watch-parent", *self._args,
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
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
                    raise ConfigurationError(f"The local API did not start within {self.startup_timeout:g} s.")
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
