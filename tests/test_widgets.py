"""labkit.widgets: the chat widget drives a ConversationManager (sim and llama engines)."""

from __future__ import annotations

import pytest

from labkit import providers
from labkit.history import ConversationManager, FullHistory, SlidingWindow
from labkit.widgets import ChatWidget


def test_widget_builds_without_starting_anything(offline_clients):
    started = dict(providers._servers)
    widget = ChatWidget(
        ConversationManager(offline_clients, system_prompt="Be brief."), budget=8192
    )
    assert providers._servers == started, "building a widget starts no local API"
    assert widget.meter.max == 8192 and widget.meter.value > 0, "the system prompt counts"
    assert isinstance(widget.manager.strategy, FullHistory)
    assert widget.picker.value == "Full history"


def test_widget_meter_follows_typing_and_the_strategy_picker(offline_clients):
    conv = ConversationManager(offline_clients)
    widget = ChatWidget(conv, budget=1000)
    before = widget.meter.value
    widget.text.value = "word " * 200
    assert widget.meter.value > before
    label = next(k for k, v in widget.strategies.items() if isinstance(v, SlidingWindow))
    widget.picker.value = label
    assert conv.strategy is widget.strategies[label]


def test_widget_send_streams_the_reply_and_updates_the_meter(sim_clients):
    conv = ConversationManager(sim_clients, system_prompt="Be brief.", max_tokens=30)
    widget = ChatWidget(conv, budget=8192)
    widget.text.value = "My name is Ajay."
    widget.send_button.click()
    assert conv.turn_count == 1
    shown = widget.transcript_text
    assert shown[0] == ("user", "My name is Ajay.")
    assert shown[1] == ("assistant", conv.history[-1].content)
    assert widget.text.value == "", "the box is cleared"
    assert widget.meter.value == conv.history[-1].input_tokens > 0
    assert "input tokens" in widget.status.value


def test_widget_as_text_shows_what_the_widget_shows(sim_clients):
    widget = ChatWidget(ConversationManager(sim_clients, max_tokens=20), budget=8192)
    widget.send("My name is Ajay.")
    text = widget.as_text()
    lines = text.splitlines()
    assert lines[0] == "user: My name is Ajay."
    assert lines[1].startswith("assistant: ") and widget.manager.history[-1].content in text
    assert f"Strategy: {widget.picker.value}" in lines
    tokens = f"{widget.meter.value:,} / 8,192 tokens"
    assert any(line.startswith("Context [#") and tokens in line for line in lines)
    assert "<" not in text.replace("<br>", ""), "no markup left"
    assert "input tokens" in lines[-1]


def test_widget_shows_an_upstream_error_and_keeps_no_turn(sim_clients):
    sim_clients.anthropic = sim_clients.anthropic.with_options(
        default_headers={"x-labkit-sim": "fail_after=1;fail_with=api_error"}
    )
    widget = ChatWidget(ConversationManager(sim_clients, max_tokens=30))
    assert widget.send("hello") is None
    assert widget.transcript_text[-1][0] == "error"
    assert widget.manager.history == []
    assert not widget.send_button.disabled


@pytest.mark.llama
def test_widget_meter_shows_the_whole_prompt_when_the_prefix_cache_serves_it(llama_api):
    """Seen in a browser: after three turns the meter read the uncached 25 tokens of a
    ~120-token request. It must show everything sent, and say how much was cached."""
    clients = providers.Clients("local", "smollm2-135m-instruct", llama_api.base_url, "llama", "x")
    widget = ChatWidget(ConversationManager(clients, max_tokens=12, temperature=0))
    readings = []
    for message in ("My name is Ajay.", "I live in Leeds.", "What is my name?"):
        assert widget.send(message) is not None
        readings.append(widget.meter.value)
        assert widget.meter.value == widget.manager.usage[-1].input_tokens
    assert readings == sorted(set(readings)), f"the meter rises every turn: {readings}"
    assert widget.manager.usage[-1].cached_tokens > 0
    assert "cached" in widget.meter_label.value and "cached" in widget.status.value
