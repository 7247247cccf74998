"""Lab 2's sliding-window exercise, checked property by property with hypothesis.

The learner writes ``fn(messages, max_tokens, min_turns) -> list[dict]`` (the course's
``sliding_window``). The checker generates conversations — user/assistant pairs and a
newest user message, contents of random length — with budgets and ``min_turns``, and
checks each property on its own, so each violated one is reported with the smallest
conversation hypothesis finds that breaks it.

Notes:

1. Tokens are counted as the course counts them: :func:`labkit.tokens.count_tokens` of
   each message's ``content`` (cl100k), summed, with no per-message overhead. A learner
   who imports the same function counts the same way.
2. The properties: the result holds only given messages, in chronological order; it
   ends with the newest user message and never starts with an assistant message; a
   kept assistant message comes with its user message; the kept pairs are the newest
   ones; it stays within ``max_tokens`` unless ``min_turns`` (or the newest question
   alone) forces more; it keeps at least ``min_turns`` pairs when there are that many;
   it does not stop while the next older pair would still fit; and it leaves its input
   unchanged.
3. Runs are derandomised (the same examples every time) and quiet; each property gets
   ``examples`` generated cases plus shrinking.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..tokens import count_tokens
from ._common import NotDone, call_learner, describe_error, is_placeholder
from .result import CheckResult, Report, not_done

__all__ = ["check_sliding_window"]

Message = dict[str, Any]

_WORDS = [
    "stream",
    "token",
    "window",
    "budget",
    "context",
    "reply",
    "user",
    "model",
    "cache",
    "history",
    "turn",
    "pair",
    "message",
    "latency",
    "summary",
    "store",
    "session",
    "prompt",
    "answer",
    "question",
    "the",
    "a",
    "of",
    "to",
    "and",
    "is",
]

_GUIDE = (
    "Write sliding_window(messages, max_tokens, min_turns): keep the newest user message, "
    "then add user+assistant pairs from the newest backwards while they fit in max_tokens "
    "(count each message's content with labkit.tokens.count_tokens), always keeping at least "
    "min_turns pairs; return the kept messages in chronological order."
)


@dataclass
class _Case:
    messages: list[Message]
    max_tokens: int
    min_turns: int


def _label(m: Any) -> str:
    if isinstance(m, dict) and isinstance(m.get("content"), str):
        return m["content"].split(":", 1)[0]
    return repr(m)[:20]


def _tokens(messages: list[Message]) -> int:
    return sum(count_tokens(m["content"]) for m in messages)


def _show(case: _Case, result: Any = None) -> str:
    convo = ", ".join(f"{_label(m)}({count_tokens(m['content'])})" for m in case.messages)
    text = (
        f"[{convo}] (tokens in brackets), max_tokens={case.max_tokens}, min_turns={case.min_turns}"
    )
    if result is not None:
        if isinstance(result, list):
            text += f" → yours [{', '.join(_label(m) for m in result)}]"
        else:
            text += f" → yours {result!r:.60}"
    return text


def _positions(case: _Case, result: list[Any]) -> list[int] | None:
    """Where each returned message sits in the input (None if one is not an input message)."""
    index = {m["content"]: i for i, m in enumerate(case.messages)}
    out = []
    for m in result:
        if not isinstance(m, dict) or m.get("content") not in index:
            return None
        i = index[m["content"]]
        if m.get("role") != case.messages[i]["role"]:
            return None
        out.append(i)
    return out


def _pairs(case: _Case) -> int:
    return (len(case.messages) - 1) // 2


def _kept_pairs(case: _Case, pos: list[int]) -> list[int]:
    """Pair numbers (0 = oldest) whose user message was kept (final question excluded)."""
    last = len(case.messages) - 1
    return sorted({i // 2 for i in pos if i != last and i % 2 == 0})


# Each property: (requirement, check(case, result, positions) -> None | what is wrong, hint)
Check = Callable[[_Case, list[Any], list[int]], str | None]


def _p_order(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    if pos != sorted(pos) or len(set(pos)) != len(pos):
        return "the messages are not in chronological order"
    return None


def _p_newest(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    last = len(case.messages) - 1
    if last not in pos:
        return "the newest user message (the question being asked) was dropped"
    if pos[-1] != last:
        return "the newest user message is not the last message"
    return None


def _p_first(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    if result and result[0].get("role") == "assistant":
        return "the window starts with an assistant message"
    return None


def _p_pairs(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    kept = set(pos)
    last = len(case.messages) - 1
    for i in pos:
        if i == last:
            continue
        partner = i + 1 if i % 2 == 0 else i - 1
        if partner not in kept:
            return f"{_label(case.messages[i])} was kept without {_label(case.messages[partner])}"
    return None


def _p_newest_pairs(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    kept = _kept_pairs(case, pos)
    n = _pairs(case)
    if kept and kept != list(range(n - len(kept), n)):
        return "the kept pairs are not the newest ones (a newer pair was dropped, an older kept)"
    return None


def _p_budget(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    used = _tokens([case.messages[i] for i in pos])
    kept = len(_kept_pairs(case, pos))
    if used > case.max_tokens and kept > case.min_turns:
        return f"it holds {used} tokens > max_tokens={case.max_tokens} with {kept} pair(s), more than min_turns={case.min_turns}"
    return None


def _p_min_turns(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    kept = len(_kept_pairs(case, pos))
    want = min(case.min_turns, _pairs(case))
    if kept < want:
        return f"it kept {kept} pair(s); min_turns={case.min_turns} asks for {want}"
    return None


def _p_fills(case: _Case, result: list[Any], pos: list[int]) -> str | None:
    kept = _kept_pairs(case, pos)
    n = _pairs(case)
    oldest = kept[0] if kept else n
    if oldest == 0:
        return None
    nxt = case.messages[2 * (oldest - 1) : 2 * oldest]
    used = _tokens([case.messages[i] for i in pos])
    if used + _tokens(nxt) <= case.max_tokens:
        return (
            f"it stopped at {used} tokens although the next older pair ({_label(nxt[0])}, "
            f"{_tokens(nxt)} tokens) still fits in {case.max_tokens}"
        )
    return None


_PROPERTIES: list[tuple[str, Check, str]] = [
    (
        "keeps chronological order",
        _p_order,
        "The model reads the messages in the order you send them: a newest-first window makes "
        "it read the conversation backwards. Collect the kept pairs newest-first if you like, "
        "then put them in order before the newest question (e.g. insert each pair at the front "
        "of the kept list, and build the result as kept pairs + [newest user message]).",
    ),
    (
        "keeps the newest user message, last",
        _p_newest,
        "Always keep messages[-1] (the question being asked) and put it at the end.",
    ),
    (
        "never starts with an assistant message",
        _p_first,
        "Start the window on a user message: drop whole pairs, never half of one.",
    ),
    (
        "keeps user/assistant pairs together",
        _p_pairs,
        "Decide per pair: keep both the user message and its reply, or neither.",
    ),
    (
        "keeps the newest pairs",
        _p_newest_pairs,
        "Walk the pairs from the newest backwards and stop at the first that does not fit.",
    ),
    (
        "stays within max_tokens unless min_turns forces more",
        _p_budget,
        "Before adding a pair, check that tokens so far + the pair's tokens <= max_tokens "
        "(once min_turns pairs are in).",
    ),
    (
        "keeps at least min_turns pairs",
        _p_min_turns,
        "Add the newest min_turns pairs whatever their size, then apply the budget.",
    ),
    (
        "uses the budget (does not stop early)",
        _p_fills,
        "Keep adding older pairs while they fit.",
    ),
]


def _text(label: str, n: int) -> str:
    """``label: `` and ``n`` words (the words vary with the label; the length is drawn)."""
    k = sum(map(ord, label))
    return f"{label}:" + "".join(" " + _WORDS[(k + 7 * j) % len(_WORDS)] for j in range(n))


def _strategy() -> Any:
    from hypothesis import strategies as st

    @st.composite
    def cases(draw: Any) -> _Case:
        n = draw(st.integers(min_value=0, max_value=8))
        sizes = draw(st.lists(st.integers(0, 40), min_size=2 * n + 1, max_size=2 * n + 1))
        messages: list[Message] = []
        for i in range(1, n + 1):
            messages.append({"role": "user", "content": _text(f"u{i}", sizes[2 * i - 2])})
            messages.append({"role": "assistant", "content": _text(f"a{i}", sizes[2 * i - 1])})
        messages.append({"role": "user", "content": _text(f"u{n + 1}", sizes[-1])})
        total = _tokens(messages)
        max_tokens = draw(st.integers(min_value=0, max_value=total + 10))
        min_turns = draw(st.integers(min_value=0, max_value=3))
        return _Case(messages, max_tokens, min_turns)

    return cases()


def _run_property(fn: Any, check: Check, examples: int) -> tuple[_Case, Any, str] | None:
    """The smallest case hypothesis finds that breaks ``check``: (case, result, what)."""
    from hypothesis import HealthCheck, Verbosity, given, settings

    found: list[tuple[_Case, Any, str]] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(_strategy())
    def prop(case: _Case) -> None:
        try:
            result = fn(copy.deepcopy(case.messages), case.max_tokens, case.min_turns)
        except Exception as exc:
            found.append((case, None, f"it raised {describe_error(exc)}"))
            raise AssertionError from None
        if not isinstance(result, list):
            found.append((case, result, f"it returned {type(result).__name__}, not a list"))
            raise AssertionError
        pos = _positions(case, result)
        if pos is None:
            found.append((case, result, "it returned a message that is not one of the input's"))
            raise AssertionError
        wrong = check(case, result, pos)
        if wrong:
            found.append((case, result, wrong))
            raise AssertionError

    try:
        prop()
    except AssertionError:
        return found[-1] if found else None
    except Exception as exc:  # hypothesis itself (e.g. a flaky learner function)
        if found:
            return found[-1]
        return (_Case([], 0, 0), None, f"the property run failed: {describe_error(exc)}")
    return None


def _check_mutation(fn: Any) -> str | None:
    messages = [
        {"role": "user", "content": "u1: stream token window"},
        {"role": "assistant", "content": "a1: budget context reply"},
        {"role": "user", "content": "u2: user model cache"},
        {"role": "assistant", "content": "a2: history turn pair"},
        {"role": "user", "content": "u3: message latency"},
    ]
    before = copy.deepcopy(messages)
    try:
        fn(messages, 5, 0)
    except Exception:
        return None
    if messages != before:
        return "it changed the list it was given (the caller's history)"
    return None


def check_sliding_window(fn: Any, *, examples: int = 60) -> CheckResult:
    """Check ``fn(messages, max_tokens, min_turns) -> list`` against the window's properties.

    Tokens are ``labkit.tokens.count_tokens(message["content"])`` summed (the course's
    count). Each property runs on ``examples`` generated conversations (module note 2).
    """
    name = "check_sliding_window"
    if is_placeholder(fn):
        return not_done(name, "sliding window", _GUIDE)
    report = Report(name)
    probe = [
        {"role": "user", "content": "u1: hello"},
        {"role": "assistant", "content": "a1: hi"},
        {"role": "user", "content": "u2: what is a token"},
    ]
    try:
        call_learner(fn, probe, 1000, 1)
    except NotDone:
        return not_done(name, "sliding window", _GUIDE)
    except Exception as exc:
        report.fail(
            "your function runs",
            describe_error(exc),
            "It is called as fn(messages, max_tokens, min_turns) with a list of "
            "{'role', 'content'} dicts; return a list of some of them.",
        )
        return report.result()

    for requirement, check, hint in _PROPERTIES:
        broken = _run_property(fn, check, examples)
        if broken is None:
            report.ok(requirement)
        else:
            case, result, what = broken
            report.fail(requirement, f"{what}: {_show(case, result)}", hint)
    mutated = _check_mutation(fn)
    if mutated:
        report.fail(
            "leaves its input unchanged",
            mutated,
            "Build a new list; do not pop from or reorder the list you are given.",
        )
    else:
        report.ok("leaves its input unchanged")
    return report.result()
