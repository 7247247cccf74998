"""The chat page (``GET /``) in a real browser: Debian's Chromium, headless, driven by
Playwright (never ``playwright install``: no browser is downloaded)."""

from __future__ import annotations

import pytest
from helpers import CHAT_SIM

pytestmark = pytest.mark.browser


def _send(page, text: str) -> str:
    """Type a message, press Enter, wait for the streamed reply to finish; return it."""
    before = page.locator(".msg.assistant[data-done]").count()
    page.fill("#message", text)
    page.press("#message", "Enter")
    page.wait_for_function(
        "n => document.querySelectorAll('.msg.assistant[data-done]').length > n", arg=before
    )
    return page.locator(".msg.assistant").nth(before).inner_text()


def _tokens_in(page, index: int) -> int:
    meta = page.locator(".meta").nth(index).inner_text()  # "tokens in N / out M"
    return int(meta.split("tokens in ")[1].split(" ")[0])


@pytest.mark.parametrize("key", [None, "browser-test-key-0123456789"], ids=["no-key", "key"])
def test_page_streams_replies_sends_context_and_resumes_after_reload(
    page, sim_factory, make_chat, key
):
    # A slow sim (40 ms between deltas) so the page is seen mid-stream.
    slow = sim_factory(**{**CHAT_SIM, "itl_ms": 40, "reply_tokens": 25})
    server = make_chat(slow, max_message_chars=1000, server_key=key)
    pg = page
    blocked: list[str] = []  # the page's content security policy must not block the page
    pg.on("console", lambda m: "Content Security Policy" in m.text and blocked.append(m.text))
    pg.goto(server.url + "/")
    assert pg.locator("#session").inner_text() == "new"

    # 1. The first reply streams: seen partly written before it is done.
    pg.fill("#message", "Hi, my name is Priya.")
    pg.press("#message", "Enter")
    if key:  # the server answers 401: the page asks for the key, once
        pg.wait_for_selector("#key-form:not([hidden])")
        pg.fill("#key", "not-the-key-of-this-server")
        pg.press("#key", "Enter")
        pg.wait_for_selector("#key-note >> text=not accepted")
        pg.fill("#key", key)
        pg.press("#key", "Enter")
    pg.wait_for_selector(".msg.assistant[data-streaming]")
    pg.wait_for_function(
        "() => { const r = document.querySelector('.msg.assistant');"
        " return r.dataset.streaming && r.textContent.split(' ').length >= 3; }"
    )
    partial = pg.locator(".msg.assistant").first.inner_text()
    pg.wait_for_selector(".msg.assistant[data-done]")
    first = pg.locator(".msg.assistant").first.inner_text()
    assert partial and first.startswith(partial.strip()) and len(first) > len(partial)
    session_id = pg.locator("#session").inner_text()
    assert len(session_id) == 32

    # 2. The second turn is sent with the first one as context: the upstream's
    # input tokens (shown under each reply) include the whole first turn.
    second = _send(pg, "What is my name?")
    assert second
    assert _tokens_in(pg, 1) > _tokens_in(pg, 0) + 25  # first question + 25-token reply

    # 3. A reload resumes the session from the server's history (the key is kept for
    # the tab: it is not asked again).
    pg.reload()
    pg.wait_for_selector(".meta >> text=resumed session with 2 turns")
    assert pg.locator("#key-form").is_hidden()
    assert pg.locator("#session").inner_text() == session_id
    texts = pg.locator(".msg.user, .msg.assistant").all_inner_texts()
    assert texts == ["Hi, my name is Priya.", first, "What is my name?", second]

    # 4. An error is shown, not swallowed: a message over the server's limit.
    pg.fill("#message", "x" * 1001)
    pg.press("#message", "Enter")
    err = pg.wait_for_selector(".error").inner_text()
    assert err.startswith("message_too_long: ") and "1,000" in err, err
    assert pg.locator(".msg.assistant").count() == 2  # the failed reply was removed
    assert not blocked, blocked
