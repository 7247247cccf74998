"""Lab 1's exercises: measure TTFT of a streamed request, and the total time of a plain one.

The learner writes ``fn(client, model, messages, max_tokens) -> float``: one request
with the SDK ``client`` it is given, the time in **milliseconds**. The checker hands it a
client pointed at the local API's sim engine with a latency drawn at random for each
trial, so it knows the true answer, and compares.

Notes:

1. The truth. For a streamed reply the sim holds the response (and its first event,
   ``message_start``) until ``ttft − gap`` after the request arrived, sends the first
   text delta at ``ttft``, then one delta every ``itl``. The gap makes the classic
   mistakes land on different numbers: timing to the first *event* measures
   ``ttft − gap``; starting the clock once the stream is open (after the request was
   sent and its headers came back) measures ``gap``; timing the whole stream measures
   ``ttft + (n − 1) · itl``; returning seconds gives a number a thousand times smaller.
   Gaps are drawn so that these stay apart (note 2).
2. Tolerance. A correct measurement is never below the truth (the client's clock starts
   before the server's and stops after it) by more than a few ms, and is above it by
   client overhead: connecting, building the request, parsing, and, on a busy machine,
   waiting for a core. The window is ``[truth − 5 ms, truth + max(60 ms, 25 %)]``. Every
   mistake that measures *less* than the truth (first event, clock started late) lands
   at least 50 ms below it, and the whole stream at least 285 ms above it, so the wide
   upper margin admits none of them. Gaps are at least 50 ms for that reason.
3. The checker builds the SDK client itself (the library otherwise never does): it is
   part of the instrument, pointed at the checker's own sim, with retries off.
4. When the local API can report what it received (``LocalAPIServer.requests``), the
   checker also confirms that the learner's function made the request, streamed or not
   as the exercise asks.
"""

from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass
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

__all__ = ["check_total_time", "check_ttft"]

_LOW_MS = 5.0


def _window(truth: float) -> tuple[float, float]:
    return truth - _LOW_MS, truth + max(60.0, 0.25 * truth)


def _within(value: float, truth: float) -> bool:
    lo, hi = _window(truth)
    return lo <= value <= hi


@dataclass
class _Trial:
    truth: float
    value: float | None
    verdict: str
    candidates: dict[str, float]


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, np.generic):
                return float(value)
        except ImportError:  # pragma: no cover
            pass
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _classify(value: float, candidates: dict[str, float]) -> str:
    """The name of the candidate ``value`` matches, ``seconds:<name>``, or "off"."""
    for name, truth in candidates.items():
        if _within(value, truth):
            return name
    if value < 10:
        for name, truth in candidates.items():
            if _within(value * 1000, truth):
                return f"seconds:{name}"
    return "off"


def _majority(trials: list[_Trial]) -> str:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.verdict] = counts.get(t.verdict, 0) + 1
    return max(counts, key=lambda k: (counts[k], k == "correct"))


def _table(trials: list[_Trial]) -> str:
    return "; ".join(
        f"truth {t.truth:.0f} ms → yours {t.value:.4g}" if t.value is not None else "no number"
        for t in trials
    )


_TTFT_GUIDE = (
    "Write ttft(client, model, messages, max_tokens): take time.perf_counter() just before "
    "client.messages.stream(...), open the stream, and when the first non-empty text arrives "
    "(the first item of stream.text_stream) take it again; return the difference in milliseconds."
)

_TTFT_RUN_HINT = (
    "Make one streamed request with the client you are given "
    "(client.messages.stream(model=model, max_tokens=max_tokens, messages=messages))."
)

_TTFT_MISTAKES = {
    "first_event": (
        "you measured the time to the first *event* (message_start arrives before any text)",
        "Stop the clock at the first text: the first item of stream.text_stream, or the first "
        "content_block_delta whose delta.type is 'text_delta' (OpenAI: the first chunk whose "
        "delta.content is non-empty).",
    ),
    "after_send": (
        "your clock started after the request was sent (the stream was already open), so it "
        "misses the wait for the response",
        "Take the start time before calling client.messages.stream(...) / entering the `with`.",
    ),
    "whole_stream": (
        "you timed the whole stream, not the first token",
        "Stop the clock as soon as the first text arrives, then keep reading (or close) the stream.",
    ),
    "zero": (
        "your clock started after the first text had arrived",
        "Take the start time before the request is sent.",
    ),
}


def check_ttft(
    fn: Any,
    *,
    trials: int = 3,
    api: str = "anthropic",
    seed: int | None = None,
    server: Any = None,
) -> CheckResult:
    """Check ``fn(client, model, messages, max_tokens) -> TTFT in ms`` of one streamed request.

    Runs ``trials`` requests against the sim engine with a TTFT drawn from 150–400 ms
    (and a known gap between the first event and the first text), and compares.
    ``api="openai"`` hands ``fn`` an ``openai.OpenAI`` client instead. ``server``: a
    running sim ``LocalAPIServer`` to use (default: one started for the checkers).
    """
    name = "check_ttft"
    if is_placeholder(fn):
        return not_done(name, "TTFT of a streamed request", _TTFT_GUIDE)
    rng = random.Random(seed)
    report = Report(name)
    try:
        server = server or shared_sim()
    except Exception as exc:
        report.skip("the sim local API", f"could not start: {exc}")
        return report.result()
    marker = f"ttft-check-{uuid.uuid4().hex[:8]}"
    try:
        _warm_up(fn, api, server, marker)
    except NotDone:
        return not_done(name, "TTFT of a streamed request", _TTFT_GUIDE)
    except Exception as exc:
        report.fail("your function runs", describe_error(exc), _TTFT_RUN_HINT)
        return report.result()
    results: list[_Trial] = []
    for i in range(max(1, trials)):
        ttft = round(rng.uniform(150, 400))
        gap = round(50 + rng.random() * max(0.0, (ttft - 50) / 2 - 50))
        itl, n = 15, 20
        header = f"ttft_ms={ttft};first_text_gap_ms={gap};itl_ms={itl};reply_tokens={n};jitter_ms=0"
        candidates = {
            "correct": float(ttft),
            "first_event": float(ttft - gap),
            "after_send": float(gap),
            "whole_stream": float(ttft + (n - 1) * itl),
        }
        messages = [
            {"role": "user", "content": f"Explain streaming in one paragraph. ({marker}-{i})"}
        ]
        client = make_client(api, server, header)
        try:
            value = call_learner(fn, client, MODEL, messages, 200)
        except NotDone:
            return not_done(name, "TTFT of a streamed request", _TTFT_GUIDE)
        except Exception as exc:
            report.fail("your function runs", describe_error(exc), _TTFT_RUN_HINT)
            return report.result()
        finally:
            client.close()
        number = _as_number(value)
        if number is None:
            report.fail(
                "returns a number of milliseconds",
                f"it returned {type(value).__name__} {value!r:.80}",
                "Return a float: (t_first_text - t_start) * 1000.",
            )
            return report.result()
        verdict = _classify(number, candidates)
        if verdict == "off" and number <= 0.5:
            verdict = "zero"
        results.append(_Trial(float(ttft), number, verdict, candidates))

    report.measured["trials"] = [
        {"truth_ms": t.truth, "value": t.value, "verdict": t.verdict} for t in results
    ]
    _check_requests(report, server, marker, len(results), stream=True)
    _verdict_report(report, results, "TTFT", _TTFT_MISTAKES)
    return report.result()


def _verdict_report(
    report: Report, results: list[_Trial], what: str, mistakes: dict[str, tuple[str, str]]
) -> None:
    verdict = _majority(results)
    table = _table(results)
    seconds = [t for t in results if t.verdict.startswith("seconds:")]
    if seconds:
        report.fail(
            "returns milliseconds",
            f"the values look like seconds ({table})",
            "Multiply the difference of two time.perf_counter() readings by 1000.",
        )
        inner = seconds[0].verdict.partition(":")[2]
        if inner != "correct" and inner in mistakes:
            what_wrong, hint = mistakes[inner]
            report.fail(f"{what} is measured at the right moments", f"and {what_wrong}", hint)
        return
    correct = [t for t in results if t.verdict == "correct"]
    slow = [t for t in results if t.verdict == "off" and (t.value or 0) > t.truth]
    tolerance = "(tolerance −5 ms / +max(60 ms, 25 %))"
    if len(correct) == len(results):
        report.ok(f"{what} matches the truth", f"{table} {tolerance}")
        return
    if 3 * len(correct) >= 2 * len(results) and len(correct) + len(slow) == len(results):
        report.ok(f"{what} matches the truth", f"{table} {tolerance}")
        report.note(
            "one trial was slow",
            "outside the tolerance above the truth, as when the machine is busy; the others match",
        )
        return
    if verdict in mistakes:
        what_wrong, hint = mistakes[verdict]
        report.fail(f"{what} matches the truth", f"{table}: {what_wrong}.", hint)
        return
    worst = max(results, key=lambda t: abs((t.value or 0) - t.truth))
    direction = "above" if (worst.value or 0) > worst.truth else "below"
    report.fail(
        f"{what} matches the truth",
        f"{table}: {abs((worst.value or 0) - worst.truth):.0f} ms {direction} the truth in the "
        "worst trial, and it matches none of the usual mistakes.",
        "Take time.perf_counter() immediately before the request and immediately at the moment "
        "asked for, with nothing slow in between (no printing, no sleeping), and return "
        "milliseconds.",
    )


def _warm_up(fn: Any, api: str, server: Any, marker: str) -> None:
    """One untimed call with no latency: loads what the SDK loads lazily on first use,
    and finds unfinished code before any trial (raises NotDone / the learner's error)."""
    client = make_client(api, server, "ttft_ms=0;itl_ms=0;reply_tokens=3")
    try:
        call_learner(fn, client, MODEL, [{"role": "user", "content": f"Warm up. ({marker})"}], 20)
    finally:
        client.close()


def _check_requests(
    report: Report, server: Any, marker: str, expected: int, *, stream: bool
) -> None:
    seen = sim_requests(server, marker)
    if seen is None:
        return
    posts = [e for e in seen if str(e.get("path", "")).endswith(("/messages", "/completions"))]
    if len(posts) < expected:
        report.fail(
            "makes one request per call",
            f"the local API received {len(posts)} request(s) for {expected} calls",
            "Use the client you are given, with the messages you are given.",
        )
        return
    streamed = [bool((e.get("body") or {}).get("stream")) for e in posts]
    if stream and not all(streamed):
        report.fail(
            "streams the reply",
            "a request was sent without stream=True, so there is no first token to time",
            "Use client.messages.stream(...) (OpenAI: chat.completions.create(stream=True) or .stream()).",
        )
    elif not stream and any(streamed):
        report.fail(
            "uses the non-streaming call",
            "a request was streamed; this exercise times the plain call",
            "Use client.messages.create(...) without stream=True (OpenAI: chat.completions.create).",
        )


_TOTAL_GUIDE = (
    "Write total_time(client, model, messages, max_tokens): take time.perf_counter() just "
    "before client.messages.create(...), take it again when the response (response.content) "
    "is available, and return the difference in milliseconds."
)

_TOTAL_RUN_HINT = (
    "Make one request with the client you are given "
    "(client.messages.create(model=model, max_tokens=max_tokens, messages=messages))."
)

_TOTAL_MISTAKES = {
    "headers": (
        "you stopped the clock when the response started, not when it was complete",
        "Use the non-streaming create() and stop the clock after it returns.",
    ),
    "zero": (
        "your clock did not include the request (it started after the call returned)",
        "Take the start time before calling client.messages.create(...).",
    ),
}


def check_total_time(
    fn: Any,
    *,
    trials: int = 3,
    api: str = "anthropic",
    seed: int | None = None,
    server: Any = None,
) -> CheckResult:
    """Check ``fn(client, model, messages, max_tokens) -> total ms`` of one non-streaming request.

    The sim answers after a total time drawn at random per trial (TTFT 150–400 ms, then
    10–30 tokens 10–20 ms apart); the checker compares.
    """
    name = "check_total_time"
    if is_placeholder(fn):
        return not_done(name, "total time of a non-streaming request", _TOTAL_GUIDE)
    rng = random.Random(seed)
    report = Report(name)
    try:
        server = server or shared_sim()
    except Exception as exc:
        report.skip("the sim local API", f"could not start: {exc}")
        return report.result()
    marker = f"total-check-{uuid.uuid4().hex[:8]}"
    try:
        _warm_up(fn, api, server, marker)
    except NotDone:
        return not_done(name, "total time of a non-streaming request", _TOTAL_GUIDE)
    except Exception as exc:
        report.fail("your function runs", describe_error(exc), _TOTAL_RUN_HINT)
        return report.result()
    results: list[_Trial] = []
    for i in range(max(1, trials)):
        ttft = round(rng.uniform(150, 400))
        gap = round(ttft * 0.5)
        n, itl = rng.randint(10, 30), rng.randint(10, 20)
        total = ttft + (n - 1) * itl
        header = f"ttft_ms={ttft};first_text_gap_ms={gap};itl_ms={itl};reply_tokens={n};jitter_ms=0"
        candidates = {"correct": float(total), "headers": float(ttft - gap)}
        messages = [{"role": "user", "content": f"Explain RAG in detail. ({marker}-{i})"}]
        client = make_client(api, server, header)
        try:
            value = call_learner(fn, client, MODEL, messages, 200)
        except NotDone:
            return not_done(name, "total time of a non-streaming request", _TOTAL_GUIDE)
        except Exception as exc:
            report.fail("your function runs", describe_error(exc), _TOTAL_RUN_HINT)
            return report.result()
        finally:
            client.close()
        number = _as_number(value)
        if number is None:
            report.fail(
                "returns a number of milliseconds",
                f"it returned {type(value).__name__} {value!r:.80}",
                "Return a float: (t_end - t_start) * 1000.",
            )
            return report.result()
        verdict = _classify(number, candidates)
        if verdict == "off" and number <= 0.5:
            verdict = "zero"
        results.append(_Trial(float(total), number, verdict, candidates))
    report.measured["trials"] = [
        {"truth_ms": t.truth, "value": t.value, "verdict": t.verdict} for t in results
    ]
    _check_requests(report, server, marker, len(results), stream=False)
    _verdict_report(report, results, "total time", _TOTAL_MISTAKES)
    return report.result()
