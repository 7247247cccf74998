"""Per-turn cost of choosing what to send, on one 1,000-turn conversation.

Side by side in one run, at a 4k and a 100k token budget:

- **labkit** ``SlidingWindow`` (cached per-message counts, running prefix sums,
  binary search), timed on every turn of the growing conversation; two columns:
  *select* (the counts of earlier messages already cached — what a manager pays per
  turn once it has counted each message as it arrived) and *+encode* (a fresh
  counter, so the turn also pays for encoding its new messages once);
- the course's ``sliding_window`` (:func:`labkit.history.course_sliding_window`),
  which re-encodes every kept message on every call;
- LangChain's ``trim_messages`` with a tiktoken list counter (the optional ``peer``
  extra: ``pip install langchain-core``; skipped with a message when missing).

The baselines are slow, so they are timed at a few checkpoints (turn numbers)
rather than on every turn; labkit is reported at the same checkpoints (median of
the turns around each) and over all turns.

Usage: ``python benchmarks/context.py [--turns 1000] [--quick]``
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from labkit.history import SlidingWindow, course_sliding_window
from labkit.tokens import MESSAGE_OVERHEAD, TokenCounter, get_encoding

BUDGETS = (4_000, 100_000)
MIN_TURNS = 2  # the course's default, used by every contender
CALL_CAP_S = 20.0  # stop timing a baseline at larger checkpoints once one call takes this long

VOCABULARY = (
    "the a of to and in is that for it as with was on be by this are or from at an but not "
    "have has had were which their will can would there been more one all when also into "
    "stream token window context latency server client message history summary budget model "
    "request response cache session python async buffer socket thread queue event parser "
    "benchmark throughput memory packet kernel driver network routing protocol interface"
)
WORDS = VOCABULARY.split()


def conversation(turns: int, seed: int = 0) -> list[dict[str, str]]:
    """``turns`` user/assistant pairs of 60 and 140 words (seeded, deterministic)."""
    rng = random.Random(seed)
    msgs: list[dict[str, str]] = []
    for i in range(turns):
        msgs.append({"role": "user", "content": f"Q{i}: " + " ".join(rng.choices(WORDS, k=60))})
        msgs.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=140))})
    return msgs


def checkpoints(turns: int) -> list[int]:
    points = [t for t in (10, 100, 250, 500, 750, 1000) if t <= turns]
    return points if turns in points else [*points, turns]


def time_call(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``reps`` calls."""
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def labkit_per_turn(msgs: list[dict[str, str]], budget: int, warm: bool) -> list[float]:
    """Seconds of ``SlidingWindow.select`` for each turn t (history + new question)."""
    counter = TokenCounter()
    if warm:
        for m in msgs:
            counter.text(m["content"])
    strat = SlidingWindow(budget, min_turns=MIN_TURNS, counter=counter)
    growing: list[dict[str, str]] = []
    out = []
    perf = time.perf_counter
    for t in range(len(msgs) // 2):
        growing.append(msgs[2 * t])  # the new user question
        t0 = perf()
        strat.select(growing)
        out.append(perf() - t0)
        growing.append(msgs[2 * t + 1])  # the reply joins the history
    return out


def langchain_trim() -> Callable[[list[Any], int], list[Any]] | None:
    try:
        from langchain_core.messages import trim_messages
    except ImportError:
        return None
    enc = get_encoding("cl100k_base")

    def tiktoken_counter(messages: list[Any]) -> int:
        # The counter LangChain's docs show: tokens per message + content tokens.
        return 3 + sum(MESSAGE_OVERHEAD + len(enc.encode(str(m.content))) for m in messages)

    def trim(lc_messages: list[Any], budget: int) -> list[Any]:
        return trim_messages(
            lc_messages,
            max_tokens=budget,
            token_counter=tiktoken_counter,
            strategy="last",
            start_on="human",
            allow_partial=False,
        )

    return trim


def to_langchain(msgs: list[dict[str, str]]) -> list[Any]:
    from langchain_core.messages import AIMessage, HumanMessage

    return [
        HumanMessage(m["content"]) if m["role"] == "user" else AIMessage(m["content"]) for m in msgs
    ]


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1000
    return f"{ms:.4f}" if ms < 0.1 else f"{ms:.2f}" if ms < 100 else f"{ms:,.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="200 turns, one repetition")
    args = ap.parse_args(argv)
    turns = 200 if args.quick else args.turns
    reps = 1 if args.quick else 3

    msgs = conversation(turns)
    counter = TokenCounter()
    per_turn = sum(counter.message(m) for m in msgs) / turns
    print(
        f"conversation: {turns} turns (60 + 140 words), {counter.messages(msgs):,} tokens "
        f"estimated in all, {per_turn:.0f} per turn; min_turns={MIN_TURNS}; "
        f"baselines: median of {reps} call(s) at each checkpoint"
    )
    trim = langchain_trim()
    if trim is None:
        print("LangChain: skipped (pip install langchain-core, the `peer` extra, to include it)")
    lc_msgs = to_langchain(msgs) if trim else []

    points = checkpoints(turns)
    # Warm-up: first calls pay one-off costs (imports, regex compilation).
    course_sliding_window(msgs[:21], 4_000, MIN_TURNS)
    if trim:
        trim(lc_msgs[:21], 4_000)
    for budget in BUDGETS:
        warm = labkit_per_turn(msgs, budget, warm=True)
        cold = labkit_per_turn(msgs, budget, warm=False)
        # Sanity: labkit and the course keep the same number of messages at the last turn.
        print(f"\n== budget {budget:,} tokens: ms per turn to choose what to send")
        header = f"{'turn':>6} | {'labkit select':>13} | {'labkit +encode':>14} | {'course sliding_window':>21}"
        header += f" | {'LangChain trim_messages':>23}" if trim else ""
        print(header)
        print("-" * len(header))
        capped: dict[str, bool] = {"course": False, "langchain": False}
        for t in points:
            history = msgs[: 2 * t - 1]
            lo, hi = max(t - 5, 0), t
            lk_warm = statistics.median(warm[lo:hi])
            lk_cold = statistics.median(cold[lo:hi])
            course = None
            if not capped["course"]:
                course = time_call(
                    lambda h=history, b=budget: course_sliding_window(h, b, MIN_TURNS), reps
                )
                capped["course"] = course > CALL_CAP_S
            row = f"{t:>6} | {fmt_ms(lk_warm):>13} | {fmt_ms(lk_cold):>14} | {fmt_ms(course):>21}"
            if trim:
                lc = None
                if not capped["langchain"]:
                    lc_hist = lc_msgs[: 2 * t - 1]
                    lc = time_call(lambda h=lc_hist, b=budget: trim(h, b), 1)
                    capped["langchain"] = lc > CALL_CAP_S
                row += f" | {fmt_ms(lc):>23}"
            print(row, flush=True)
        kept_lk = len(SlidingWindow(budget, MIN_TURNS).select(msgs[: 2 * turns - 1]).messages)
        kept_course = len(course_sliding_window(msgs[: 2 * turns - 1], budget, MIN_TURNS))
        print(
            f"all {turns} turns, labkit select: median {fmt_ms(statistics.median(warm))} ms, "
            f"p99 {fmt_ms(statistics.quantiles(warm, n=100)[98])} ms, "
            f"max {fmt_ms(max(warm))} ms; +encode median {fmt_ms(statistics.median(cold))} ms; "
            f"first/last quarter medians {fmt_ms(statistics.median(warm[: turns // 4]))} / "
            f"{fmt_ms(statistics.median(warm[-turns // 4 :]))} ms"
        )
        print(f"messages kept at the last turn: labkit {kept_lk}, course {kept_course}")
        if any(capped.values()):
            print(f"(— : not timed, an earlier call took over {CALL_CAP_S:.0f} s)")
    goal = 0.05e-3
    print(f"\ngoal: labkit select <= {goal * 1000} ms per turn at either budget, flat as it grows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
