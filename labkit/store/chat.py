"""The loop behind ``labkit chat``: a terminal conversation persisted in a session store.

Each line you type is one turn: the reply streams as it arrives, and when it is
complete the turn (your message, the reply and their token usage) is saved in one
atomic write. ``--session ID`` resumes a stored conversation with its full context.

Notes:

1. **Only complete turns are saved.** Ctrl+C during a reply closes the stream (the
   server stops generating) and neither the question nor the partial reply is kept:
   the history stays well-formed, and the text you saw is gone. The same holds if the
   process is killed mid-reply — nothing was written yet. Ctrl+C at the prompt, or
   EOF (Ctrl+D, or the end of piped input), ends the session.
2. The model call and the context strategy are :class:`labkit.history.ConversationManager`'s;
   this module only loads the stored turns into it and saves each new one.
3. ``--summarise`` uses :class:`labkit.history.Summarise`: once a conversation has
   more than :data:`SUMMARISE_AFTER_TURNS` turns, its older turns are folded into a
   running summary (made by the same model) and only the last
   :data:`KEEP_RECENT_TURNS` are sent verbatim. The summary is persisted with the
   session (``set_summary``) and restored on resume, so it is not recomputed.
4. Every turn holds the session's ``turn_lock``, so two ``labkit chat`` processes
   (or a chat and ``labkit serve``) never interleave turns on one session; before
   each turn the stored turn count is compared with ours and the history reloaded if
   another writer added turns.
5. A new session that ends with no turn is deleted, so trying the command leaves
   nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console

from ..errors import LabkitError, SessionNotFoundError
from . import SessionStore, open_store, resolve_store_url, validate_session_id

__all__ = ["KEEP_RECENT_TURNS", "SUMMARISE_AFTER_TURNS", "ChatProcess", "ChatSession", "run_chat"]

#: ``--summarise`` folds history once a conversation has more turns than this.
SUMMARISE_AFTER_TURNS = 20
#: Turns sent verbatim after the summary (folding happens in steps of this many).
KEEP_RECENT_TURNS = 10


class ChatSession:
    """A :class:`~labkit.history.ConversationManager` bound to one stored session."""

    def __init__(
        self,
        store: SessionStore,
        *,
        session_id: str | None = None,
        clients: Any,
        system: str | None = None,
        summarise: bool = False,
        max_tokens: int = 512,
        temperature: float | None = None,
    ) -> None:
        from ..history import ConversationManager, FullHistory, Summarise, model_summariser

        self.store = store
        self.clients = clients
        self.resumed = session_id is not None
        if session_id is not None:
            validate_session_id(session_id)
            try:
                self.info = store.get_session(session_id)
            except SessionNotFoundError as exc:
                raise SessionNotFoundError(
                    session_id,
                    hint="List stored sessions with `labkit sessions list` (same --store), "
                    "or leave out --session to start a new one.",
                ) from exc
        else:
            self.info = store.create_session(
                system_prompt=system or "", model=getattr(clients, "model", "") or ""
            )
        self.id = self.info.id
        if summarise:
            strategy: Any = Summarise(
                model_summariser(clients, max_tokens=256),
                keep_recent=KEEP_RECENT_TURNS,
                every=SUMMARISE_AFTER_TURNS - KEEP_RECENT_TURNS,
            )
        else:
            strategy = FullHistory()
        self.manager = ConversationManager(
            clients,
            system_prompt=self.info.system_prompt,
            max_tokens=max_tokens,
            strategy=strategy,
            temperature=temperature,
        )
        self.summary_loaded = False
        self.reload()

    @property
    def strategy(self) -> Any:
        return self.manager.strategy

    def reload(self) -> None:
        """Load the stored turns (and summary) into the manager."""
        from ..history import Summarise, Turn

        turns = self.store.load_turns(self.id)
        history = []
        for t in turns:
            history.append(Turn("user", t.user))
            history.append(
                Turn(
                    "assistant",
                    t.assistant,
                    tokens=t.output_tokens,
                    input_tokens=t.input_tokens,
                    meta=dict(t.meta),
                )
            )
        self.manager.history = history
        if isinstance(self.strategy, Summarise):
            summary = self.store.get_summary(self.id)
            if summary is not None and summary.covers_turns <= len(turns):
                self.strategy.restore(summary.summary, summary.covers_turns)
                self.summary_loaded = True
            else:
                self.strategy.reset()

    def summary(self) -> tuple[str, int] | None:
        from ..history import Summarise

        s = self.strategy
        if isinstance(s, Summarise) and s.covers_turns:
            return s.summary, s.covers_turns
        return None

    def send(self, message: str, on_text: Callable[[str], None]) -> str:
        """One turn: stream the reply through ``on_text``; save the turn when complete.

        A KeyboardInterrupt (or any error) during the reply propagates and nothing is
        saved (note 1).
        """
        with self.store.turn_lock(self.id):
            if self.store.get_session(self.id).turn_count != self.manager.turn_count:
                self.reload()  # another writer added turns (note 4)
            before = self.summary()
            for text in self.manager.chat_stream(message):
                on_text(text)
            reply = self.manager.history[-1]
            meta = {k: v for k, v in reply.meta.items() if k != "elapsed_s"}
            meta["elapsed_s"] = round(reply.meta.get("elapsed_s", 0.0), 4)
            self.store.append_turn(
                self.id,
                message,
                reply.content,
                input_tokens=reply.input_tokens or 0,
                output_tokens=reply.tokens or 0,
                meta=meta,
            )
            after = self.summary()
            if after is not None and after != before:
                self.store.set_summary(self.id, after[0], after[1])
            return reply.content


def run_chat(
    *,
    session_id: str | None = None,
    store_url: str | None = None,
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
    from ..providers import client

    out = console or Console(file=sys.stdout, highlight=False, soft_wrap=True)
    ask = read or input
    echo = read is None and not sys.stdin.isatty()  # piped input: show what was "typed"
    url = resolve_store_url(store_url)
    store = open_store(url, ttl=ttl)
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
        _banner(out, chat, url, clients, system, engine if base_url is None else None)
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
    from rich.markup import escape

    return escape(text if len(text) <= 300 else text[:297] + "...")


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ChatProcess:
    """``labkit chat`` in a subprocess, stdin piped, its output collected as it arrives.

    For notebooks and tests: ``send()`` a line, ``wait_for_reply()`` until some of the
    reply has streamed, then ``interrupt()`` (Ctrl+C), ``kill()`` (SIGKILL) or
    ``close()`` (EOF, then wait for the exit).
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        import subprocess
        import threading

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
