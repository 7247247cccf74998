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
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
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
    notebooks: list[str] = typer.Argument(None, help="Notebooks to run (default: all of notebooks/)."),
    quick: bool = typer.Option(False, "--quick", help="Shrink trials and turns (sets LABKIT_QUICK=1)."),
) -> None:
    """Run the notebooks top to bottom, save their outputs, and gather results/SUMMARY.md."""
    from .labs import run_labs

    run_labs(notebooks or None, quick=quick)


# ── local-api (labkit.localapi) ───────────────────────────────────────────────


# ── ttft (labkit.timing) ──────────────────────────────────────────────────────


# ── sessions and chat (labkit.store) ──────────────────────────────────────────


# ── serve (labkit.server) ─────────────────────────────────────────────────────


if __name__ == "__main__":
    app()
