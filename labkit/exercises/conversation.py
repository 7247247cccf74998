"""Lab 2's ConversationManager exercise, checked by what actually reached the model API.

The learner writes a ``ConversationManager`` (the course's class) and a factory
``manager_factory(client, model) -> manager``; the manager has ``chat(text) -> str``,
``turn_count`` and ``clear()``. The checker gives it an SDK client pointed at the local
API's sim engine and reads back, from the sim's record of received requests, the
messages array each turn sent.

Notes:

1. Ground truth is the server's side: the checker does not trust the manager's own
   ``history``; it compares what was *sent* for turn *n* with the turns before it and the
   replies the manager returned.
2. A failed request is made on purpose (the sim answers one request with a 500, retries
   are off): the next request must not carry the failed user message (no two user
   messages in a row), and ``turn_count`` must not count it.
3. ``turn_count`` may be a property or a method.
"""

from __future__ import annotations

import uuid
from typing import Any

from ._common import (
    MODEL,
    NotDone,
    call_learner,
    describe_error,
    is_placeholder,
    make_client,
    shared_sim,
    sim_requests,
)
from .result import CheckResult, Report, not_done

__all__ = ["check_conversation"]

_GUIDE = (
    "Write a ConversationManager whose chat(user_message) sends the whole history plus the new "
    "message with the client it was given, appends the user message and the reply to its history "
    "only when the reply arrived, and returns the reply; turn_count counts completed turns; "
    "clear() empties the history. Then manager_factory = lambda client, model: "
    "ConversationManager(client, model)."
)

_SIM = "ttft_ms=0;itl_ms=0;reply_tokens=6"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text", "") for b in content if isinstance(b, dict))
    return str(content)


def _sent(entry: dict[str, Any]) -> list[tuple[str, str]]:
    body = entry.get("body") or {}
    out = []
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("role") not in ("system", "developer"):
            out.append((str(m.get("role")), _text(m.get("content"))))
    return out


def _short(messages: list[tuple[str, str]], labels: dict[str, str]) -> str:
    return (
        "[" + ", ".join(labels.get(text, f"{role}:{text[:20]!r}") for role, text in messages) + "]"
    )


def _turn_count(manager: Any) -> Any:
    value = manager.turn_count
    return value() if callable(value) else value


class _Fault:
    """An httpx request hook that sets the sim header, with a fault when switched on."""

    def __init__(self) -> None:
        self.fault = ""

    def __call__(self, request: Any) -> None:
        request.headers["x-labkit-sim"] = f"{_SIM};{self.fault}" if self.fault else _SIM


def check_conversation(
    manager_factory: Any, *, api: str = "anthropic", server: Any = None
) -> CheckResult:
    """Check a ConversationManager by the messages each of its requests carried.

    ``manager_factory(client, model)`` returns a fresh manager using that SDK client
    (``api="openai"`` passes an ``openai.OpenAI`` client). See the module notes.
    """
    name = "check_conversation"
    if is_placeholder(manager_factory):
        return not_done(name, "ConversationManager", _GUIDE)
    report = Report(name)
    try:
        server = server or shared_sim()
    except Exception as exc:
        report.skip("the sim local API", f"could not start: {exc}")
        return report.result()
    if sim_requests(server, "-") is None:
        report.skip(
            "what reached the model API",
            "this local API cannot report the requests it received (update labkit)",
        )
        return report.result()

    marker = f"conv-{uuid.uuid4().hex[:8]}"
    fault = _Fault()
    client = make_client(api, server, hooks=[fault])
    try:
        return _run(manager_factory, client, server, marker, fault, report)
    finally:
        client.close()


def _run(
    manager_factory: Any, client: Any, server: Any, marker: str, fault: _Fault, report: Report
) -> CheckResult:
    name = report.name
    try:
        manager = call_learner(manager_factory, client, MODEL)
    except NotDone:
        return not_done(name, "ConversationManager", _GUIDE)
    except Exception as exc:
        report.fail(
            "manager_factory(client, model) makes a manager",
            describe_error(exc),
            "Pass the client you are given to your manager instead of building one.",
        )
        return report.result()

    labels: dict[str, str] = {}
    history: list[tuple[str, str]] = []

    def chat(text: str, label: str) -> Any:
        labels[text] = label
        return call_learner(manager.chat, text)

    def request_for(text: str) -> list[tuple[str, str]] | None:
        for entry in reversed(sim_requests(server, marker) or []):
            sent = _sent(entry)
            if sent and sent[-1][1] == text:
                return sent
        return None

    statements = ["My name is Ada.", "I write Rust at work.", "What is my name?"]
    for k, statement in enumerate(statements, 1):
        text = f"{statement} ({marker} turn {k})"
        try:
            reply = chat(text, f"u{k}")
        except NotDone:
            return not_done(name, "ConversationManager.chat", _GUIDE)
        except Exception as exc:
            report.fail(
                f"turn {k} completes",
                describe_error(exc),
                "chat() should send the messages with self.client and return the reply's text.",
            )
            return report.result()
        if not isinstance(reply, str):
            report.fail(
                "chat() returns the reply's text",
                f"it returned {type(reply).__name__}",
                "Return response.content[0].text (a str).",
            )
            return report.result()
        sent = request_for(text)
        expected = [*history, ("user", text)]
        if sent is None:
            report.fail(
                f"turn {k} reaches the model API",
                "no request carrying this turn's message arrived",
                "Use the client given to manager_factory.",
            )
            return report.result()
        if sent != expected:
            report.fail(
                "turn n carries all earlier turns, in order",
                f"turn {k} sent {_short(sent, labels)}; expected {_short(expected, labels)}",
                _diagnose(sent, expected),
            )
            return report.result()
        history = [*expected, ("assistant", reply)]
        labels[reply] = f"a{k}"
    report.ok(
        "turn n carries all earlier turns, in order",
        f"turn 3 sent {_short(sent, labels)}, with the replies exactly as returned",
    )

    try:
        count = _turn_count(manager)
    except Exception as exc:
        count = f"an error ({describe_error(exc)})"
    report.check(
        count == 3,
        "turn_count counts completed turns",
        "3 after 3 turns",
        f"{count!r} after 3 turns",
        "Count the user messages in the history (or the completed turns).",
    )

    # A failed request (note 2).
    failing = f"This request will fail. ({marker} turn X)"
    labels[failing] = "u_failed"
    fault.fault = "fail_before=api_error"
    raised: BaseException | None = None
    try:
        manager.chat(failing)
    except Exception as exc:
        raised = exc
    finally:
        fault.fault = ""
    try:
        after_fail = _turn_count(manager)
    except Exception as exc:
        after_fail = f"an error ({describe_error(exc)})"
    if raised is None:
        report.note(
            "a failed request is reported",
            "chat() returned normally although the model API answered 500; the caller cannot tell",
        )
    next_text = f"Are you still there? ({marker} turn 4)"
    try:
        reply4 = chat(next_text, "u4")
    except Exception as exc:
        report.fail(
            "a failed request leaves no dangling user message",
            f"the turn after the failure failed too: {describe_error(exc)}",
            "Add the user message to the history only together with its reply.",
        )
        return report.result()
    sent4 = request_for(next_text) or []
    expected4 = [*history, ("user", next_text)]
    if sent4 == expected4:
        report.ok(
            "a failed request leaves no dangling user message",
            f"the next turn sent {_short(sent4, labels)}",
        )
    else:
        dangling = any(t == failing for _, t in sent4)
        report.fail(
            "a failed request leaves no dangling user message",
            f"the next turn sent {_short(sent4, labels)}"
            + (
                ": the failed user message is still in the history, so two user messages "
                "arrive in a row and the model answers a question that was never answered"
                if dangling
                else f"; expected {_short(expected4, labels)}"
            ),
            "Append the user message to the history only after the reply arrived (build the "
            "request from history + [new message]), or remove it when the call raises.",
        )
    report.check(
        after_fail == 3,
        "turn_count does not count a failed turn",
        "still 3 after the failure",
        f"{after_fail!r} after the failure (3 turns completed)",
        "Count completed turns only (a user message without a reply is not a turn).",
    )
    if isinstance(reply4, str):
        history = [*expected4, ("assistant", reply4)]

    # clear()
    try:
        manager.clear()
    except NotImplementedError:
        report.todo("clear() empties the history", "not done yet", "Reset the history to [].")
        return report.result()
    except Exception as exc:
        report.fail("clear() empties the history", describe_error(exc), "Reset the history to [].")
        return report.result()
    try:
        cleared = _turn_count(manager)
    except Exception as exc:
        cleared = f"an error ({describe_error(exc)})"
    fresh = f"Let us start over. ({marker} turn 5)"
    try:
        chat(fresh, "u5")
        sent5 = request_for(fresh) or []
    except Exception as exc:
        sent5 = []
        report.fail("clear() empties the history", f"the next turn failed: {describe_error(exc)}")
        return report.result()
    report.check(
        cleared == 0 and sent5 == [("user", fresh)],
        "clear() empties the history",
        "turn_count 0, and the next turn sent only its own message",
        f"turn_count {cleared!r} after clear(); the next turn sent {_short(sent5, labels)}",
        "clear() should reset the history list to [].",
    )
    return report.result()


def _diagnose(sent: list[tuple[str, str]], expected: list[tuple[str, str]]) -> str:
    if len(sent) == 1 and len(expected) > 1:
        return (
            "The model is stateless: send the whole history (every earlier user message and "
            "reply) plus the new message with every request."
        )
    if [r for r, _ in sent if r == "assistant"] != [r for r, _ in expected if r == "assistant"]:
        return "Append each reply to the history as an assistant message, right after its question."
    if sorted(sent) == sorted(expected):
        return "Keep the history in the order the messages happened."
    return "Send exactly the earlier turns (user message, then the reply returned) and the new message."
