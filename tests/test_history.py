"""labkit.history: context strategies (pure) and the course's sliding_window compared."""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest

from labkit.errors import (
    ConfigurationError,
    ContextBudgetError,
    InvalidMessageError,
    UpstreamError,
)
from labkit.history import (
    SUMMARY_ACK,
    SUMMARY_MARKER,
    ConversationManager,
    FullHistory,
    KeepLastTurns,
    NoHistory,
    SlidingWindow,
    Summarise,
    course_sliding_window,
    model_summariser,
)
from labkit.providers import Clients
from labkit.tokens import REPLY_PRIMING, TokenCounter, count_messages, exact_count


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


def conversation(turns: int, words: int = 20) -> list[dict]:
    msgs: list[dict] = []
    for i in range(1, turns + 1):
        msgs += [u(f"u{i} " + "word " * words), a(f"a{i} " + "reply " * words)]
    return msgs


def labels(messages: list[dict]) -> list[str]:
    return [m["content"].split()[0] for m in messages]


def assert_well_formed(sel_messages: list[dict]) -> None:
    assert sel_messages[0]["role"] == "user", "never starts on an assistant message"
    roles = [m["role"] for m in sel_messages]
    assert all(x != y for x, y in pairwise(roles)), "roles alternate"


# ── the course's sliding_window vs labkit's ───────────────────────────────────


def test_course_sliding_window_returns_pairs_newest_first():
    msgs = [*conversation(3, words=1), u("u4 question")]
    assert labels(course_sliding_window(msgs)) == ["u3", "a3", "u2", "a2", "u1", "a1", "u4"]


def test_labkit_sliding_window_keeps_chronological_order():
    msgs = [*conversation(3, words=1), u("u4 question")]
    sel = SlidingWindow(max_tokens=100_000).select(msgs)
    assert labels(sel.messages) == ["u1", "a1", "u2", "a2", "u3", "a3", "u4"]
    assert sel.messages == msgs
    assert not sel.applied and sel.dropped_turns == 0


# ── sliding window ────────────────────────────────────────────────────────────


def test_sliding_window_drops_oldest_pairs_to_fit_the_budget():
    msgs = [*conversation(10), u("u11 final question")]
    full = count_messages(msgs, system="sys")
    budget = full // 2
    sel = SlidingWindow(max_tokens=budget).select(msgs, system="sys")
    assert sel.applied and sel.dropped_turns > 0
    assert sel.tokens <= budget
    assert sel.tokens == count_messages(sel.messages, system="sys"), "estimate is exact sum"
    assert sel.messages == msgs[-len(sel.messages) :], "a contiguous, chronological suffix"
    assert sel.messages[-1] == msgs[-1], "the newest user message is kept"
    assert_well_formed(sel.messages)
    # It keeps as many turns as fit: one more turn would go over.
    one_more = msgs[-len(sel.messages) - 2 :]
    assert count_messages(one_more, system="sys") > budget


def test_sliding_window_budget_counts_the_system_prompt():
    msgs = [*conversation(10), u("u11 q")]
    budget = count_messages(msgs) + 5
    assert not SlidingWindow(budget).select(msgs).applied
    assert SlidingWindow(budget).select(msgs, system="word " * 50).applied


def test_sliding_window_keeps_min_turns_even_over_budget():
    msgs = [*conversation(5, words=100), u("u6 q")]
    tail = count_messages([msgs[-1]])
    sel = SlidingWindow(max_tokens=tail + 10, min_turns=2).select(msgs)
    assert labels(sel.messages) == ["u4", "a4", "u5", "a5", "u6"]
    assert sel.tokens > tail + 10
    sel0 = SlidingWindow(max_tokens=tail + 10, min_turns=0).select(msgs)
    assert labels(sel0.messages) == ["u6"]


def test_sliding_window_newest_message_over_budget_is_an_error_not_a_drop():
    msgs = [*conversation(2), u("huge " * 5_000)]
    with pytest.raises(ContextBudgetError) as info:
        SlidingWindow(max_tokens=1_000).select(msgs)
    assert "budget" in str(info.value) and info.value.hint


def test_sliding_window_single_huge_message_in_history_is_dropped_whole():
    msgs = [u("u1 " + "huge " * 5_000), a("a1 ok"), u("u2 small"), a("a2 ok"), u("u3 q")]
    sel = SlidingWindow(max_tokens=500, min_turns=0).select(msgs)
    assert labels(sel.messages) == ["u2", "a2", "u3"]


def test_sliding_window_empty_history_selects_nothing():
    sel = SlidingWindow(max_tokens=100).select([], system="sys")
    assert sel.messages == [] and not sel.applied
    assert sel.tokens == TokenCounter().system("sys") + REPLY_PRIMING


def test_sliding_window_only_assistant_messages_is_an_error():
    with pytest.raises(InvalidMessageError):
        SlidingWindow(max_tokens=100).select([a("hello")])


def test_sliding_window_odd_counts_never_start_on_an_assistant():
    # A leading orphan assistant message, and a history ending on the assistant (prefill).
    msgs = [a("a0 orphan"), *conversation(4), u("u5 q"), a("a5 prefill")]
    sel = SlidingWindow(max_tokens=100_000).select(msgs)
    assert labels(sel.messages)[0] == "u1"
    assert labels(sel.messages)[-2:] == ["u5", "a5"], "the newest user message and its prefill"
    assert sel.dropped_messages == 1
    tight = SlidingWindow(max_tokens=count_messages(msgs[-4:]), min_turns=0).select(msgs)
    assert labels(tight.messages) == ["u4", "a4", "u5", "a5"]


def test_sliding_window_two_users_in_a_row_stay_together_with_their_reply():
    msgs = [u("u1 a"), a("a1 b"), u("u2 first try"), u("u2b second try"), a("a2 c"), u("u3 q")]
    sel = SlidingWindow(max_tokens=count_messages(msgs[2:]), min_turns=0).select(msgs)
    assert labels(sel.messages) == ["u2", "u2b", "a2", "u3"]


def test_sliding_window_incremental_index_matches_a_fresh_one():
    strat = SlidingWindow(max_tokens=600)
    msgs: list[dict] = []
    for i in range(1, 40):
        msgs.append(u(f"u{i} " + "w " * (i * 7 % 50)))
        got = strat.select(list(msgs))
        fresh = SlidingWindow(max_tokens=600).select(list(msgs))
        assert got == fresh
        msgs.append(a(f"a{i} " + "r " * (i * 13 % 60)))


def test_sliding_window_survives_a_failed_turn_and_a_different_conversation():
    strat = SlidingWindow(max_tokens=300)
    base = conversation(5)
    strat.select([*base, u("u6 first attempt")])
    sel = strat.select([*base, u("u6 second attempt, different")])
    assert sel == SlidingWindow(max_tokens=300).select([*base, u("u6 second attempt, different")])
    other = [*conversation(3, words=5), u("u4 q")]
    assert strat.select(other) == SlidingWindow(max_tokens=300).select(other)


def test_sliding_window_counts_each_message_once_as_the_conversation_grows():
    counter = TokenCounter()
    strat = SlidingWindow(max_tokens=2_000, counter=counter)
    msgs: list[dict] = []
    for i in range(30):
        msgs.append(u(f"question {i} " * 10))
        strat.select(msgs)
        msgs.append(a(f"answer {i} " * 10))
    assert counter.encoded == len(msgs) - 1, "each content encoded once (last reply never sent)"


# ── other strategies ──────────────────────────────────────────────────────────


def test_full_history_sends_everything_with_the_estimate():
    msgs = [*conversation(5), u("u6 q")]
    sel = FullHistory().select(msgs, system="sys")
    assert sel.messages == msgs and not sel.applied and sel.dropped_turns == 0
    assert sel.tokens == count_messages(msgs, system="sys")


def test_no_history_sends_only_the_newest_user_message():
    msgs = [*conversation(5), u("u6 q")]
    sel = NoHistory().select(msgs)
    assert sel.messages == [msgs[-1]] and sel.dropped_turns == 5


def test_keep_last_turns_sends_everything_under_the_budget():
    msgs = [*conversation(20), u("u21 q")]
    sel = KeepLastTurns(budget_tokens=100_000, keep_turns=10).select(msgs)
    assert sel.messages == msgs and not sel.applied


def test_keep_last_turns_over_the_budget_keeps_the_last_n_turns():
    msgs = [*conversation(20), u("u21 q")]
    sel = KeepLastTurns(budget_tokens=500, keep_turns=10).select(msgs)
    assert labels(sel.messages)[0] == "u11" and len(sel.messages) == 21
    assert sel.dropped_turns == 10
    assert_well_formed(sel.messages)


def test_keep_last_turns_newest_message_over_budget_is_an_error():
    with pytest.raises(ContextBudgetError):
        KeepLastTurns(budget_tokens=100).select([u("huge " * 500)])


# ── summarisation ─────────────────────────────────────────────────────────────


class RecordingSummariser:
    """A deterministic summariser that records what it was asked to fold."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str]]] = []

    def __call__(self, previous: str, messages: list[dict]) -> str:
        self.calls.append((previous, labels(messages)))
        return (previous + " " + ",".join(labels(messages))).strip()


def test_summarise_leaves_short_conversations_alone():
    summ = RecordingSummariser()
    msgs = [*conversation(4), u("u5 q")]
    sel = Summarise(summ, keep_recent=6).select(msgs)
    assert sel.messages == msgs and not sel.applied and summ.calls == []


def test_summarise_folds_old_turns_into_a_marked_summary_with_alternating_roles():
    summ = RecordingSummariser()
    strat = Summarise(summ, keep_recent=3)
    msgs = [*conversation(8), u("u9 q")]
    sel = strat.select(msgs)
    assert sel.applied and sel.dropped_turns == 5
    assert sel.messages[0]["content"].startswith(SUMMARY_MARKER)
    assert sel.messages[1] == {"role": "assistant", "content": SUMMARY_ACK}
    assert labels(sel.messages[2:]) == ["u6", "a6", "u7", "a7", "u8", "a8", "u9"]
    assert_well_formed(sel.messages)
    folded = [x for _, chunk in summ.calls for x in chunk]
    assert folded == ["u1", "a1", "u2", "a2", "u3", "a3", "u4", "a4", "u5", "a5"]
    assert sel.tokens == count_messages(sel.messages)


def test_summarise_resummarises_only_when_needed():
    summ = RecordingSummariser()
    strat = Summarise(summ, keep_recent=2, every=3)
    msgs = conversation(6)
    strat.select([*msgs, u("u7 q")])
    n = len(summ.calls)
    assert strat.covers_turns == 4
    # Same conversation again: no new call.
    strat.select([*msgs, u("u7 q")])
    assert len(summ.calls) == n
    # Two more turns age out: still under `every`, no call.
    msgs += [u("u7 q"), a("a7"), u("u8 q"), a("a8")]
    sel = strat.select([*msgs, u("u9 q")])
    assert len(summ.calls) == n and labels(sel.messages[2:])[0] == "u5"
    # A third one does: one call folding only the new turns, on top of the old summary.
    msgs += [u("u9 q"), a("a9")]
    strat.select([*msgs, u("u10 q")])
    assert len(summ.calls) == n + 1
    assert summ.calls[-1] == ("u1,a1,u2,a2,u3,a3,u4,a4", ["u5", "a5", "u6", "a6", "u7", "a7"])


def test_summarise_folds_in_chunks_that_fit_a_small_window():
    summ = RecordingSummariser()
    strat = Summarise(summ, keep_recent=2, chunk_tokens=200)
    msgs = [*conversation(12, words=40), u("u13 q")]
    strat.select(msgs)
    assert len(summ.calls) > 1
    assert [x for _, c in summ.calls for x in c][-1] == "a10"
    for previous, _ in summ.calls[1:]:
        assert previous, "each chunk builds on the running summary"


def test_summarise_trigger_tokens_waits_until_the_conversation_is_long():
    summ = RecordingSummariser()
    msgs = [*conversation(8), u("u9 q")]
    big = count_messages(msgs) + 1
    assert not Summarise(summ, keep_recent=2, trigger_tokens=big).select(msgs).applied
    assert Summarise(summ, keep_recent=2, trigger_tokens=big // 2).select(msgs).applied


def test_summarise_restarts_for_a_different_conversation_and_restores_state():
    summ = RecordingSummariser()
    strat = Summarise(summ, keep_recent=1)
    strat.select([*conversation(4), u("u5 q")])
    other = [u("x1 other"), a("y1"), u("x2"), a("y2"), u("x3 q")]
    sel = strat.select(other)
    assert summ.calls[-1] == ("", ["x1", "y1"])
    assert "u1" not in sel.messages[0]["content"]
    fresh = Summarise(summ, keep_recent=1)
    fresh.restore("stored summary", covers_turns=3)
    sel = fresh.select([*conversation(4), u("u5 q")])
    assert "stored summary" in sel.messages[0]["content"]
    assert labels(sel.messages[2:]) == ["u4", "a4", "u5"]


# ── ConversationManager against the local API (sim engine) ────────────────────


def with_sim_header(clients, header: str):
    """Make every Anthropic/OpenAI request of ``clients`` carry ``x-labkit-sim``."""
    clients.anthropic = clients.anthropic.with_options(default_headers={"x-labkit-sim": header})
    clients.async_anthropic = clients.async_anthropic.with_options(
        default_headers={"x-labkit-sim": header}
    )
    return clients


def test_manager_chat_keeps_both_turns_with_api_usage(sim_clients):
    conv = ConversationManager(sim_clients, system_prompt="Be brief.", max_tokens=50)
    reply = conv.chat("My name is Ajay.")
    assert reply and conv.turn_count == 1
    assert [t.role for t in conv.history] == ["user", "assistant"]
    assert conv.history[1].content == reply
    usage = conv.usage[0]
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.strategy == "full history" and usage.estimated_tokens > 0
    conv.chat("What is my name?")
    assert conv.turn_count == 2
    assert conv.usage[1].input_tokens > usage.input_tokens, "the second request carries the first"


def test_manager_chat_stream_commits_the_sdk_final_message(sim_clients):
    conv = ConversationManager(sim_clients, max_tokens=50)
    chunks = list(conv.chat_stream("Tell me something."))
    assert len(chunks) > 1, "text arrives in pieces"
    assert conv.history[-1].content == "".join(chunks)
    assert conv.history[-1].tokens and conv.history[-1].meta["stop_reason"]


async def test_manager_async_twins(sim_clients):
    conv = ConversationManager(sim_clients, max_tokens=30)
    reply = await conv.achat("hello")
    chunks = [c async for c in conv.achat_stream("and again")]
    assert conv.turn_count == 2
    assert conv.history[1].content == reply
    assert conv.history[3].content == "".join(chunks)


def test_failed_stream_leaves_no_dangling_user_message(sim_clients):
    conv = ConversationManager(sim_clients, max_tokens=50)
    conv.chat("first")
    with_sim_header(sim_clients, "fail_after=2;fail_with=api_error")
    seen = []
    with pytest.raises(UpstreamError):
        for chunk in conv.chat_stream("second"):
            seen.append(chunk)
    assert len(seen) == 2, "the text before the error was streamed"
    assert conv.turn_count == 1 and len(conv.history) == 2
    with_sim_header(sim_clients, "reply_tokens=5")
    conv.chat("second, retried")
    assert [t.role for t in conv.history] == ["user", "assistant"] * 2


def test_error_before_any_byte_is_an_upstream_error_with_the_status(sim_clients):
    conv = ConversationManager(with_sim_header(sim_clients, "fail_before=overloaded_error"))
    with pytest.raises(UpstreamError) as info:
        conv.chat("hello")
    assert info.value.status_code == 529
    assert info.value.hint and conv.history == []


def test_dropped_connection_mid_stream_is_an_upstream_error(sim_clients):
    conv = ConversationManager(with_sim_header(sim_clients, "fail_after=2;fail_with=disconnect"))
    with pytest.raises(UpstreamError):
        list(conv.chat_stream("hello"))
    assert conv.history == []


def test_stopping_a_stream_early_does_not_commit_the_turn(sim_clients):
    conv = ConversationManager(sim_clients, max_tokens=50)
    stream = conv.chat_stream("hello")
    next(stream)
    stream.close()
    assert conv.history == []


def test_manager_strategy_shrinks_what_is_sent(sim_clients):
    conv = ConversationManager(sim_clients, max_tokens=20)
    for i in range(6):
        conv.chat(f"message {i} " + "padding " * 60)
    full_input = conv.usage[-1].input_tokens
    conv.strategy = SlidingWindow(max_tokens=300)
    conv.chat("short question")
    assert conv.last_selection.dropped_turns > 0
    assert conv.usage[-1].input_tokens < full_input
    assert conv.usage[-1].dropped_turns == conv.last_selection.dropped_turns


def test_manager_rejects_empty_messages_and_clears(sim_clients):
    conv = ConversationManager(sim_clients, max_tokens=20)
    with pytest.raises(InvalidMessageError):
        conv.chat("   ")
    conv.chat("hi")
    conv.clear()
    assert conv.turn_count == 0 and conv.history == [] and conv.messages() == []


def test_manager_budget_error_never_calls_the_api(sim_clients):
    conv = ConversationManager(sim_clients, strategy=SlidingWindow(max_tokens=50))
    with pytest.raises(ContextBudgetError):
        conv.chat("word " * 200)
    assert conv.history == []


def test_manager_speaks_openai_too(sim_api):
    clients = Clients("openai", "smollm2-135m-instruct", sim_api.openai_base_url, None, "x")
    conv = ConversationManager(clients, system_prompt="Be brief.", max_tokens=20)
    chunks = list(conv.chat_stream("hello"))
    assert conv.history[-1].content == "".join(chunks)
    assert conv.usage[0].input_tokens > 0
    assert conv.chat("again") and conv.turn_count == 2


def test_summarise_with_a_model_summariser_records_its_usage(sim_clients):
    used: list[tuple[int, int]] = []
    strat = Summarise(model_summariser(sim_clients, max_tokens=30, usage=used), keep_recent=1)
    sel = strat.select([*conversation(3), u("u4 q")])
    assert sel.applied and sel.messages[0]["content"].startswith(SUMMARY_MARKER)
    assert len(used) == strat.calls >= 1 and used[0][0] > 0


def test_load_history_accepts_complete_turns_only(offline_clients):
    conv = ConversationManager(offline_clients)
    conv.load_history(conversation(3))
    assert conv.turn_count == 3 and conv.messages() == conversation(3)
    with pytest.raises(InvalidMessageError):
        conv.load_history([*conversation(2), u("unanswered")])
    with pytest.raises(InvalidMessageError):
        conv.load_history([a("starts on the assistant"), u("x")])
    assert conv.turn_count == 3, "a refused history changes nothing"


# ── clients are passed in, never built ───────────────────────────────────────


def test_a_manager_or_summariser_without_clients_is_a_configuration_error():
    with pytest.raises(ConfigurationError) as info:
        ConversationManager(None)
    assert "providers.client()" in info.value.hint
    with pytest.raises(ConfigurationError):
        model_summariser(None)


def test_history_imports_neither_providers_nor_the_local_api():
    import subprocess
    import sys

    code = (
        "import sys, labkit.history; "
        "print(sorted(m for m in sys.modules if m.startswith(('labkit.providers', 'labkit.localapi'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_manager_takes_a_bare_sdk_client_with_a_model(sim_api):
    import anthropic

    client = anthropic.Anthropic(base_url=sim_api.base_url, api_key="x")
    with pytest.raises(ConfigurationError, match="model"):
        ConversationManager(client)
    conv = ConversationManager(client, model="smollm2-135m-instruct", max_tokens=10)
    assert conv.chat("hello") and conv.turn_count == 1
    with pytest.raises(ConfigurationError, match="async"):
        asyncio.run(conv.achat("hello"))  # a sync client cannot serve the async twin


# ── input tokens are the whole prompt, on the real model's prefix cache ──────


@pytest.mark.llama
def test_input_tokens_count_the_whole_prompt_when_the_prefix_cache_serves_it(llama_api):
    """Issue: with a warm prefix cache the local API reports most of the prompt as
    ``cache_read_input_tokens``; the manager must still count every token sent."""
    clients = Clients("local", "smollm2-135m-instruct", llama_api.base_url, "llama", "x")
    conv = ConversationManager(clients, system_prompt="Be brief.", max_tokens=12, temperature=0)
    for question in ("My name is Ajay.", "I live in Leeds.", "What is my name?"):
        sent = [*conv.messages(), {"role": "user", "content": question}]
        conv.chat(question)
        used = conv.usage[-1]
        assert used.input_tokens == exact_count(clients, sent, conv.system_prompt), (
            "input tokens are the model's own count of everything sent"
        )
        estimate = count_messages(sent, conv.system_prompt)
        assert used.input_tokens >= estimate == used.estimated_tokens, "never below the estimate"
    inputs = [row.input_tokens for row in conv.usage]
    assert inputs == sorted(set(inputs)), f"each turn sends more than the last: {inputs}"
    cached = [row.cached_tokens for row in conv.usage]
    assert all(c > 0 for c in cached[1:]), f"the prefix cache served later turns: {cached}"
    assert all(c < i for c, i in zip(cached, inputs, strict=True))
