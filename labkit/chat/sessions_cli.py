"""What ``labkit sessions list|show|delete`` print (kept out of ``labkit.cli`` so the
commands stay thin and these can be tested directly)."""

from __future__ import annotations

import json
import sys

from rich.console import Console
from rich.table import Table

from ..errors import SessionNotFoundError
from ..store import open_store, resolve_store_url

__all__ = ["delete_session", "format_age", "print_session", "print_session_list"]


def format_age(seconds: float) -> str:
    """``42s``, ``5m 3s``, ``2h 10m``, ``3d 4h``."""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _out() -> Console:
    # Piped output (tests, notebooks) gets a wide fixed width instead of Rich's 80.
    return Console(file=sys.stdout, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


def print_session_list(
    url: str | None, *, as_json: bool = False, archive: str | None = None
) -> None:
    with open_store(url, archive=archive) as store:
        sessions = store.list_sessions()
        where = getattr(store, "archive_url", None) or resolve_store_url(url)
    if as_json:
        print(json.dumps([s.to_dict() for s in sessions], indent=2))
        return
    out = _out()
    if not sessions:
        out.print(f"No sessions in {where}. Start one with `labkit chat`.")
        return
    table = Table(title=f"{len(sessions)} session(s) in {where}")
    for col in ("id", "turns", "in tok", "out tok", "updated (UTC)", "age", "system prompt"):
        numeric = col in {"turns", "in tok", "out tok"}
        table.add_column(col, no_wrap=col == "id", justify="right" if numeric else "left")
    for s in sessions:
        prompt = s.system_prompt if len(s.system_prompt) <= 40 else s.system_prompt[:37] + "..."
        table.add_row(
            s.id,
            str(s.turn_count),
            str(s.input_tokens),
            str(s.output_tokens),
            s.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
            format_age(s.age_seconds),
            prompt,
        )
    out.print(table)


def print_session(
    url: str | None, session_id: str, *, as_json: bool = False, archive: str | None = None
) -> None:
    with open_store(url, archive=archive) as store:
        info = store.get_session(session_id)
        summary = store.get_summary(session_id)
        turns = store.load_turns(session_id)
    if as_json:
        doc = {
            "session": info.to_dict(),
            "summary": None
            if summary is None
            else {"summary": summary.summary, "covers_turns": summary.covers_turns},
            "turns": [t.to_dict() for t in turns],
        }
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return
    out = _out()
    out.print(f"[bold]session[/] {info.id}")
    out.print(
        f"turns {info.turn_count} · input tokens {info.input_tokens} · output tokens "
        f"{info.output_tokens} · age {format_age(info.age_seconds)} · model {info.model or '-'}"
    )
    estimated = sum(1 for t in turns if t.meta.get("usage_source") == "tiktoken_estimate")
    if estimated:
        out.print(
            f"[yellow]of which {estimated} turn(s) estimated (tiktoken): the server sent no "
            "usage for them[/]"
        )
    if info.system_prompt:
        out.print(f"[dim]system:[/] {info.system_prompt}", markup=True, highlight=False)
    if summary is not None:
        out.print(
            f"[dim]summary of turns 1–{summary.covers_turns}:[/] {summary.summary}", highlight=False
        )
    for t in turns:
        out.print(f"[bold cyan]you[{t.index + 1}]>[/] ", end="")
        out.print(t.user, markup=False, highlight=False)
        out.print("[bold green]assistant>[/] ", end="")
        out.print(t.assistant, markup=False, highlight=False)


def delete_session(url: str | None, session_id: str, *, archive: str | None = None) -> None:
    with open_store(url, archive=archive) as store:
        if not store.delete_session(session_id):
            raise SessionNotFoundError(session_id)
    _out().print(f"Deleted session {session_id}.")
