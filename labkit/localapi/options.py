"""The local API's command line, defined once.

``python -m labkit.localapi``, ``labkit local-api`` and the child process of
:class:`~.server.LocalAPIServer` all parse their arguments with :func:`build_parser`.

Notes on deliberate choices:

1. Each flag is defined once, here. The sim flags are built from the fields of
   :class:`~.sim.SimOptions` (their names, types, defaults and help), so a sim option
   is a flag, an ``x-labkit-sim`` header key and a ``LocalAPIServer`` keyword at once.
   ``labkit local-api`` hands its arguments to this parser unchanged, so its ``--help``
   is this parser's help; :func:`option_args` turns ``LocalAPIServer``'s keywords back
   into these flags for its child.
2. A flag left out is ``None``, so the engine's own default applies; a flag of the
   other engine is an error, not silently ignored (:func:`~.engine.check_options`).
   The engine name is checked by :func:`~.engine.check_engine` alone.
3. Everything here is light: the server, the app and the engine's libraries are
   imported by :func:`run` only once the arguments are known to be valid.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, Field, fields
from typing import Any

from ..errors import ConfigurationError
from .constants import DEFAULT_HOST, DEFAULT_PORT, ENGINES
from .engine import check_engine, check_options
from .sim import SimOptions

__all__ = ["build_parser", "option_args", "options_from_args", "run"]

_DESCRIPTION = """\
Serve the Anthropic Messages and OpenAI Chat Completions APIs on 127.0.0.1.

Point the SDKs at it: anthropic.Anthropic(base_url="http://127.0.0.1:8765", api_key="local")
or openai.OpenAI(base_url="http://127.0.0.1:8765/v1", api_key="local"); or set
LABKIT_PROVIDER=anthropic ANTHROPIC_BASE_URL=http://127.0.0.1:8765 for any labkit command."""

_EPILOG = """\
Per request, the sim engine reads the header
  x-labkit-sim: ttft_ms=300;itl_ms=15;fail_after=5;fail_with=api_error
(the keys are the sim flags' names), and both engines read x-labkit-cache: off.
GET /health, GET /v1/models, GET /metrics (Prometheus text), GET /v1/labkit/requests
(the last 64 request bodies received, for tests and exercise checkers)."""

_MAX_PORT = 65535


def _flag(name: str) -> str:
    """The command-line spelling of an engine option."""
    return "--no-cache" if name == "cache" else "--" + name.replace("_", "-")


def _flag_type(f: Field[Any]) -> type:
    t = str(f.type)
    return float if t.startswith("float") else int if t.startswith("int") else str


def _shown(default: Any) -> str:
    if default is None:
        return "none"
    return f"{default:g}" if isinstance(default, float) else str(default)


def build_parser(prog: str = "python -m labkit.localapi") -> argparse.ArgumentParser:
    """The parser of every local API command line (note 1)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--engine",
        default=ENGINES[0],
        metavar="{" + ",".join(ENGINES) + "}",
        help="llama: the real SmolLM2-135M-Instruct model (default); sim: no model, exact latency and injectable faults.",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help=f"Interface to listen on (default {DEFAULT_HOST})."
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"Port (0 picks a free one; default {DEFAULT_PORT}).",
    )
    parser.add_argument("--port-file", help="Write the bound port to this file once listening.")
    parser.add_argument(
        "--watch-parent", action="store_true", help="Exit when the parent process exits."
    )
    llama = parser.add_argument_group("llama engine")
    llama.add_argument(
        "--no-cache",
        action="store_true",
        help="Turn prefix (prompt) caching off for every request (cold TTFT).",
    )
    llama.add_argument(
        "--n-threads",
        type=int,
        default=None,
        help="Threads (default: all cores to read the prompt, one fewer to decode).",
    )
    llama.add_argument(
        "--flash-attn",
        choices=("on", "off"),
        default=None,
        help="Flash attention (default on, as llama-server's: faster on short contexts, "
        "slower past a few hundred tokens).",
    )
    sim = parser.add_argument_group("sim engine")
    for f in fields(SimOptions):
        default = f.default if f.default is not MISSING else None
        sim.add_argument(
            _flag(f.name),
            type=_flag_type(f),
            default=None,
            help=f"{f.metadata['help'].rstrip('.')} (default {_shown(default)}).",
        )
    return parser


def options_from_args(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``(engine, engine_opts)`` from parsed arguments (note 2)."""
    engine = check_engine(args.engine)
    if not 0 <= args.port <= _MAX_PORT:
        raise ConfigurationError(
            f"--port {args.port} is out of range.", hint=f"Use 0..{_MAX_PORT} (0 picks a free one)."
        )
    if args.n_threads is not None and args.n_threads < 1:
        raise ConfigurationError(
            f"--n-threads {args.n_threads}: need at least 1.", hint="Leave it out for the default."
        )
    given: dict[str, Any] = {f.name: getattr(args, f.name) for f in fields(SimOptions)}
    given["cache"] = False if args.no_cache else None
    given["n_threads"] = args.n_threads
    given["flash_attn"] = None if args.flash_attn is None else args.flash_attn == "on"
    opts = {k: v for k, v in given.items() if v is not None}
    check_options(engine, opts, spell=_flag)
    return engine, opts


def option_args(engine: str, opts: dict[str, Any]) -> list[str]:
    """The flags that give ``engine`` the keyword options ``opts`` (what LocalAPIServer's child is run with)."""
    given = {k: v for k, v in opts.items() if v is not None}  # None: the engine's default
    check_options(engine, given)
    out = ["--engine", engine]
    for key, value in given.items():
        if key == "cache":
            if not value:
                out.append("--no-cache")
            continue
        out += [_flag(key), ("on" if value else "off") if isinstance(value, bool) else str(value)]
    return out


def run(argv: list[str] | None = None, *, prog: str = "python -m labkit.localapi") -> None:
    """Parse ``argv`` and serve until interrupted; raises LabkitError for a wrong option."""
    args = build_parser(prog).parse_args(argv)
    engine, opts = options_from_args(args)

    def listening(host: str, port: int) -> None:
        print(
            f"labkit local API ({engine}) on http://{host}:{port}  (Ctrl+C to stop)",
            file=sys.stderr,
            flush=True,
        )

    from .server import serve

    serve(
        engine,
        host=args.host,
        port=args.port,
        port_file=args.port_file,
        watch_parent=args.watch_parent,
        on_listening=listening,
        **opts,
    )
