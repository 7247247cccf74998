"""An ipywidgets chat box driving a :class:`~labkit.history.ConversationManager`.

A text box and a send button, the reply streamed into the transcript as it
arrives, a live meter of the context tokens the next request would carry against
the budget (the model's context window by default), and a strategy picker.

Notes:

1. The meter shows labkit's tiktoken *estimate* of what the strategy selects —
   system prompt, sent messages and priming — for the text being typed, and after
   each reply the API's own count of the whole prompt just sent, cached tokens
   included (a prompt cache makes a request cheaper, not shorter); the cached part
   is shown apart. Typing does not preview a strategy that may call a model
   (:class:`Summarise`).
2. Sending runs in the kernel's widget-message handler, so the transcript updates
   chunk by chunk as the stream arrives. Errors (an upstream failure, a message
   over the budget) are shown in the transcript, and the turn is not kept, exactly
   as :class:`ConversationManager` documents.
3. The widget builds no client: it uses the clients its manager was given (the
   notebook passes them in), so building one starts nothing.
4. A saved notebook keeps no widget state, so a widget's output is blank when the
   file is read later. :meth:`ChatWidget.as_text` renders what the widget shows —
   transcript, strategy, meter and status — as plain text to print beside it.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import ipywidgets as widgets

from .errors import LabkitError
from .history import (
    ConversationManager,
    FullHistory,
    KeepLastTurns,
    SlidingWindow,
    Strategy,
    Summarise,
    model_summariser,
)

__all__ = ["DEFAULT_BUDGET", "ChatWidget", "default_strategies"]

#: The local model's context window, in tokens.
DEFAULT_BUDGET = 8192

_ROLE_STYLE = {
    "user": "background:#e8f0fe;margin:4px 0 4px 15%;",
    "assistant": "background:#f1f3f4;margin:4px 15% 4px 0;",
    "error": "background:#fdecea;color:#8a1c1c;",
}


def default_strategies(manager: ConversationManager, budget: int) -> dict[str, Strategy]:
    """The picker's choices: full, two sliding windows, the milestone rule, summarise."""
    return {
        "Full history": FullHistory(),
        f"Sliding window ({budget // 2:,} tokens)": SlidingWindow(budget // 2),
        f"Sliding window ({budget // 8:,} tokens)": SlidingWindow(budget // 8),
        f"Last 10 turns over {budget // 2:,} tokens": KeepLastTurns(budget // 2, 10),
        "Summarise (keep 6 turns)": Summarise(model_summariser(manager.clients), keep_recent=6),
    }


def _bubble(role: str, text: str) -> str:
    style = _ROLE_STYLE.get(role, "")
    body = html.escape(text).replace("\n", "<br>")
    return (
        f'<div class="labkit-{role}" style="{style}padding:6px 10px;border-radius:8px;'
        f'white-space:normal;"><b>{role}</b>: {body}</div>'
    )


def _plain(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup))


class ChatWidget:
    """A chat box for a :class:`ConversationManager`; display it with ``widget.ui``.

    ``strategies`` maps picker labels to strategy objects (default:
    :func:`default_strategies`); ``budget`` is the meter's full scale.
    """

    def __init__(
        self,
        manager: ConversationManager,
        *,
        budget: int = DEFAULT_BUDGET,
        strategies: dict[str, Strategy] | None = None,
    ) -> None:
        self.manager = manager
        self.budget = budget
        self.strategies = strategies or default_strategies(manager, budget)
        for label, strat in self.strategies.items():  # adopt the manager's own strategy
            if strat is not manager.strategy and repr(strat) == repr(manager.strategy):
                self.strategies[label] = manager.strategy
                break
        if manager.strategy not in self.strategies.values():
            self.strategies = {
                f"Current: {manager.strategy.name}": manager.strategy,
                **self.strategies,
            }

        self.text = widgets.Text(placeholder="Type a message, then press Send")
        self.send_button = widgets.Button(description="Send", button_style="primary")
        self.picker = widgets.Dropdown(
            options=list(self.strategies),
            value=next(k for k, v in self.strategies.items() if v is manager.strategy),
            description="Strategy",
        )
        self.meter = widgets.IntProgress(value=0, min=0, max=budget, description="Context")
        self.meter_label = widgets.HTML()
        self.transcript = widgets.VBox(layout=widgets.Layout(max_height="400px", overflow="auto"))
        self.status = widgets.HTML()

        self.send_button.on_click(lambda _b: self.send())
        self.text.observe(lambda _c: self._preview(), names="value")
        self.picker.observe(self._on_pick, names="value")

        self.ui = widgets.VBox(
            [
                self.transcript,
                widgets.HBox([self.text, self.send_button]),
                widgets.HBox([self.picker, self.meter, self.meter_label]),
                self.status,
            ]
        )
        self._render_meter(self._estimate(""), source="estimate")

    # -- display ----------------------------------------------------------------

    def _ipython_display_(self) -> None:  # pragma: no cover - needs a front end
        from IPython.display import display

        display(self.ui)

    def _add(self, role: str, text: str) -> widgets.HTML:
        bubble = widgets.HTML(_bubble(role, text))
        self.transcript.children = (*self.transcript.children, bubble)
        return bubble

    def _render_meter(self, tokens: int, *, source: str) -> None:
        self.meter.value = min(tokens, self.budget)
        self.meter.bar_style = "danger" if tokens > self.budget else ""
        self.meter_label.value = f"{tokens:,} / {self.budget:,} tokens ({source})"

    @property
    def transcript_text(self) -> list[tuple[str, str]]:
        """(role, text) of every bubble shown, for tests and notebooks."""
        out = []
        for child in self.transcript.children:
            value = child.value
            role = value.split('class="labkit-', 1)[1].split('"', 1)[0]
            text = html.unescape(value.split("</b>: ", 1)[1].rsplit("</div>", 1)[0])
            out.append((role, text.replace("<br>", "\n")))
        return out

    def as_text(self, width: int = 30) -> str:
        """What the widget shows, as plain text (note 4): bubbles, strategy, meter, status."""
        lines = [f"{role}: {text}" for role, text in self.transcript_text]
        filled = math.ceil(width * self.meter.value / max(self.meter.max, 1))  # 1 char if > 0
        bar = "#" * filled + "." * (width - filled)
        lines += [
            f"Strategy: {self.picker.value}",
            f"Context [{bar}] {_plain(self.meter_label.value)}",
        ]
        if self.status.value:
            lines.append(_plain(self.status.value))
        return "\n".join(lines)

    # -- behaviour --------------------------------------------------------------

    def _estimate(self, text: str) -> int:
        if self.manager.strategy.blocking:
            return self.manager.counter.messages(
                self.manager.messages(), self.manager.system_prompt
            )
        pending = [*self.manager.messages(), {"role": "user", "content": text or " "}]
        try:
            return self.manager.strategy.select(pending, self.manager.system_prompt).tokens
        except LabkitError:
            return self.manager.counter.messages(pending, self.manager.system_prompt)

    def _preview(self) -> None:
        self._render_meter(self._estimate(self.text.value), source="estimate for this message")

    def _on_pick(self, change: dict[str, Any]) -> None:
        self.manager.strategy = self.strategies[change["new"]]
        self._preview()

    def send(self, text: str | None = None) -> str | None:
        """Send ``text`` (default: the text box), stream the reply; return it (None on error)."""
        message = self.text.value if text is None else text
        if not message.strip():
            self.status.value = "<i>Type a message first.</i>"
            return None
        self.text.value = ""
        self.send_button.disabled = True
        self._add("user", message)
        bubble = self._add("assistant", "…")
        reply = ""
        try:
            for chunk in self.manager.chat_stream(message):
                reply += chunk
                bubble.value = _bubble("assistant", reply)
        except LabkitError as exc:
            bubble.value = _bubble("error", f"{exc.message} {exc.hint}".strip())
            self.status.value = "<i>The turn was not kept.</i>"
            return None
        finally:
            self.send_button.disabled = False
        usage = self.manager.usage[-1]
        sel = self.manager.last_selection
        dropped = f", {sel.dropped_turns} turn(s) left out" if sel and sel.dropped_turns else ""
        if usage.input_tokens is None:  # the server sent no usage: show the estimate
            self.status.value = f"<i>turn {usage.turn}: no usage reported by the API{dropped}</i>"
            self._render_meter(usage.estimated_tokens, source="last request, estimate")
            return reply
        cached = f", {usage.cached_tokens:,} of them cached" if usage.cached_tokens else ""
        self.status.value = (
            f"<i>turn {usage.turn}: {usage.input_tokens:,} input tokens{cached} (API), "
            f"{usage.output_tokens} output tokens{dropped}</i>"
        )
        self._render_meter(usage.input_tokens, source=f"last request, API count{cached}")
        return reply
