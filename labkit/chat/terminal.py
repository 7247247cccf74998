"""The terminal loop of ``labkit chat``: a conversation persisted in a session store.

Each line you type is one turn: the reply streams as it arrives, and when it is
complete the turn is saved (:class:`labkit.chat.session.ChatSession` does the saving,
the context strategy and the turn lock). ``--session ID`` resumes a stored
conversation with its full context.

Notes:

1. Ctrl+C during a reply closes the stream (the server stops generating) and neither
   the question nor the partial reply is kept: the text you saw is gone. The same holds
   if the process is killed mid-reply — nothing was written yet. Ctrl+C at the prompt,
   or EOF (Ctrl+D, or the end of piped input), ends the session.
2. This is an edge: it builds the SDK clients (:func:`labkit.providers.client`) from
   the command's flags and hands them to the session.
3. A new session that ends with no turn is deleted, so trying the command leaves
   nothing behind.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape

from ..errors import LabkitError
from ..providers import client
from ..store import open_store, resolve_store_url
from .session import ChatSession

__all__ = ["run_chat"]


def run_chat(
    *,
    session_id: str | None = None,
    store_url: str | None = None,
    archive_url: str | None = None,
    ttl: int | None = None,
    summarise: bool = False,
    system: str | None = None,
    provider: str | None = None,
    base_url: str | None = None,
    engine: str = "llama",
    model: str | None = None,
    max_tokens: int = 512,
    console: Console | None = None,
    read: Callable[[str], str] | None = None,
) -> str:
    """Run the interactive loop until EOF / Ctrl+C at the prompt; return the session id."""
    out = console or Console(file=sys.stdout, highlight=False, soft_wrap=True)
    ask = read or input
    echo = read is None and not sys.stdin.isatty()  # piped input: show what was "typed"
    url = resolve_store_url(store_url)
    store = open_store(url, ttl=ttl, archive=archive_url)
    try:
        clients = client(provider, model=model, base_url=base_url, engine=engine)
        chat = ChatSession(
            store,
            session_id=session_id,
            clients=clients,
            system=system,
            summarise=summarise,
            max_tokens=max_tokens,
        )
        archived = getattr(store, "archive_url", None)
        shown = f"{url} + archive {archived}" if archived else url
        _banner(out, chat, shown, clients, system, engine if base_url is None else None)
        while True:
            try:
                line = ask("you> ")
            except (EOFError, KeyboardInterrupt):
                out.print()
                break
            if echo:
                out.print(line, markup=False)
            if not line.strip():
                continue
            out.print("[bold green]assistant>[/] ", end="")

            def show(text: str) -> None:
                out.print(text, end="", markup=False)
                out.file.flush()

            try:
                chat.send(line, show)
            except KeyboardInterrupt:
                out.print("\n[yellow]\\[reply cancelled: this turn was not saved][/]")
                continue
            except LabkitError as exc:
                out.print(f"\n[bold red]error:[/] {exc.message}")
                if exc.hint:
                    out.print(f"[yellow]hint:[/] {exc.hint}")
                continue
            out.print()
            out.file.flush()
        n = store.get_session(chat.id).turn_count
        if n == 0 and not chat.resumed:
            store.delete_session(chat.id)
            out.print(f"[dim]session {chat.id} had no turns; not kept.[/]")
        else:
            out.print(
                f"[dim]session {chat.id}: {n} turns saved. Resume with "
                f"`labkit chat --session {chat.id}`.[/]"
            )
        return chat.id
    finally:
        store.close()


def _banner(
    out: Console, chat: ChatSession, url: str, clients: Any, system: str | None, engine: str | None
) -> None:
    if chat.resumed:
        out.print(f"session {chat.id} (resumed, {chat.info.turn_count} turns)")
        if system and system != chat.info.system_prompt:
            out.print(
                "[yellow]note:[/] --system is ignored when resuming; the stored prompt is kept."
            )
    else:
        out.print(f"session {chat.id} (new)")
    via = (
        f"{clients.provider}, engine {engine}"
        if engine and clients.provider == "local"
        else clients.provider
    )
    out.print(
        f"[dim]store {url} · model {clients.model} via {via} · "
        "Ctrl+C cancels a reply, Ctrl+D ends[/]"
    )
    s = chat.summary()
    if s is not None:
        out.print(f"[dim]summary of turns 1-{s[1]} loaded:[/] {_esc(s[0])}")
    if chat.resumed:
        for t in chat.store.load_turns(chat.id, last_n_turns=2):
            out.print(f"[dim]you[{t.index + 1}]> {_esc(t.user)}[/]")
            out.print(f"[dim]assistant> {_esc(t.assistant)}[/]")


def _esc(text: str) -> str:
    return escape(text if len(text) <= 300 else text[:297] + "...")
