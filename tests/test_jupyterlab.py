"""A learner's first minutes: JupyterLab from the venv, notebook 02 in Debian's Chromium.

The notebook opens on the "Python (labkit)" kernel without being marked modified; the setup
cell and the chat-widget cell run; a message typed into the widget streams a reply, and the
context meter rises above the previous turn's value (it counts the whole prompt sent, cached
tokens included). JupyterLab works on a copy of the notebook, so nothing committed changes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.llama, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "02_conversation_context.ipynb"
METER = re.compile(r"([\d,]+) / [\d,]+ tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on a copy of the labs (pyproject.toml marks the copy's root)."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, tmp_path / "notebooks" / NOTEBOOK)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "data").symlink_to(ROOT / "data")
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # Every cell in the DOM (no windowing), so the test can reach the widget cell.
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    token, port = secrets.token_hex(16), _free_port()
    env = {
        **os.environ,
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "LABKIT_RESULTS_DIR": str(tmp_path / "results"),
        "LABKIT_QUICK": "1",
        "LABKIT_PROVIDER": "local",
    }
    jupyter = Path(sys.executable).with_name("jupyter")
    proc = subprocess.Popen(
        [
            str(jupyter),
            "lab",
            "--no-browser",
            f"--port={port}",
            "--ip=127.0.0.1",
            f"--IdentityProvider.token={token}",
            f"--notebook-dir={tmp_path / 'notebooks'}",
            "--ServerApp.port_retries=0",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"jupyter lab exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if (
                httpx.get(f"{base}/api/status", params={"token": token}, timeout=2).status_code
                == 200
            ):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("jupyter lab did not answer within 60 s")
    yield f"{base}/lab/tree/{NOTEBOOK}?token={token}"
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _run_cell(page, index: int, timeout_ms: int = 180_000) -> None:
    """Select cell ``index``, run it with Shift+Enter, wait until its prompt shows a count."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    cell.scroll_into_view_if_needed()
    cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")
    prompt = cell.locator(".jp-InputArea-prompt")
    page.wait_for_function(
        "el => /\\[\\d+\\]/.test(el.textContent)", arg=prompt.element_handle(), timeout=timeout_ms
    )


def _code_cell_index(page, needle: str) -> int:
    cells = page.locator(".jp-Notebook .jp-Cell")
    for i in range(cells.count()):
        if needle in cells.nth(i).locator(".jp-InputArea-editor").inner_text():
            return i
    raise AssertionError(f"no cell contains {needle!r}")


def _meter(widget) -> int:
    label = widget.locator(".widget-html-content", has_text=METER).first.inner_text()
    return int(METER.search(label).group(1).replace(",", ""))


def test_a_learner_opens_notebook_02_runs_the_chat_widget_and_sees_the_meter_rise(jupyterlab, page):
    page.set_default_timeout(60_000)
    page.goto(jupyterlab)
    tab = page.locator(".lm-TabBar-tab", has_text=NOTEBOOK)
    tab.wait_for()
    page.locator(".jp-Notebook .jp-Cell").first.wait_for()
    # The committed kernelspec resolves to the venv's kernel: no chooser, no "modified" mark.
    page.locator(".jp-Toolbar-kernelName", has_text="Python (labkit)").wait_for()
    # Wait until the kernel has started and answered (JupyterLab then writes what the kernel
    # reports into the notebook's metadata, marking it modified if it differs).
    page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(state="attached")
    time.sleep(2)
    assert "jp-mod-dirty" not in (tab.get_attribute("class") or ""), "opened as modified"

    _run_cell(page, _code_cell_index(page, "clients = providers.client()"))
    widget_cell = _code_cell_index(page, "ChatWidget(ConversationManager(")
    _run_cell(page, widget_cell)
    widget = page.locator(".jp-Notebook .jp-Cell").nth(widget_cell).locator(".widget-vbox").first
    widget.locator("button", has_text="Send").wait_for()
    widget.locator(".labkit-assistant").first.wait_for()  # the cell's own first turn
    before = _meter(widget)
    assert before > 0

    widget.locator("input[type=text]").fill("What city do I live in?")
    widget.locator("button", has_text="Send").click()
    # The reply streams in: a second assistant bubble appears, then the status line.
    widget.locator(".labkit-assistant").nth(1).wait_for()
    widget.locator(".widget-html-content", has_text="turn 2:").wait_for(timeout=120_000)
    reply = widget.locator(".labkit-assistant").nth(1).inner_text()
    assert reply.startswith("assistant:") and len(reply) > len("assistant: …")
    after = _meter(widget)
    assert after > before, f"meter {before} → {after}: it must count the whole prompt sent"
