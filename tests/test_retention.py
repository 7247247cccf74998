"""labkit.retention: the planted-fact benchmark's bookkeeping (model-free probes)."""

from __future__ import annotations

import pytest

from labkit.history import ConversationManager, FullHistory, NoHistory, SlidingWindow, Summarise
from labkit.retention import (
    Fact,
    ProbeResult,
    ScriptedConversation,
    ask_freely,
    cheapest_keeping,
    in_context_probe,
    kept_turns,
    label_reply,
    load_conversation,
    lost_facts_table,
    retention_conclusion,
    run_retention,
    strategy_lines,
    summary_retention,
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


def always_right(messages, system, fact):
    """A probe that always names the true answer, sent or not (a perfect guesser)."""
    return ProbeResult(fact.answer, True)


def test_a_right_answer_on_a_fact_never_sent_is_marked_a_lucky_guess():
    conv = scripted()
    strategies = {"none": NoHistory(), "full": FullHistory()}
    facts, strats = run_retention(conv, strategies, always_right, progress=False)
    lost = lost_facts_table(facts)
    assert set(lost["none"]) == {"(✓)"}, "right, but nothing was sent"
    assert set(lost["full"]) == {"✓"}
    table = summary_table(strats)
    assert table.loc["none", "lucky"] == len(conv.facts)
    assert table.loc["none", "recalled_sent"] == 0
    assert table.loc["full", "recalled_sent"] == len(conv.facts)
    assert table.loc["full", "lucky"] == 0


FACT = Fact(
    "name", 2, "What is my name?", "Your name is", "Priya", ("Aisha", "Elena", "Priya", "Maria")
)


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("Your name is Priya.", "correct"),
        ("PRIYA, of course!", "correct"),
        ("My name is Elena, and I'm an astrophysicist.", "hallucinated"),
        ("Priya or maybe Maria?", "hallucinated"),
        ("I'm sorry, I don't know your name: you haven't told me.", "refused"),
        ("I can’t recall that from our conversation.", "refused"),
        ("Server-sent events stream text to the browser.", "hallucinated"),
        ("Your name is Priyanka.", "hallucinated"),
    ],
)
def test_label_reply_reads_a_free_answer_against_the_facts_data(reply, label):
    verdict = label_reply(reply, FACT)
    assert verdict.label == label, verdict.reason


def test_label_reply_says_which_wrong_candidate_it_named():
    verdict = label_reply("My name is Elena.", FACT)
    assert "Elena" in verdict.reason and "Priya" in verdict.reason


def test_kept_turns_are_the_newest_turns_a_sliding_window_sends():
    conv = scripted()
    history = conv.messages()
    full = FullHistory().select(history, conv.system).tokens
    sel = SlidingWindow(full // 3).select([*history, {"role": "user", "content": "?"}], conv.system)
    kept = kept_turns(conv, sel.messages)
    assert 0 < len(kept) < len(conv.turns)
    assert kept == list(range(len(conv.turns) - len(kept) + 1, len(conv.turns) + 1))
    assert kept_turns(conv, history) == list(range(1, len(conv.turns) + 1))


def test_ask_freely_asks_each_question_from_the_same_history(sim_clients):
    conv = scripted()
    history = conv.messages()
    full = FullHistory().select(history, conv.system).tokens
    manager = ConversationManager(
        sim_clients, conv.system, max_tokens=12, strategy=SlidingWindow(full // 3)
    )
    oldest, newest = conv.facts[0], conv.facts[-1]
    rows = ask_freely(manager, history, [oldest, newest])
    assert [r["sent"] for r in rows] == [False, True], "the window drops the oldest fact only"
    assert manager.turn_count == len(conv.turns) + 1, "the first question was not kept"
    assert rows[-1]["reply"] == manager.history[-1].content
    for row, fact in zip(rows, (oldest, newest), strict=True):
        assert row["label"] == label_reply(row["reply"], fact).label


def test_summary_retention_checks_each_summarised_fact_against_the_summary_text():
    conv = scripted()
    summary = "The user mentioned code x3q and talked about streaming."
    rows = summary_retention(summary, 7, conv.facts)
    assert [r["fact"] for r in rows] == ["code3", "code6"], "only facts of turns 1..7"
    assert [r["in summary"] for r in rows] == [True, False]
    assert {r["probe"] for r in rows} == {""}, "no probe rows given"
    probed = [
        {"strategy": "s", "fact": "code3", "correct": True, "in_context": True},
        {"strategy": "s", "fact": "code6", "correct": True, "in_context": False},
    ]
    rows = summary_retention(summary, 7, conv.facts, probed, "s")
    assert [r["probe"] for r in rows] == ["✓", "(✓)"]


def _table(**recalled):
    import pandas as pd

    rows = []
    for name, (sent_hits, lucky, tokens) in recalled.items():
        rows.append(
            {
                "strategy": name.replace("_", " "),
                "recall": (sent_hits + lucky) / 10,
                "correct": sent_hits + lucky,
                "recalled_sent": sent_hits,
                "lucky": lucky,
                "facts": 10,
                "in_context": 10,
                "prompt_tokens_per_turn": tokens / 10,
                "total_tokens": tokens,
                "time_s": 1.0,
            }
        )
    return pd.DataFrame(rows).set_index("strategy")


def test_the_conclusion_names_the_cheapest_strategy_that_kept_most_of_the_recall():
    table = _table(
        no_history=(0, 2, 100),
        full_history=(8, 0, 10_000),
        window_big=(7, 0, 6_000),
        window_small=(6, 0, 3_000),
        window_tiny=(2, 3, 1_000),
    )
    assert cheapest_keeping(table).name == "window small", "6 ≥ 0.75 × 8; lucky hits don't count"
    text = retention_conclusion(table, chance=0.2)
    assert "window small" in text and "8/10" in text and "2 of them by luck" in text
    assert "above chance" in text
    assert len(strategy_lines(table)) == 5


def test_the_conclusion_says_so_when_no_cheaper_strategy_kept_the_recall():
    table = _table(no_history=(0, 1, 100), full_history=(8, 0, 10_000), window=(2, 4, 3_000))
    assert cheapest_keeping(table) is None
    assert "No cheaper strategy" in retention_conclusion(table)


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
