"""The planted-fact benchmark of lab 2: what each context strategy remembers, and at what cost.

A scripted conversation (``data/lab2_conversation.json``) states facts at different
depths ("my name is Priya", "our staging server is called kestrel"). After the
conversation, each fact is probed ("What is my name?") with only what the strategy
would send, and the model's answer is judged.

Notes:

1. **Probing a small model robustly.** A 135M model rarely answers a free question
   from an earlier turn, so two methods are offered. ``"rank"`` (default on the
   local API): the probe ends with an assistant prefill ("Your name is") and the
   model's log-likelihood of each candidate continuation is computed
   (:func:`labkit.providers.score_candidates`: the prompt is evaluated once, only
   each candidate's tokens after it); the highest-scoring candidate is the answer.
   Chance is 1 / number of candidates. ``"prefill"`` (any provider): the same prefill
   and a short greedy continuation; correct when the answer appears in it.
2. **Cost** is that of running the whole conversation under the strategy: at every
   turn t the strategy selects from turns 1..t-1 plus the new user message; the
   tiktoken estimate of each request is summed (``total_tokens``), plus the
   summariser's own input and output tokens for :class:`~labkit.history.Summarise`.
   The scripted replies are not regenerated, so the estimate is the common yardstick.
3. ``in_context`` says whether the fact's answer text is anywhere in what was sent
   (the summary included): an upper bound for recall, and a check on the probe.
4. Strategies are stateful (:class:`Summarise` keeps its running summary), so each
   run uses the objects it is given from the first turn on; pass fresh ones.
5. **A right answer is not always a recall.** A probe can pick the right candidate
   for a fact that was never sent (chance is 1 in 5 with five candidates). Such a
   hit is counted apart (``lucky``) and marked "(✓)" in :func:`lost_facts_table`;
   ``recalled_sent`` counts only hits on facts that were in the request.
6. **Free answers are labelled from the data, not judged by eye.**
   :func:`label_reply` reads a free-text reply (no prefill, no candidates) against
   the fact: *correct* when it names the true answer and no wrong candidate;
   *hallucinated* when it names a wrong candidate; *refused* when it matches one of
   :data:`REFUSAL_PHRASES` ("I don't know", "cannot recall", ...); anything else is
   *hallucinated* too: an answer that does not rest on the fact. Matching is
   case-insensitive on whole words, so a paraphrase ("March 14" for "the 14th of
   March") counts as not naming the answer: read the reply printed beside the label.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import upstream
from .errors import ConfigurationError
from .history import ConversationManager, Strategy
from .history.clients import model_of, sdk_client
from .tokens import TokenCounter, exact_count, message_text, supports_exact_count

__all__ = [
    "MARKS",
    "REFUSAL_PHRASES",
    "Fact",
    "ProbeResult",
    "ReplyLabel",
    "ScriptedConversation",
    "ask_freely",
    "cheapest_keeping",
    "default_probe",
    "in_context_probe",
    "kept_turns",
    "label_reply",
    "load_conversation",
    "lost_facts_table",
    "mentions",
    "prefill_probe",
    "rank_probe",
    "retention_conclusion",
    "run_retention",
    "strategy_lines",
    "summary_retention",
    "summary_table",
    "token_growth",
]

Message = dict[str, Any]


@dataclass(frozen=True)
class Fact:
    """A fact planted in the conversation, with its probe."""

    #: Short id ("name", "city", ...).
    id: str
    #: 1-based turn whose user message states it.
    turn: int
    #: The question asked after the conversation.
    probe: str
    #: The start of the assistant's answer, continued by the model.
    prefill: str
    #: The correct continuation (one of ``candidates``).
    answer: str
    #: Candidate continuations, the answer among them.
    candidates: tuple[str, ...]


@dataclass
class ScriptedConversation:
    """The lab's scripted conversation and its planted facts."""

    system: str
    #: (user, assistant) per turn.
    turns: list[tuple[str, str]]
    facts: list[Fact]
    #: Turns after which the benchmark probes (the full script may be longer).
    retention_turns: int

    def messages(self, n_turns: int | None = None) -> list[Message]:
        """The first ``n_turns`` turns as a messages array (all turns by default)."""
        out: list[Message] = []
        for user, assistant in self.turns[: n_turns if n_turns is not None else len(self.turns)]:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out

    def facts_within(self, n_turns: int) -> list[Fact]:
        return [f for f in self.facts if f.turn <= n_turns]


def _data_dir() -> Path:
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / "data" / "lab2_conversation.json").exists():
            return p / "data"
    return Path(__file__).resolve().parents[1] / "data"


def load_conversation(path: str | Path | None = None) -> ScriptedConversation:
    """Load ``data/lab2_conversation.json`` (found from the working directory upwards)."""
    p = Path(path) if path else _data_dir() / "lab2_conversation.json"
    if not p.exists():
        raise ConfigurationError(
            f"No scripted conversation at {p}.",
            hint="Run from the labkit checkout (it ships data/lab2_conversation.json).",
        )
    raw = json.loads(p.read_text())
    facts = [
        Fact(
            id=f["id"],
            turn=int(f["turn"]),
            probe=f["probe"],
            prefill=f["prefill"],
            answer=f["answer"],
            candidates=tuple(f["candidates"]),
        )
        for f in raw["facts"]
    ]
    turns = [(t["user"], t["assistant"]) for t in raw["turns"]]
    return ScriptedConversation(raw["system"], turns, facts, int(raw["retention_turns"]))


# ── probes ────────────────────────────────────────────────────────────────────


@dataclass
class ProbeResult:
    """One probe's verdict."""

    #: The answer the method picked or generated.
    said: str
    correct: bool
    #: Prompt tokens the provider reported for the probe request, cached or not
    #: (0 when it reports none).
    input_tokens: int = 0


Probe = Callable[[list[Message], str, Fact], ProbeResult]


def _with_prefill(messages: list[Message], fact: Fact) -> list[Message]:
    return [*messages, {"role": "assistant", "content": fact.prefill}]


def rank_probe(clients: Any) -> Probe:
    """Rank the candidates by log-likelihood after the prefill (local API only)."""
    from .providers import score_candidates

    def probe(messages: list[Message], system: str, fact: Fact) -> ProbeResult:
        cands = [" " + c for c in fact.candidates]
        scores = score_candidates(clients, _with_prefill(messages, fact), cands, system=system)
        best = fact.candidates[max(range(len(scores)), key=scores.__getitem__)]
        return ProbeResult(best, best == fact.answer)

    return probe


def prefill_probe(clients: Any, *, max_tokens: int = 8) -> Probe:
    """Prefill the answer's start and let the model continue greedily for a few tokens.

    ``clients`` is a :class:`labkit.providers.Clients` or a sync SDK client with a
    ``model`` (see :mod:`labkit.history.clients`). OpenAI has no assistant prefill, so
    there the probe question is sent as it is.
    """
    model = model_of(clients, None)

    def probe(messages: list[Message], system: str, fact: Fact) -> ProbeResult:
        client = sdk_client(clients)
        prefill = upstream.api_of(client) == "anthropic"
        sent = _with_prefill(messages, fact) if prefill else messages
        request = upstream.Request(model, sent, max_tokens, system=system, temperature=0.0)
        reply = upstream.create(client, request)
        said = reply.text.strip()
        return ProbeResult(said, fact.answer.lower() in said.lower(), reply.input_tokens)

    return probe


def default_probe(clients: Any) -> tuple[str, Probe]:
    """``("rank", ...)`` on the local llama engine, else ``("prefill", ...)`` (note 1)."""
    if getattr(clients, "provider", "") == "local" and getattr(clients, "engine", "") == "llama":
        return "rank", rank_probe(clients)
    return "prefill", prefill_probe(clients)


def in_context_probe(messages: list[Message], system: str, fact: Fact) -> ProbeResult:
    """No model: is the answer's text anywhere in what was sent? (an upper bound)."""
    sent = "\n".join(message_text(m) for m in messages[:-1])  # not the probe itself
    present = fact.answer.lower() in sent.lower()
    return ProbeResult(fact.answer if present else "", present)


# ── token growth ──────────────────────────────────────────────────────────────


def token_growth(
    conv: ScriptedConversation,
    clients: Any = None,
    *,
    n_turns: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Tokens of the request sent at each turn when the full history is re-sent.

    The request of turn t is turns 1..t-1 plus user message t. ``estimate`` is
    labkit's tiktoken estimate (:func:`labkit.tokens.count_messages` convention);
    ``exact`` the provider's ``count_tokens`` answer when ``clients`` has one
    (None otherwise).
    """
    from tqdm.auto import tqdm

    n = n_turns or len(conv.turns)
    history = conv.messages(n)
    counter = TokenCounter()
    exact_ok = clients is not None and supports_exact_count(clients)
    rows = []
    for t in tqdm(range(n), desc="count_tokens", disable=not progress):
        request = [*history[: 2 * t], history[2 * t]]
        rows.append(
            {
                "turn": t + 1,
                "estimate": counter.messages(request, conv.system),
                "exact": exact_count(clients, request, conv.system) if exact_ok else None,
            }
        )
    return rows


# ── the benchmark ─────────────────────────────────────────────────────────────


def _cost(conv: ScriptedConversation, strategy: Strategy, n_turns: int) -> list[int]:
    """Estimated prompt tokens of each turn's request under ``strategy`` (note 2)."""
    history = conv.messages(n_turns)
    per_turn = []
    for t in range(n_turns):
        request = [*history[: 2 * t], history[2 * t]]
        per_turn.append(strategy.select(request, conv.system).tokens)
    return per_turn


def run_retention(
    conv: ScriptedConversation,
    strategies: dict[str, Strategy],
    probe: Probe,
    *,
    n_turns: int | None = None,
    summariser_usage: dict[str, list[tuple[int, int]]] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run the benchmark; return ``(per_fact_rows, per_strategy_rows)``.

    ``summariser_usage`` maps a strategy label to the list a
    :func:`~labkit.history.model_summariser` appends ``(input, output)`` tokens to,
    so the summariser's tokens count in that strategy's total.
    """
    from tqdm.auto import tqdm

    n = n_turns or conv.retention_turns
    facts = conv.facts_within(n)
    history = conv.messages(n)
    fact_rows: list[dict[str, Any]] = []
    strat_rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(strategies) * len(facts), desc="probes", disable=not progress)
    for label, strategy in strategies.items():
        t0 = time.perf_counter()
        per_turn = _cost(conv, strategy, n)
        cost_s = time.perf_counter() - t0
        probe_s = 0.0
        correct = in_ctx = sent_hits = 0
        probe_tokens: list[int] = []
        for fact in facts:
            sel = strategy.select([*history, {"role": "user", "content": fact.probe}], conv.system)
            t1 = time.perf_counter()
            res = probe(sel.messages, conv.system, fact)
            probe_s += time.perf_counter() - t1
            present = in_context_probe(sel.messages, conv.system, fact).correct
            correct += res.correct
            in_ctx += present
            sent_hits += bool(res.correct and present)
            probe_tokens.append(sel.tokens)
            fact_rows.append(
                {
                    "strategy": label,
                    "fact": fact.id,
                    "turn": fact.turn,
                    "depth_turns": n - fact.turn + 1,
                    "answer": fact.answer,
                    "said": res.said,
                    "correct": bool(res.correct),
                    "in_context": present,
                    "probe_tokens": sel.tokens,
                }
            )
            bar.update()
        summ = (summariser_usage or {}).get(label, [])
        summ_tokens = sum(i + o for i, o in summ)
        strat_rows.append(
            {
                "strategy": label,
                "recall": correct / len(facts) if facts else 0.0,
                "correct": correct,
                "recalled_sent": sent_hits,
                "lucky": correct - sent_hits,
                "facts": len(facts),
                "in_context": in_ctx,
                "prompt_tokens_per_turn": sum(per_turn) / len(per_turn) if per_turn else 0.0,
                "probe_prompt_tokens": sum(probe_tokens) / len(probe_tokens) if probe_tokens else 0,
                "summariser_tokens": summ_tokens,
                "total_tokens": sum(per_turn) + summ_tokens,
                "time_s": cost_s + probe_s,
            }
        )
    bar.close()
    return fact_rows, strat_rows


def summary_table(strat_rows: Iterable[dict[str, Any]]) -> Any:
    """The per-strategy table as a pandas DataFrame, indexed by strategy."""
    import pandas as pd

    return pd.DataFrame(list(strat_rows)).set_index("strategy")


#: The marks of :func:`lost_facts_table` and :func:`summary_retention` (note 5).
MARKS = {
    "✓": "recalled: the fact was sent and the probe found it",
    "(✓)": "right answer although the fact was never sent: a lucky guess",
    "✗": "the fact was sent, but the probe missed it",
    "–": "the strategy did not send it (dropped, or lost from the summary)",
}


def _mark(correct: bool, in_context: bool) -> str:
    if correct:
        return "✓" if in_context else "(✓)"
    return "✗" if in_context else "–"


def lost_facts_table(fact_rows: Iterable[dict[str, Any]]) -> Any:
    """Fact × strategy table of :data:`MARKS`: recalled, lucky guess, missed, not sent."""
    import pandas as pd

    df = pd.DataFrame(list(fact_rows))
    df["mark"] = [_mark(c, i) for c, i in zip(df["correct"], df["in_context"], strict=True)]
    order = list(dict.fromkeys(df["strategy"]))
    table = df.pivot_table(
        index=["turn", "fact"], columns="strategy", values="mark", aggfunc="first"
    )
    return table[order]


# ── reading free answers (note 6) ─────────────────────────────────────────────

#: Phrases that mark a reply as declining to answer (matched case-insensitively).
REFUSAL_PHRASES: tuple[str, ...] = (
    "i don't know",
    "i do not know",
    "don't remember",
    "do not remember",
    "can't remember",
    "cannot remember",
    "can't recall",
    "cannot recall",
    "unable to recall",
    "unable to remember",
    "not able to recall",
    "no record",
    "no information",
    "not mentioned",
    "haven't told",
    "have not told",
    "didn't tell",
    "did not tell",
    "didn't mention",
    "did not mention",
    "not sure",
    "don't have access",
    "do not have access",
    "i'm unable",
    "i am unable",
    "i can't",
    "i cannot",
    "as an ai",
)


def _norm(text: str) -> str:
    return text.replace("\u2019", "'").casefold()


def mentions(text: str, phrase: str) -> bool:
    """True when ``phrase`` occurs in ``text`` as whole words, ignoring case."""
    pattern = r"(?<!\w)" + re.escape(_norm(phrase)) + r"(?!\w)"
    return re.search(pattern, _norm(text)) is not None


@dataclass(frozen=True)
class ReplyLabel:
    """The label of a free-text reply about a fact, and why (note 6)."""

    #: "correct", "refused" or "hallucinated".
    label: str
    #: What decided it, in words.
    reason: str

    def __str__(self) -> str:
        return f"{self.label}: {self.reason}"


def label_reply(
    reply: str, fact: Fact, *, refusal_phrases: Iterable[str] = REFUSAL_PHRASES
) -> ReplyLabel:
    """Label ``reply`` to ``fact``'s question: correct, refused or hallucinated (note 6)."""
    wrong = [c for c in fact.candidates if c != fact.answer and mentions(reply, c)]
    if wrong:
        names = ", ".join(repr(c) for c in wrong)
        return ReplyLabel("hallucinated", f"names {names}, not the true {fact.answer!r}")
    if mentions(reply, fact.answer):
        return ReplyLabel("correct", f"names the true answer {fact.answer!r}")
    refusal = next((p for p in refusal_phrases if p in _norm(reply)), None)
    if refusal is not None:
        return ReplyLabel("refused", f"declines ({refusal!r}) and names no candidate")
    return ReplyLabel("hallucinated", f"neither names {fact.answer!r} nor declines to answer")


def kept_turns(conv: ScriptedConversation, messages: Iterable[Message]) -> list[int]:
    """1-based numbers of the scripted turns whose user message is in ``messages``."""
    sent = {message_text(m) for m in messages if m.get("role") == "user"}
    return [i for i, (user, _a) in enumerate(conv.turns, 1) if user in sent]


def ask_freely(
    manager: ConversationManager, history: list[Message], facts: Iterable[Fact]
) -> list[dict[str, Any]]:
    """Ask each fact's question as a free question, from ``history`` each time; label the replies.

    The manager's strategy chooses what is sent (the history is reloaded before each
    question, so questions do not see each other). Rows: fact, turn, ``sent`` (the
    answer's text was in the request), the reply in full, its label and the reason.
    """
    rows = []
    for fact in facts:
        manager.load_history(history)
        reply = manager.chat(fact.probe)
        sent = manager.last_selection.messages if manager.last_selection else []
        verdict = label_reply(reply, fact)
        rows.append(
            {
                "fact": fact.id,
                "turn": fact.turn,
                "question": fact.probe,
                "answer": fact.answer,
                "sent": in_context_probe(sent, manager.system_prompt, fact).correct,
                "reply": reply,
                "label": verdict.label,
                "why": verdict.reason,
            }
        )
    return rows


# ── summarisation: what the summary kept ──────────────────────────────────────


def summary_retention(
    summary: str,
    covers_turns: int,
    facts: Iterable[Fact],
    fact_rows: Iterable[dict[str, Any]] = (),
    strategy: str = "",
) -> list[dict[str, Any]]:
    """Per fact stated in the summarised turns (1..``covers_turns``): is its answer in the
    summary text, and what did the probe make of it (a :data:`MARKS` mark, from the
    ``fact_rows`` of ``strategy``; empty when not given)?"""
    probed = {r["fact"]: r for r in fact_rows if r["strategy"] == strategy}
    rows = []
    for fact in facts:
        if fact.turn > covers_turns:
            continue
        r = probed.get(fact.id)
        rows.append(
            {
                "fact": fact.id,
                "turn": fact.turn,
                "answer": fact.answer,
                "in summary": mentions(summary, fact.answer),
                "probe": _mark(r["correct"], r["in_context"]) if r else "",
            }
        )
    return rows


# ── conclusions from the per-strategy table ───────────────────────────────────


def strategy_lines(table: Any, reference: str = "full history") -> list[str]:
    """One line per strategy of a :func:`summary_table`: hits, what was sent, cost."""
    ref_tokens = max(table.loc[reference, "total_tokens"], 1)
    lines = []
    for label, row in table.iterrows():
        lines.append(
            f"{label:>24}: {row.correct:.0f}/{row.facts:.0f} right "
            f"({row.recalled_sent:.0f} recalled from what was sent, {row.lucky:.0f} lucky), "
            f"facts sent {row.in_context:.0f}/{row.facts:.0f}, "
            f"{row.prompt_tokens_per_turn:,.0f} prompt tokens/turn, "
            f"{row.total_tokens / ref_tokens:.0%} of {reference}'s tokens, {row.time_s:.0f} s"
        )
    return lines


def cheapest_keeping(
    table: Any,
    share: float = 0.75,
    reference: str = "full history",
    exclude: Iterable[str] = ("no history",),
) -> Any:
    """The cheapest strategy (fewest total tokens) that recalled, from what it sent, at
    least ``share`` of what ``reference`` recalled; None when none did."""
    partial = table.drop(index=[reference, *exclude], errors="ignore")
    need = share * table.loc[reference, "recalled_sent"]
    kept = partial[partial["recalled_sent"] >= need] if need > 0 else partial.iloc[0:0]
    return kept.sort_values("total_tokens").iloc[0] if len(kept) else None


def retention_conclusion(
    table: Any,
    *,
    chance: float = 0.0,
    share: float = 0.75,
    reference: str = "full history",
    floor: str = "no history",
) -> str:
    """The benchmark's conclusion in two or three sentences, computed from ``table``."""
    full, none = table.loc[reference], table.loc[floor]
    n = int(full.facts)
    luck = f"; chance alone would give about {chance * n:.1f}" if chance else ""
    first = (
        f"With {floor} the probe got {none.correct:.0f}/{n} facts right, "
        f"{none.lucky:.0f} of them by luck (facts never sent){luck}. "
        f"With {reference} it recalled {full.recalled_sent:.0f}/{n} from what was sent, at "
        f"{full.total_tokens / max(none.total_tokens, 1):.1f}× the tokens"
        + (f" ({'above' if full.recall > chance else 'not above'} chance)." if chance else ".")
    )
    best = cheapest_keeping(table, share, reference, (floor,))
    if best is None:
        return first + f" No cheaper strategy kept {share:.0%} of {reference}'s recall on this run."
    return first + (
        f" The cheapest strategy keeping at least {share:.0%} of it was {best.name} "
        f"({best.recalled_sent:.0f}/{n} at "
        f"{best.total_tokens / max(full.total_tokens, 1):.0%} of {reference}'s tokens)."
    )
