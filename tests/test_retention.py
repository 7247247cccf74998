"""labkit.retention: the planted-fact benchmark's bookkeeping (model-free probes)."""

from __future__ import annotations

import pytest

from labkit.history import FullHistory, NoHistory, SlidingWindow, Summarise
from labkit.retention import (
    Fact,
    ScriptedConversation,
    in_context_probe,
    load_conversation,
    lost_facts_table,
    run_retention,
    summary_table,
)


def scripted(turns: int = 12) -> ScriptedConversation:
    pairs = []
    facts = []
    for i in range(1, turns + 1):
        user = f"Turn {i}: some talk about streaming. " * 5
        if i % 3 == 0:
            user += f"By the way, my code number is X{i}Q."
            facts.append(
                Fact(
                    id=f"code{i}",
                    turn=i,
                    probe=f"What was the code from turn {i}?",
                    prefill="The code is",
                    answer=f"X{i}Q",
                    candidates=(f"X{i}Q", "A1", "B2", "C3", "D4"),
                )
            )
        pairs.append((user, f"Reply {i}: noted. " * 8))
    return ScriptedConversation("Be helpful.", pairs, facts, retention_turns=turns)


def test_retention_rows_show_what_each_strategy_keeps():
    conv = scripted()
    full_tokens = FullHistory().select(conv.messages(), conv.system).tokens
    strategies = {
        "none": NoHistory(),
        "full": FullHistory(),
        "window": SlidingWindow(full_tokens // 3),
    }
    facts, strats = run_retention(conv, strategies, in_context_probe, progress=False)
    table = summary_table(strats)
    assert table.loc["full", "recall"] == 1.0
    assert table.loc["none", "recall"] == 0.0
    assert 0 < table.loc["window", "recall"] < 1.0
    assert (
        table.loc["none", "total_tokens"]
        < table.loc["window", "total_tokens"]
        < table.loc["full", "total_tokens"]
    )
    assert len(facts) == 3 * len(conv.facts)
    lost = lost_facts_table(facts)
    assert list(lost.columns) == ["none", "full", "window"]
    # The window keeps the newest fact and loses the oldest.
    assert lost["window"].iloc[-1] == "✓" and lost["window"].iloc[0] == "–"
    assert set(lost["full"]) == {"✓"}


def test_retention_counts_summariser_tokens_in_the_total():
    conv = scripted()
    usage: list[tuple[int, int]] = []

    def summariser(previous: str, messages: list[dict]) -> str:
        usage.append((100, 10))
        codes = [w for m in messages for w in m["content"].split() if w.startswith("X")]
        return (previous + " codes: " + " ".join(codes)).strip()

    strategies = {"summary": Summarise(summariser, keep_recent=2, every=3)}
    _facts, strats = run_retention(
        conv, strategies, in_context_probe, summariser_usage={"summary": usage}, progress=False
    )
    row = strats[0]
    assert row["summariser_tokens"] == 110 * len(usage) > 0
    assert row["recall"] == 1.0, "every code survives in the summary"


def test_the_lab_conversation_has_planted_facts_at_many_depths():
    conv = load_conversation()
    assert len(conv.turns) >= 50
    assert len(conv.facts) >= 10
    assert conv.retention_turns <= len(conv.turns)
    assert len(conv.facts_within(conv.retention_turns)) >= 10
    assert len({f.turn for f in conv.facts}) == len(conv.facts), "different depths"
    for f in conv.facts:
        assert len(f.candidates) >= 5 and f.answer in f.candidates
        assert f.answer.lower() in conv.turns[f.turn - 1][0].lower(), "stated by the user"
        others = [c for c in f.candidates if c != f.answer]
        said = " ".join(u + " " + a for u, a in conv.turns).lower()
        assert not any(f" {c.lower()} " in said for c in others), f"{f.id}: a distractor appears"


def test_missing_conversation_file_is_a_configuration_error(tmp_path):
    from labkit.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        load_conversation(tmp_path / "nope.json")


@pytest.mark.llama
def test_rank_probe_recalls_a_name_only_when_the_history_is_sent(llama_api):
    from labkit.providers import client
    from labkit.retention import rank_probe

    clients = client("local", base_url=llama_api.base_url)
    fact = Fact(
        "name", 1, "What is my name?", "Your name is", "Ajay", ("Ajay", "Rahul", "Vikram", "Arjun")
    )
    history = [
        {"role": "user", "content": "Hi! My name is Ajay."},
        {"role": "assistant", "content": "Nice to meet you, Ajay!"},
        {"role": "user", "content": "I work on a network monitor written in C."},
        {"role": "assistant", "content": "That sounds like an interesting project."},
    ]
    question = {"role": "user", "content": fact.probe}
    probe = rank_probe(clients)
    assert probe([*history, question], "", fact).correct
    assert probe([question], "", fact).said in fact.candidates
