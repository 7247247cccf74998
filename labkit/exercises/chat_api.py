"""Lab 4's exercise: the milestone chat API, checked from the outside.

``check_chat_api(target)`` runs the milestone's Requirements and "Test it" list against
a learner's server. ``target`` is either

- a **start command** (a list, or a string split like a shell would): the checker runs
  it in a fresh working directory, on a port it chose, pointed at upstreams it controls
  (the local API's sim engine), and can restart it; placeholders ``{port}``,
  ``{upstream}`` (the sim's base URL), ``{workdir}`` and ``{python}`` are filled in;
- a **Python file** (``"server.py"`` or ``"server.py:app"``): shorthand for
  ``{python} -m uvicorn server:app --app-dir <its folder> --port {port}``;
- a **base URL** of a server already running: only what needs no control of the server
  is checked (SSE framing, sessions, history/stats/delete); the rest is reported as
  skipped.

The learner's process gets ``PORT``, ``ANTHROPIC_BASE_URL`` / ``OPENAI_BASE_URL`` (the
sim), placeholder API keys, and ``CHAT_DB`` (a SQLite path in its working directory), so
the course's ``anthropic.AsyncAnthropic()`` reaches the sim without a code change.

Notes:

1. What is checked, in order: SSE framing (``data:`` lines of JSON, blank-line
   separated, a ``done`` event last); ``"new"`` starts a session whose id the client can
   learn (``X-Session-Id`` header or a ``session_id`` in an event); the system prompt of
   the first message reaches the model; each turn sends the stored history upstream;
   ``GET /sessions/{id}/history``, ``/stats`` (turn count, tokens, age) and ``DELETE``;
   the context rule (the whole history below 50k tokens; past it, only the last 10
   turns); history surviving a restart; an upstream failure mid-stream becoming an SSE
   error event; a client disconnect closing the upstream stream without an error in the
   server's log.
2. What reached the model is read from the sim's record of received requests, not from
   the learner's server: "the history is sent" means the sim saw it.
3. A server that cannot say which session ``"new"`` started is checked further on a
   session id the checker chooses (``POST /chat/stream/<id>``), if it accepts one.
4. The context rule's zones are generous: below 45k tokens of history every turn must be
   sent; above 56k the request must carry 9–11 of the newest turns. Between the two the
   checker does not judge (token counts differ between tokenizers). It costs about 25
   requests; ``context=False`` skips it.
5. The upstreams are two sims started for the check: one quick (replies of 12 tokens)
   with a 1M-token window, one slow that fails every stream after 25 text deltas (the
   disconnect and error checks). Both are stopped afterwards, and so is the learner's
   server (its whole process group).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..tokens import count_tokens
from ._common import API_KEY, is_placeholder
from .result import CheckResult, Report, not_done

__all__ = ["check_chat_api"]

_GUIDE = (
    "Give check_chat_api the command that starts your server (with {port} where the port "
    'goes), e.g. ["python", "-m", "uvicorn", "server:app", "--port", "{port}"], or the path '
    'of the file that defines app ("server.py"), or the base URL of a running server.'
)
_BUDGET_LOW, _BUDGET_HIGH = 45_000, 56_000
_BIG_TOKENS = 6_000


# ── SSE ───────────────────────────────────────────────────────────────────────


@dataclass
class _Turn:
    """One POST /chat/stream/{id} as the client saw it."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    text: str = ""
    error: dict[str, Any] | None = None
    done: dict[str, Any] | None = None
    done_last: bool = False
    session_id: str | None = None
    body: str = ""
    transport_error: str = ""


def _parse_sse(raw: str, turn: _Turn) -> None:
    """Fill ``turn`` from a raw SSE body (course format: JSON per ``data:`` line)."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    frames = [f for f in text.split("\n\n") if f.strip()]
    names = []
    for frame in frames:
        data_lines, event_name = [], ""
        for line in frame.split("\n"):
            if not line or line.startswith(":"):
                continue
            fieldname, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if fieldname == "data":
                data_lines.append(value)
            elif fieldname == "event":
                event_name = value
            elif fieldname in ("id", "retry"):
                pass
            else:
                turn.problems.append(f"a line that is not an SSE field: {line[:60]!r}")
        if not data_lines:
            if event_name:
                names.append(event_name)
                turn.events.append({"event": event_name})
            continue
        payload = "\n".join(data_lines)
        try:
            obj = json.loads(payload)
        except ValueError:
            if payload.strip() == "[DONE]":
                obj = {"done": True}
            else:
                turn.problems.append(f"a data payload that is not JSON: {payload[:60]!r}")
                continue
        if isinstance(obj, dict) and event_name:
            obj.setdefault("event", event_name)
        turn.events.append(obj)
        names.append(event_name)
    for ev in turn.events:
        if not isinstance(ev, dict):
            continue
        if isinstance(ev.get("text"), str) and not ev.get("done"):
            turn.text += ev["text"]
        if ev.get("error") and turn.error is None:
            turn.error = ev
        if ev.get("done") is True or ev.get("event") == "done" or ev.get("type") == "done":
            turn.done = ev
        sid = ev.get("session_id")
        if isinstance(sid, str) and sid and turn.session_id is None:
            turn.session_id = sid
    if turn.events and isinstance(turn.events[-1], dict):
        last = turn.events[-1]
        turn.done_last = last is turn.done


def _header(headers: dict[str, str], name: str) -> str | None:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return None


def _stream_turn(
    base: str, session: str, message: str, extra: dict[str, Any] | None = None, timeout: float = 60
) -> _Turn:
    turn = _Turn()
    body = {"message": message, **(extra or {})}
    try:
        with (
            httpx.Client(timeout=timeout) as http,
            http.stream("POST", f"{base}/chat/stream/{session}", json=body) as resp,
        ):
            turn.status = resp.status_code
            turn.headers = dict(resp.headers)
            raw = resp.read().decode("utf-8", "replace")
    except httpx.HTTPError as exc:
        turn.transport_error = f"{type(exc).__name__}: {exc}"
        return turn
    turn.body = raw
    if turn.status == 200:
        _parse_sse(raw, turn)
        hid = _header(turn.headers, "x-session-id")
        if hid:
            turn.session_id = hid
    return turn


def _get_json(base: str, path: str, method: str = "GET") -> tuple[int, Any]:
    try:
        resp = httpx.request(method, base + path, timeout=30)
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    try:
        return resp.status_code, resp.json()
    except ValueError:
        return resp.status_code, resp.text[:200]


def _messages_of(body: Any) -> list[tuple[str, str]] | None:
    """A history response's messages as (role, content), whatever key holds them."""
    candidates: list[Any] = []
    if isinstance(body, list):
        candidates = [body]
    elif isinstance(body, dict):
        for key in ("messages", "history", "turns"):
            if isinstance(body.get(key), list):
                candidates.append(body[key])
        candidates += [v for v in body.values() if isinstance(v, list)]
    for cand in candidates:
        out = []
        for m in cand:
            if isinstance(m, dict) and "role" in m and "content" in m:
                out.append((str(m["role"]), _text(m["content"])))
            else:
                out = None
                break
        if out is not None:
            return out
    return None


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content)


# ── what reached the upstream ─────────────────────────────────────────────────


def _sent(sim: Any, marker: str, limit: int = 8) -> tuple[list[tuple[str, str]], str] | None:
    """(messages, system) of the newest request the sim got whose last message has ``marker``."""
    try:
        entries = sim.requests(limit=limit)
    except Exception:
        return None
    for entry in reversed(entries):
        body = entry.get("body") or {}
        msgs = body.get("messages") or []
        conv = [
            (str(m.get("role")), _text(m.get("content")))
            for m in msgs
            if isinstance(m, dict) and m.get("role") not in ("system", "developer")
        ]
        if conv and marker in conv[-1][1]:
            system = body.get("system") or ""
            if not isinstance(system, str):
                system = _text(system)
            for m in msgs:
                if isinstance(m, dict) and m.get("role") in ("system", "developer"):
                    system += _text(m.get("content"))
            return conv, system
    return None


# ── the learner's process ─────────────────────────────────────────────────────


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(target: str | Sequence[str]) -> list[str]:
    if isinstance(target, str):
        path, _, attr = target.partition(":") if ".py" in target else (target, "", "")
        if path.endswith(".py") and " " not in path.strip():
            p = Path(path).resolve()
            return [
                "{python}", "-m", "uvicorn", f"{p.stem}:{attr or 'app'}", "--app-dir", str(p.parent),
                "--host", "127.0.0.1", "--port", "{port}",
            ]  # fmt: skip
        return shlex.split(target)
    return [str(a) for a in target]


class _Server:
    """The learner's server as a child process in its own process group."""

    def __init__(self, cmd: list[str], workdir: str, env: dict[str, str], timeout: float) -> None:
        self.cmd, self.workdir, self.timeout = cmd, workdir, timeout
        self.env = env
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(workdir) / "server.log"

    def start(self, upstream: Any) -> str | None:
        """Start against ``upstream`` (a LocalAPIServer); None when up, else what went wrong."""
        values = {
            "port": str(self.port),
            "upstream": upstream.base_url,
            "workdir": self.workdir,
            "python": sys.executable,
        }
        cmd = [a.format(**values) if "{" in a else a for a in self.cmd]
        env = {
            **os.environ,
            "PORT": str(self.port),
            "ANTHROPIC_BASE_URL": upstream.base_url,
            "ANTHROPIC_API_KEY": API_KEY,
            "OPENAI_BASE_URL": upstream.openai_base_url,
            "OPENAI_API_KEY": API_KEY,
            "CHAT_DB": str(Path(self.workdir) / "conversations.db"),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return f"could not run {cmd[0]!r}: {exc}"
        finally:
            log.close()
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = _last_exception(self.log_text()) or self.log_tail(600)
                return f"it exited with code {self.proc.returncode}: {why}"
            try:
                httpx.get(self.base + "/", timeout=1.0)
                return None
            except httpx.HTTPError:
                time.sleep(0.1)
        return f"it did not answer HTTP on port {self.port} within {self.timeout:g} s:\n{self.log_tail()}"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, 8), (signal.SIGTERM, 3), (signal.SIGKILL, 3)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 1500) -> str:
        return self.log_text()[-n:]


def _start_sims() -> tuple[Any, Any]:
    from ..localapi import LocalAPIServer

    quick = LocalAPIServer(
        "sim", ttft_ms=5, itl_ms=2, reply_tokens=12, seed=3, context_window=1_000_000
    )
    slow = LocalAPIServer(
        "sim",
        ttft_ms=5,
        itl_ms=25,
        reply_tokens=80,
        seed=4,
        fail_after=25,
        fail_with="api_error",
        context_window=1_000_000,
    )
    errors: list[BaseException] = []

    def start(api: Any) -> None:
        try:
            api.start()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(api,)) for api in (quick, slow)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        quick.stop()
        slow.stop()
        raise errors[0]
    return quick, slow


# ── the checker ───────────────────────────────────────────────────────────────


def check_chat_api(
    target: str | Sequence[str] | None,
    *,
    env: dict[str, str] | None = None,
    context: bool = True,
    startup_timeout: float = 60.0,
) -> CheckResult:
    """Check a milestone chat API: a start command, a Python file, or a base URL.

    See the module docstring for what the learner's process is given and note 1 for the
    requirements checked. ``env`` adds variables for the learner's process; ``context``
    runs the context-rule check (about 25 requests).
    """
    name = "check_chat_api"
    if is_placeholder(target) or (isinstance(target, (str, list, tuple)) and not target):
        return not_done(name, "the milestone server", _GUIDE)
    report = Report(name)
    if isinstance(target, str) and target.startswith(("http://", "https://")):
        _Checker(report, base=target.rstrip("/")).run_base_url()
        return report.result()
    try:
        cmd = _command(target)  # type: ignore[arg-type]
    except ValueError as exc:
        report.fail("the start command", str(exc), _GUIDE)
        return report.result()
    try:
        quick, slow = _start_sims()
    except Exception as exc:
        report.skip("the sim local APIs", f"could not start: {exc}")
        return report.result()
    try:
        with tempfile.TemporaryDirectory(prefix="labkit-chat-check-") as workdir:
            server = _Server(cmd, workdir, dict(env or {}), startup_timeout)
            try:
                _Checker(report, server=server, quick=quick, slow=slow, context=context).run()
            finally:
                server.stop()
    finally:
        quick.stop()
        slow.stop()
    return report.result()


class _Checker:
    def __init__(
        self,
        report: Report,
        *,
        base: str = "",
        server: _Server | None = None,
        quick: Any = None,
        slow: Any = None,
        context: bool = True,
    ) -> None:
        self.r = report
        self.server = server
        self.base = server.base if server else base
        self.quick, self.slow = quick, slow
        self.context = context
        self.marker = uuid.uuid4().hex[:8]
        self.sid: str | None = None
        self.history: list[tuple[str, str]] = []
        self.system = f"You are the checker's assistant {self.marker}."
        self.history_ok = False

    def msg(self, text: str) -> str:
        return f"{text} [{self.marker}-{uuid.uuid4().hex[:6]}]"

    # -- runs ------------------------------------------------------------------

    def run_base_url(self) -> None:
        if not self._framing_and_session():
            return
        self._history_stats()
        self._delete()
        for req in (
            "the system prompt reaches the model",
            "each turn sends the stored history",
            "context rule: whole history below 50k tokens, last 10 turns past it",
            "history survives a server restart",
            "an upstream error mid-stream becomes an SSE error event",
            "a client disconnect closes the upstream stream",
        ):
            self.r.skip(
                req, "needs a start command (the checker must control the server and its upstream)"
            )

    def run(self) -> None:
        assert self.server is not None
        problem = self.server.start(self.quick)
        if problem:
            self.r.fail(
                "the server starts",
                problem,
                "Run the command yourself in a terminal to see the whole error. " + _GUIDE,
            )
            return
        if not self._framing_and_session():
            return
        self._history_stats()
        if self.context:
            self._context_rule()
        else:
            self.r.skip(
                "context rule: whole history below 50k tokens, last 10 turns past it",
                "context=False",
            )
        self._delete()
        self._restart()
        self._faults()

    # -- requirements ----------------------------------------------------------

    def _framing_and_session(self) -> bool:
        first = self.msg("My name is Ada and I write Rust.")
        turn = _stream_turn(self.base, "new", first, {"system_prompt": self.system})
        req = "POST /chat/stream/{id} streams SSE: data: lines of JSON, a done event last"
        if turn.transport_error or turn.status != 200:
            self.r.fail(
                req,
                turn.transport_error
                or f"POST /chat/stream/new answered {turn.status}: {turn.body[:200]}",
                "Serve POST /chat/stream/{session_id} returning a StreamingResponse with "
                "media_type='text/event-stream'.",
            )
            return False
        ctype = _header(turn.headers, "content-type") or ""
        texts = [e for e in turn.events if isinstance(e, dict) and isinstance(e.get("text"), str)]
        wrong = []
        if not ctype.startswith("text/event-stream"):
            wrong.append(f"Content-Type is {ctype!r}, not text/event-stream")
        wrong += turn.problems[:2]
        if not texts:
            wrong.append("no text events ({'text': ...})")
        if turn.done is None:
            wrong.append("no done event ({'done': true})")
        elif not turn.done_last:
            wrong.append("the done event is not the last one")
        if wrong:
            self.r.fail(
                req,
                "; ".join(wrong),
                "Send each chunk as 'data: ' + json.dumps({'text': chunk}) + '\\n\\n' and finish "
                "with 'data: ' + json.dumps({'done': True, ...}) + '\\n\\n'.",
            )
        else:
            self.r.ok(req, f"{len(texts)} text events, then a done event")

        req = 'session_id "new" starts a session the client can name'
        if turn.session_id:
            self.sid = turn.session_id
            where = "X-Session-Id header" if _header(turn.headers, "x-session-id") else "an event"
            self.r.ok(req, f"session {self.sid!r} (from the {where})")
        else:
            self.r.fail(
                req,
                "the client cannot learn which session it started: no X-Session-Id header and "
                "no session_id in any event, so it can never continue the conversation",
                "Create the id (uuid4().hex) when session_id == 'new' and send it: a "
                "{'session_id': id} first event, or the X-Session-Id response header.",
            )
            own = uuid.uuid4().hex
            retry = _stream_turn(self.base, own, first, {"system_prompt": self.system})
            if retry.status != 200 or retry.transport_error:
                for what in (
                    "the system prompt reaches the model",
                    "each turn sends the stored history",
                    "GET /sessions/{id}/history returns the conversation",
                    "GET /sessions/{id}/stats reports turns, tokens and age",
                ):
                    self.r.skip(what, "no session to check it on (see above)")
                return False
            self.r.note(
                "checked further on a session id chosen by the checker",
                f"POST /chat/stream/{own} was accepted",
            )
            self.sid, turn = own, retry
        self.history = [("user", first), ("assistant", turn.text)]
        self._system_check(first)

        second = self.msg("What is my name?")
        turn2 = _stream_turn(self.base, self.sid, second)
        self._history_sent("each turn sends the stored history", second, self.history, self.quick)
        self.history += [("user", second), ("assistant", turn2.text)]
        return True

    def _system_check(self, first: str) -> None:
        req = "the system prompt reaches the model"
        if self.quick is None:
            return
        sent = _sent(self.quick, first.rsplit("[", 1)[1].rstrip("]"))
        if sent is None:
            self.r.fail(req, "no request for the first message reached the model API")
            return
        if self.system in sent[1]:
            self.r.ok(req, "the system_prompt of the first message was sent as the system prompt")
        else:
            self.r.fail(
                req,
                f"the first message's body had system_prompt={self.system!r}; the model got "
                f"system={sent[1][:80]!r}",
                "Take system_prompt from the POST body of a session's first message, store it "
                "with the session, and pass it as system= on every turn.",
            )

    def _history_sent(
        self, req: str, message: str, before: list[tuple[str, str]], sim: Any
    ) -> bool:
        if sim is None:
            return False
        sent = _sent(sim, message.rsplit("[", 1)[1].rstrip("]"))
        want = [*before, ("user", message)]
        if sent is None:
            self.r.fail(req, "the turn's message never reached the model API")
            return False
        got = sent[0]
        if got == want:
            self.r.ok(req, f"turn {len(want) // 2 + 1} sent all {len(before) // 2} earlier turn(s)")
            return True
        if len(got) == 1:
            detail = (
                "the model received only the new message: it cannot know anything said before "
                "(LLMs are stateless)"
            )
            hint = (
                "Load the session's stored messages, append the new user message, and send "
                "them all as messages=."
            )
        else:
            detail = f"the model received {len(got)} messages; the stored history + the new one is {len(want)}"
            hint = "Send the stored messages in order, with the replies as they were streamed."
        self.r.fail(req, detail, hint)
        return False

    def _history_stats(self) -> None:
        sid = self.sid
        status, body = _get_json(self.base, f"/sessions/{sid}/history")
        req = "GET /sessions/{id}/history returns the conversation"
        messages = _messages_of(body) if status == 200 else None
        if messages is None:
            self.r.fail(
                req,
                f"answered {status}: {str(body)[:120]}",
                "Return the stored messages as JSON: {'session_id': ..., 'messages': "
                "[{'role': ..., 'content': ...}, ...]}.",
            )
        elif messages == self.history:
            self.history_ok = True
            self.r.ok(req, f"{len(messages)} messages, in order, replies as streamed")
        else:
            self.r.fail(
                req,
                f"{len(messages)} messages; expected the {len(self.history)} of the 2 turns, "
                "with each reply as it was streamed",
                "Save the user message and the full reply of every completed turn.",
            )

        status, body = _get_json(self.base, f"/sessions/{sid}/stats")
        req = "GET /sessions/{id}/stats reports turns, tokens and age"
        if status != 200 or not isinstance(body, dict):
            self.r.fail(
                req,
                f"answered {status}: {str(body)[:120]}",
                "Return JSON with turn_count, total tokens used and the session's age.",
            )
            return
        keys = {str(k).lower(): v for k, v in body.items()}
        turns = next((v for k, v in keys.items() if "turn" in k and _is_num(v)), None)
        tokens = [v for k, v in keys.items() if "token" in k and _is_num(v)]
        age = [k for k in keys if "age" in k or "created" in k]
        wrong = []
        if turns != 2:
            wrong.append(f"turn count {turns!r} after 2 turns")
        if not tokens or max(tokens) <= 0:
            wrong.append("no token count above 0")
        if not age:
            wrong.append("no age (age_seconds or created_at)")
        if wrong:
            self.r.fail(
                req,
                "; ".join(wrong) + f" in {json.dumps(body)[:160]}",
                "Report turn_count, the tokens the API reported (input + output), and "
                "age_seconds (now - created_at).",
            )
        else:
            self.r.ok(req, f"turn count 2, tokens {max(tokens)}, {age[0]}")

    def _delete(self) -> None:
        req = "DELETE /sessions/{id} clears a session"
        made = self._new_session("A session to delete.")
        if made is None:
            self.r.skip(req, "no session to delete (see the new-session requirement)")
            return
        sid = made[0]
        status, _ = _get_json(self.base, f"/sessions/{sid}", "DELETE")
        after, body2 = _get_json(self.base, f"/sessions/{sid}/history")
        gone = after == 404 or (after == 200 and not _messages_of(body2))
        if 200 <= status < 300 and gone:
            self.r.ok(req, f"DELETE answered {status}; the history is gone ({after})")
        else:
            self.r.fail(
                req,
                f"DELETE answered {status}; GET history afterwards answered {after}: {str(body2)[:100]}",
                "Delete the session's messages and its row; GET history of it should then 404.",
            )

    def _new_session(self, text: str) -> tuple[str, list[tuple[str, str]]] | None:
        """A fresh session with one turn: via "new", else on an id the checker picks (note 3)."""
        message = self.msg(text)
        turn = _stream_turn(self.base, "new", message)
        if turn.status == 200 and turn.session_id:
            return turn.session_id, [("user", message), ("assistant", turn.text)]
        own = uuid.uuid4().hex
        turn = _stream_turn(self.base, own, message)
        if turn.status == 200 and not turn.transport_error:
            return own, [("user", message), ("assistant", turn.text)]
        return None

    def _context_rule(self) -> None:
        req = "context rule: whole history below 50k tokens, last 10 turns past it"
        made = self._new_session("Context check begins.")
        if made is None:
            self.r.skip(req, "no session to check it on")
            return
        sid, history = made
        tokens = sum(count_tokens(c) for _, c in history)
        problem = ""
        judged_low = judged_high = False
        for i in range(40):
            big = i >= 11
            body = (" a" * _BIG_TOKENS) if big else ""
            message = self.msg(f"Context turn {i + 1}.{body}")
            turn = _stream_turn(self.base, sid, message, timeout=120)
            if turn.status != 200 or turn.transport_error:
                problem = (
                    f"turn {i + 1} failed: {turn.transport_error or turn.status} {turn.body[:120]}"
                )
                break
            sent = _sent(self.quick, message.rsplit("[", 1)[1].rstrip("]"), limit=3)
            if sent is None:
                problem = f"turn {i + 1} never reached the model API"
                break
            got = sent[0]
            earlier = got[:-1]
            n_hist = len(history) // 2
            n_sent = len(earlier) // 2
            if tokens < _BUDGET_LOW:
                if not earlier and history:
                    problem = (
                        f"with {n_hist} turn(s) stored the request carried none of them: the "
                        "history is not sent at all, so there is nothing for the rule to trim"
                    )
                    break
                if earlier != history:
                    problem = (
                        f"with {n_hist} turns stored (~{tokens:,} tokens, below the 50k budget) the "
                        f"request carried only {n_sent} of them: the rule applies only past the budget"
                    )
                    break
                judged_low = judged_low or n_hist >= 11
            elif tokens > _BUDGET_HIGH:
                newest = history[-len(earlier) :] if earlier else []
                if not (9 <= n_sent <= 11) or earlier != newest:
                    what = (
                        "all of them"
                        if earlier == history
                        else f"{n_sent} turn(s)"
                        + ("" if earlier == newest else ", not the newest in order")
                    )
                    problem = (
                        f"with {n_hist} turns stored (~{tokens:,} tokens, past the 50k budget) the "
                        f"request carried {what}; the rule keeps the last 10"
                    )
                    break
                judged_high = True
                break
            history += [("user", message), ("assistant", turn.text)]
            tokens += count_tokens(message) + count_tokens(turn.text)
        if problem:
            self.r.fail(
                req,
                problem,
                "Count the stored history's tokens (tiktoken) before each turn; only when it "
                "exceeds 50,000 send just the last 10 turns (20 messages) and the new one.",
            )
        elif judged_low and judged_high:
            self.r.ok(
                req,
                f"all turns sent up to ~{_BUDGET_LOW // 1000}k tokens; past ~{_BUDGET_HIGH // 1000}k "
                "the request carried the newest 9–11 turns only",
            )
        else:
            self.r.skip(req, "the conversation did not reach the budget")

    def _restart(self) -> None:
        req = "history survives a server restart"
        assert self.server is not None
        self.server.stop()
        problem = self.server.start(self.quick)
        if problem:
            self.r.fail(req, f"the server did not start again: {problem}")
            return
        status, body = _get_json(self.base, f"/sessions/{self.sid}/history")
        after = _messages_of(body) if status == 200 else None
        third = self.msg("Do you still remember me?")
        _stream_turn(self.base, self.sid or "new", third)
        sent = _sent(self.quick, third.rsplit("[", 1)[1].rstrip("]"))
        carried = sent is not None and sent[0][:-1] == self.history
        if after == self.history and carried:
            self.r.ok(req, "after a restart the history was there, and the next turn sent it")
            return
        parts = []
        if not self.history_ok:
            self.r.fail(
                req,
                "there is no stored history to survive: GET history did not return the "
                f"conversation before the restart either (after it: {status})",
                "Persist every completed turn to SQLite (Lab 3's save_turn), serve it at "
                "GET /sessions/{id}/history, and load it on each request.",
            )
            return
        if after != self.history:
            parts.append(
                f"GET history after the restart answered {status} with "
                f"{len(after) if after is not None else 'no'} messages (before: {len(self.history)})"
            )
        if not carried:
            n = len(sent[0]) - 1 if sent else 0
            parts.append(
                f"the first turn after the restart sent {n} earlier message(s) to the model, "
                f"not the {len(self.history)} stored before"
            )
        self.r.fail(
            req,
            "; ".join(parts) + " — a history kept in the server's memory dies with the process",
            "Persist every completed turn to SQLite (Lab 3's save_turn) and load it from there "
            "on each request.",
        )

    def _faults(self) -> None:
        assert self.server is not None
        self.server.stop()
        problem = self.server.start(self.slow)
        if problem:
            self.r.fail("the server starts", problem)
            return
        self._disconnect()
        self._mid_stream_error()

    def _disconnect(self) -> None:
        req = "a client disconnect closes the upstream stream, without an error"
        assert self.server is not None
        log_before = len(self.server.log_text())
        try:
            before = self.slow.metrics().get("labkit_streams_cancelled_total", 0.0)
        except Exception as exc:
            self.r.skip(req, f"the sim's metrics are unreadable: {exc}")
            return
        seen = 0
        try:
            with (
                httpx.Client(timeout=30) as http,
                http.stream(
                    "POST",
                    f"{self.base}/chat/stream/new",
                    json={"message": self.msg("Write a long essay.")},
                ) as resp,
            ):
                for line in resp.iter_lines():
                    if line.startswith("data:") and '"text"' in line:
                        seen += 1
                        if seen >= 3:
                            break
        except httpx.HTTPError as exc:
            self.r.fail(req, f"the stream failed before 3 text events: {exc}")
            return
        cancelled = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if self.slow.metrics().get("labkit_streams_cancelled_total", 0.0) > before:
                    cancelled = True
                    break
            except Exception:
                pass
            time.sleep(0.1)
        time.sleep(0.3)
        alive = _stream_turn(self.base, "new", self.msg("Still there?"), timeout=30)
        log = self.server.log_text()[log_before:]
        trace = _last_exception(log)
        wrong = []
        if not cancelled:
            wrong.append(
                "the model API kept generating after the client left (the server did not close "
                "its upstream stream within 5 s)"
            )
        if trace:
            wrong.append(f"the server logged an error: {trace}")
        if alive.status != 200:
            wrong.append(f"the next request answered {alive.status or alive.transport_error}")
        if wrong:
            self.r.fail(
                req,
                "; ".join(wrong),
                "Let the cancellation propagate (no `yield` in a `finally:` of the generator, "
                "which makes Python raise 'async generator ignored GeneratorExit'); closing the "
                "SDK's `async with ... stream` closes the upstream request.",
            )
        else:
            self.r.ok(req, "after 3 text events the client left; the upstream stream was cancelled")

    def _mid_stream_error(self) -> None:
        req = "an upstream error mid-stream becomes an SSE error event"
        turn = _stream_turn(self.base, "new", self.msg("Tell me a long story."), timeout=60)
        if turn.transport_error:
            self.r.fail(
                req,
                f"the upstream failed after 25 text deltas and the client's stream broke: "
                f"{turn.transport_error}",
                "Wrap the generator in try/except and yield an error event: "
                "'data: ' + json.dumps({'error': ..., 'message': ...}) + '\\n\\n'.",
            )
            return
        if turn.status != 200:
            self.r.fail(req, f"answered {turn.status}: {turn.body[:150]}")
            return
        n_text = sum(
            1 for e in turn.events if isinstance(e, dict) and isinstance(e.get("text"), str)
        )
        if turn.error is None:
            self.r.fail(
                req,
                f"{n_text} text events, then the stream ended without an error event: the user "
                "cannot tell a failure from a short reply",
                "Catch the SDK's exception (anthropic.APIError) inside the generator and yield "
                "'data: ' + json.dumps({'error': ..., 'message': ...}) + '\\n\\n'.",
            )
            return
        self.r.ok(req, f"{n_text} text events, then {json.dumps(turn.error)[:100]}")
        if turn.done is None:
            self.r.note(
                "a done event follows the error",
                "none was sent (the course's generate_safe sends one)",
            )
        sid = turn.session_id
        if sid:
            status, body = _get_json(self.base, f"/sessions/{sid}/history")
            msgs = _messages_of(body) if status == 200 else None
            if msgs and any(r == "assistant" for r, _ in msgs):
                self.r.note(
                    "the failed turn was stored",
                    "the partial reply was saved as if it were complete; a client resending the "
                    "message would get two versions of the turn",
                )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _last_exception(log: str) -> str:
    """The last exception line of a traceback in ``log`` ("" if none)."""
    if "Traceback" not in log:
        return ""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Group")) and " " not in head:
            return line[:200]
    return "a traceback"
