"""labkit.widgets: the chat widget drives a ConversationManager (sim engine)."""

from __future__ import annotations

from labkit.history import ConversationManager, FullHistory, SlidingWindow
from labkit.widgets import ChatWidget


def test_widget_builds_without_starting_anything():
    widget = ChatWidget(ConversationManager(None, system_prompt="Be brief."), budget=8192)
    assert widget.manager._clients is None, "no client before the first send"
    assert widget.meter.max == 8192 and widget.meter.value > 0, "the system prompt counts"
    assert isinstance(widget.manager.strategy, FullHistory)
    assert widget.picker.value == "Full history"


def test_widget_meter_follows_typing_and_the_strategy_picker():
    conv = ConversationManager(None)
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


def test_widget_shows_an_upstream_error_and_keeps_no_turn(sim_clients):
    sim_clients.anthropic = sim_clients.anthropic.with_options(
        default_headers={"x-labkit-sim": "fail_after=1;fail_with=api_error"}
    )
    widget = ChatWidget(ConversationManager(sim_clients, max_tokens=30))
    assert widget.send("hello") is None
    assert widget.transcript_text[-1][0] == "error"
    assert widget.manager.history == []
    assert not widget.send_button.disabled
