"""The ``labkit`` command.

Each command is a thin edge: it parses options, calls the library, and translates
:class:`~labkit.errors.LabkitError` into a one-line message with a hint and exit
code 2. Heavy imports happen inside the commands so ``labkit --help`` is instant.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from .errors import LabkitError

app = typer.Typer(
    help="labkit: labs and benchmarks for LLM streaming and conversation state.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def friendly_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LabkitError into 'error: message' + hint on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LabkitError as exc:
            err.print(f"[bold red]error:[/] {exc.message}")
            if exc.hint:
                err.print(f"[yellow]hint:[/] {exc.hint}")
            sys.exit(2)

    return wrapper


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"labkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the version and exit.",
    ),
) -> None:
    """labkit: labs and benchmarks for LLM streaming and conversation state.

    Offline by default (a real small model behind labkit's local API); set
    LABKIT_PROVIDER=anthropic or openai (and the key) to use a real API.
    """


# ── labs ──────────────────────────────────────────────────────────────────────


@app.command()
@friendly_errors
def labs(
    notebooks: list[str] = typer.Argument(
        None, help="Notebooks to run (default: all of notebooks/)."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="Shrink trials and turns (sets LABKIT_QUICK=1)."
    ),
) -> None:
    """Run the notebooks top to bottom, save their outputs, and gather results/SUMMARY.md."""
    from .labs import run_labs

    run_labs(notebooks or None, quick=quick)


# ── local-api (labkit.localapi) ───────────────────────────────────────────────


@app.command(
    "local-api",
    add_help_option=False,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
@friendly_errors
def local_api(ctx: typer.Context) -> None:
    """Serve the Anthropic Messages and OpenAI Chat Completions APIs on 127.0.0.1 (flags: labkit local-api --help).

    The flags are the local API's own (labkit.localapi.options, shared with
    python -m labkit.localapi): this command hands them over unchanged.
    """
    from .localapi.options import run

    run(ctx.args, prog="labkit local-api")


# ── ttft (labkit.bench.lab1) ───────────────────────────────────────────────────


@app.command()
@friendly_errors
def ttft(
    prompts: str = typer.Option(
        "data/lab1_prompts.jsonl",
        "--prompts",
        help="JSON-lines prompts file (id, prompt, max_tokens per line), relative to the working directory.",
    ),
    provider: str = typer.Option(
        None, "--provider", help="local (default, or $LABKIT_PROVIDER), anthropic or openai."
    ),
    base_url: str = typer.Option(
        None, "--base-url", help="Send requests here (any compatible server)."
    ),
    model: str = typer.Option(None, "--model", help="Model id (default: the provider's)."),
    engine: str = typer.Option(
        "llama", "--engine", help="Local engine when starting one: llama or sim."
    ),
    api: str = typer.Option(
        None, "--api", help="Wire format: anthropic or openai (default: the provider's)."
    ),
    trials: int = typer.Option(3, "--trials", min=1, help="Recorded requests per prompt and mode."),
    warmup: int = typer.Option(1, "--warmup", min=0, help="Unrecorded requests first."),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Requests in flight at once."),
    cache: str = typer.Option(
        "off", "--cache", help="Prompt cache on|off (off measures TTFT cold)."
    ),
    non_stream: bool = typer.Option(
        True, "--non-stream/--stream-only", help="Also time each prompt without streaming."
    ),
    out: str = typer.Option(
        None, "--out", help="CSV file: one row per request, every timestamp and metric."
    ),
) -> None:
    """Measure TTFT, ITL and total time, streamed vs not, on a prompts file."""
    import csv

    from rich.table import Table

    from .bench.lab1 import (
        cache_report,
        load_prompts,
        per_prompt_table,
        protocol_report,
        run_trials,
    )
    from .errors import ConfigurationError
    from .providers import client

    if cache not in ("on", "off"):
        raise ConfigurationError(
            f"--cache must be on or off, not {cache!r}.", hint="Use --cache on or --cache off."
        )
    if api not in (None, "anthropic", "openai"):
        raise ConfigurationError(
            f"--api must be anthropic or openai, not {api!r}.",
            hint="Use --api anthropic or --api openai.",
        )
    loaded = load_prompts(prompts)
    clients = client(provider, model=model, base_url=base_url, engine=engine)
    rows = run_trials(
        clients,
        loaded,
        trials=trials,
        warmup=warmup,
        concurrency=concurrency,
        cache=cache == "on",
        api=api,
        non_stream=non_stream,
    )
    if out:
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with open(out, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    d = clients.describe()
    cache_state, cache_warnings = cache_report(rows, cache=cache == "on")
    table = Table(
        title=f"TTFT — {d['provider']} {d['model']} ({d.get('engine') or d.get('base_url') or 'default'}), "
        f"medians of {trials} trial(s), concurrency {concurrency}, cache {cache_state}"
    )
    for col in (
        "prompt",
        "out tokens",
        "stream TTFT ms",
        "stream total ms",
        "non-stream total ms",
        "TTFT speedup",
        "ITL p50 ms",
    ):
        table.add_column(col, justify="left" if col == "prompt" else "right")

    def fmt(v: object, spec: str = ".1f") -> str:
        return "—" if v is None else format(v, spec)

    for r in per_prompt_table(rows):
        table.add_row(
            r["prompt"],
            fmt(r["output_tokens"], ".0f"),
            fmt(r["stream_ttft_ms"]),
            fmt(r["stream_total_ms"]),
            fmt(r["non_stream_total_ms"]),
            fmt(r["ttft_speedup"], ".1f") + ("×" if r["ttft_speedup"] else ""),
            fmt(r["itl_p50_ms"], ".2f"),
        )
    Console().print(table)
    for warning in cache_warnings + protocol_report(rows):
        err.print(f"[yellow]warning:[/] {warning}")
    errors = [r for r in rows if r.get("error")]
    if errors:
        err.print(
            f"[yellow]{len(errors)} of {len(rows)} requests failed[/] "
            f"({', '.join(sorted({str(r['error']) for r in errors}))}); they are in the CSV, not the medians."
        )
    if out:
        err.print(f"wrote {len(rows)} rows to {out}")


# ── sessions and chat (labkit.store) ──────────────────────────────────────────

sessions_app = typer.Typer(
    help="List, show and delete stored chat sessions (SQLite by default; Redis, PostgreSQL or Redis + an archive by URL).",
    no_args_is_help=True,
)
app.add_typer(sessions_app, name="sessions")
_STORE_HELP = "Store URL: sqlite:///path.db, redis://host:port/db or postgresql://user@host:port/db (default: $LABKIT_STORE, else sqlite:///conversations.db)."
_ARCHIVE_HELP = "Durable archive behind a Redis --store: sqlite:///path.db or postgresql://user@host:port/db (default: $LABKIT_ARCHIVE)."


@sessions_app.command("list")
@friendly_errors
def sessions_list(
    store: str = typer.Option(None, "--store", help=_STORE_HELP),
    archive: str = typer.Option(None, "--archive", help=_ARCHIVE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List sessions, most recently updated first (from the archive, if there is one)."""
    from .chat.sessions_cli import print_session_list

    print_session_list(store, as_json=as_json, archive=archive)


@sessions_app.command("show")
@friendly_errors
def sessions_show(
    session_id: str = typer.Argument(..., help="The session id (32 hex characters)."),
    store: str = typer.Option(None, "--store", help=_STORE_HELP),
    archive: str = typer.Option(None, "--archive", help=_ARCHIVE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (info, summary, turns)."),
) -> None:
    """Show one session: its stats, summary and every turn."""
    from .chat.sessions_cli import print_session

    print_session(store, session_id, as_json=as_json, archive=archive)


@sessions_app.command("delete")
@friendly_errors
def sessions_delete(
    session_id: str = typer.Argument(..., help="The session id (32 hex characters)."),
    store: str = typer.Option(None, "--store", help=_STORE_HELP),
    archive: str = typer.Option(None, "--archive", help=_ARCHIVE_HELP),
) -> None:
    """Delete a session with its turns and summary."""
    from .chat.sessions_cli import delete_session

    delete_session(store, session_id, archive=archive)


@app.command()
@friendly_errors
def chat(
    session: str = typer.Option(
        None, "--session", help="Resume this session id (see `labkit sessions list`)."
    ),
    store: str = typer.Option(None, "--store", help=_STORE_HELP),
    archive: str = typer.Option(None, "--archive", help=_ARCHIVE_HELP),
    ttl: int = typer.Option(
        600,
        "--ttl",
        help="Redis only: seconds of inactivity before the session expires (0 = never);"
        " with --archive it then lives on in the archive.",
    ),
    summarise: bool = typer.Option(
        False, "--summarise", help="Fold history into a persisted summary past 20 turns."
    ),
    system: str = typer.Option(None, "--system", help="System prompt of a new session."),
    provider: str = typer.Option(
        None, "--provider", help="local (default), anthropic or openai ($LABKIT_PROVIDER)."
    ),
    base_url: str = typer.Option(None, "--base-url", help="Use an already running compatible API."),
    engine: str = typer.Option(
        "llama", "--engine", help="Local provider only: llama (the real model) or sim."
    ),
    model: str = typer.Option(None, "--model", help="Model id (default: the provider's)."),
    max_tokens: int = typer.Option(512, "--max-tokens", help="Longest reply, in tokens."),
) -> None:
    """Chat in the terminal; every complete turn is saved. Ctrl+C cancels a reply, Ctrl+D ends."""
    from .chat.terminal import run_chat

    run_chat(
        session_id=session,
        store_url=store,
        archive_url=archive,
        ttl=ttl,
        summarise=summarise,
        system=system,
        provider=provider,
        base_url=base_url,
        engine=engine,
        model=model,
        max_tokens=max_tokens,
    )


# ── serve (labkit.server) ─────────────────────────────────────────────────────


@app.command()
@friendly_errors
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free port, printed at start)."),
    store: str = typer.Option(None, "--store", help=_STORE_HELP),
    archive: str = typer.Option(None, "--archive", help=_ARCHIVE_HELP),
    ttl: int = typer.Option(None, "--ttl", help="Redis session TTL in seconds."),
    provider: str = typer.Option(None, "--provider", help="local (default), anthropic or openai."),
    base_url: str = typer.Option(
        None, "--base-url", help="Any compatible API, e.g. a `labkit local-api --engine sim`."
    ),
    model: str = typer.Option(None, "--model", help="Model id (default: the provider's)."),
    engine: str = typer.Option(
        "llama", "--engine", help="Local API engine when no --base-url: llama or sim."
    ),
    context_budget: int = typer.Option(
        50_000,
        "--context-budget",
        help="Tokens above which only the last --keep-turns turns are sent.",
    ),
    keep_turns: int = typer.Option(
        10, "--keep-turns", help="Turns sent when the budget is exceeded."
    ),
    max_message_chars: int = typer.Option(
        32_000, "--max-message-chars", min=1, help="Longest user message accepted, in characters."
    ),
    max_system_prompt_chars: int = typer.Option(
        16_000,
        "--max-system-prompt-chars",
        min=0,
        help="Longest system prompt accepted, in characters (with --max-message-chars, sets the body bound).",
    ),
    max_header_bytes: int = typer.Option(
        16_384, "--max-header-bytes", min=1024, help="Longest request line + headers, in bytes."
    ),
    api_key: str = typer.Option(
        None,
        "--api-key",
        envvar="LABKIT_SERVER_KEY",
        show_envvar=True,
        help="Server key: every route but /health and / then needs 'Authorization: Bearer KEY'. "
        "Prefer the environment variable (a command line is visible in ps).",
    ),
    insecure_no_auth: bool = typer.Option(
        False,
        "--insecure-no-auth",
        help="Serve a non-loopback --host without a key (anyone who can reach it reads every conversation).",
    ),
    log_level: str = typer.Option(
        "info",
        "--log-level",
        help="critical, error, warning, info or debug (debug also logs tracebacks).",
    ),
    max_tokens: int = typer.Option(512, "--max-tokens", help="max_tokens of each reply."),
    temperature: float = typer.Option(None, "--temperature", help="Sampling temperature."),
    max_retries: int = typer.Option(2, "--max-retries", help="SDK retries before the first byte."),
    ping_seconds: float = typer.Option(
        15.0, "--ping-seconds", help="Seconds between SSE keep-alive comments."
    ),
    access_log: bool = typer.Option(
        True, "--access-log/--no-access-log", help="Log one line per request."
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        help="Server processes on the one port (they share sessions and locks through the "
        "store: use Redis or PostgreSQL, and --base-url for the model).",
    ),
) -> None:
    """Run the streaming chat API with persistent sessions (docs at /docs, chat page at /).

    On 127.0.0.1 (the default) no key is needed; on any other --host, set a key
    (LABKIT_SERVER_KEY or --api-key) or pass --insecure-no-auth.
    """
    from .errors import ConfigurationError
    from .server import Settings
    from .server import serve as run
    from .server.auth import check_binding, check_key

    if log_level.lower() not in ("critical", "error", "warning", "info", "debug"):
        raise ConfigurationError(
            f"--log-level {log_level!r} is not a level.",
            hint="Use critical, error, warning, info or debug.",
        )
    key = check_key(api_key)
    warning = check_binding(host, key, insecure_no_auth=insecure_no_auth)
    if warning:
        err.print(f"[bold red]warning:[/] {warning}")
    settings = Settings(
        store_url=store,
        store_archive=archive,
        store_ttl=ttl,
        provider=provider,
        base_url=base_url,
        model=model,
        engine=engine,
        context_budget=context_budget,
        keep_turns=keep_turns,
        max_message_chars=max_message_chars,
        max_system_prompt_chars=max_system_prompt_chars,
        max_header_bytes=max_header_bytes,
        max_tokens=max_tokens,
        temperature=temperature,
        max_retries=max_retries,
        ping_seconds=ping_seconds,
        server_key=key,
        loopback_hosts_only=not insecure_no_auth,
    )
    run(
        settings,
        host=host,
        port=port,
        access_log=access_log,
        log_level=log_level.lower(),
        workers=workers,
    )


if __name__ == "__main__":
    app()
