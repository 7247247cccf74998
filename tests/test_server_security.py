"""Security of the chat API (labkit serve): bounded requests, the server key, where a
server may listen, security headers, and no secrets or stack traces in answers or logs."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from helpers import CHAT_SIM, Flood

from labkit.server import ChatServer, Settings
from labkit.server.client import ChatAPIError, ChatClient

KEY = "test-server-key-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
MiB = 1024 * 1024
#: Key-shaped values put in the server's environment (never to be seen again).
ANTHROPIC_KEY = "sk-ant-test-" + "A1b2C3d4" * 6
OPENAI_KEY = "sk-proj-test" + "Z9y8X7w6" * 6


@pytest.fixture(scope="module")
def keyed(chat_sim, tmp_path_factory):
    """One ``labkit serve`` with a key, shared by the tests that only read from it."""
    db = tmp_path_factory.mktemp("keyed") / "chat.db"
    with ChatServer(
        store_url=f"sqlite:///{db}",
        provider="local",
        base_url=chat_sim.base_url,
        max_retries=0,
        server_key=KEY,
    ) as server:
        yield server


# ── bounded requests ─────────────────────────────────────────────────────────


def test_body_bound_follows_from_the_text_limits():
    # 12 bytes per character (a surrogate pair of \uXXXX escapes) for the message and
    # the system prompt, plus 4 KiB of JSON around them.
    assert Settings().max_body_bytes == 12 * (32_000 + 16_000) + 4096 == 580_096
    assert Settings(max_message_chars=100, max_system_prompt_chars=0).max_body_bytes == 5296


def test_the_largest_valid_body_is_read_and_one_byte_more_is_not(chat_sim, make_chat):
    server = make_chat(chat_sim, max_message_chars=200, max_system_prompt_chars=100)
    bound = Settings(max_message_chars=200, max_system_prompt_chars=100).max_body_bytes
    # Every character outside the BMP, escaped: 12 bytes each, the worst case.
    body = json.dumps({"message": "😀" * 200, "system_prompt": "😀" * 100}).encode()
    assert len(body) > 12 * 300 and len(body) <= bound
    headers = {"content-type": "application/json"}
    r = httpx.post(server.url + "/chat/new", content=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    padded = body[:-1] + b" " * (bound - len(body) + 1) + b"}"  # valid JSON, one byte over
    r = httpx.post(server.url + "/chat/new", content=padded, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"] == "request_too_large"
    assert f"{bound:,}" in r.json()["message"] and "--max-message-chars" in r.json()["hint"]


def test_declared_300_MB_body_gets_413_at_once_and_the_server_does_not_grow(keyed):
    growth, (status, body, seconds, sent, headers) = Flood.peak_growth(
        keyed.proc.pid, Flood.declared, keyed.url, "/chat/stream/new", 300 * MiB, BEARER
    )
    assert status == 413 and body["error"] == "request_too_large", body
    assert "314,572,800" in body["message"] and body["hint"]
    assert headers["connection"] == "close"
    assert seconds < 5 and sent < 64 * MiB  # refused from the headers
    assert growth < 4, f"server grew {growth:.1f} MiB"


def test_endless_chunked_body_gets_413_at_the_bound(keyed):
    growth, (status, body, seconds, sent, headers) = Flood.peak_growth(
        keyed.proc.pid, Flood.chunked, keyed.url, "/chat/new", BEARER
    )
    assert status == 413 and body["error"] == "request_too_large", body
    assert f"{Settings().max_body_bytes:,}" in body["message"]
    assert headers["connection"] == "close"
    assert seconds < 5 and sent < 64 * MiB
    assert growth < 4, f"server grew {growth:.1f} MiB"


def test_body_without_the_key_gets_401_before_it_is_read(keyed):
    growth, (status, body, seconds, sent, headers) = Flood.peak_growth(
        keyed.proc.pid, Flood.declared, keyed.url, "/chat/stream/new", 300 * MiB
    )
    assert status == 401 and body["error"] == "unauthorized"
    assert headers["connection"] == "close" and seconds < 5 and sent < 64 * MiB
    assert growth < 4, f"server grew {growth:.1f} MiB"


def test_endless_header_line_gets_431(keyed):
    growth, (status, body, seconds, sent, _) = Flood.peak_growth(
        keyed.proc.pid, Flood.header, keyed.url
    )
    assert status == 431 and body["error"] == "headers_too_large", body
    assert "16,384" in body["message"] and body["hint"]
    assert seconds < 5 and sent < 16 * MiB
    assert growth < 4, f"server grew {growth:.1f} MiB"
    assert httpx.get(keyed.url + "/health").status_code == 200  # still serving


def test_system_prompt_over_its_limit_gets_413(keyed):
    with keyed.client() as c, pytest.raises(ChatAPIError) as e:
        c.chat("new", "hi", system_prompt="s" * 16_001)
    assert e.value.status == 413 and e.value.body["error"] == "system_prompt_too_long"
    assert "16,000" in e.value.body["message"]


# ── the key ──────────────────────────────────────────────────────────────────


def _protected_requests(url: str, sid: str) -> list[tuple[str, str, dict]]:
    """Every route of the schema with the ids filled in, plus the docs."""
    spec = httpx.get(url + "/openapi.json", headers=BEARER).json()
    out = [("GET", "/openapi.json", {}), ("GET", "/docs", {}), ("GET", "/redoc", {})]
    for path, ops in spec["paths"].items():
        for method in ops:
            kwargs = {"json": {"message": "hi"}} if method == "post" else {}
            for session in (sid, "new"):
                out.append((method.upper(), path.replace("{session_id}", session), kwargs))
    return out


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key-wrong-key", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"],
    ids=["none", "wrong", "not-bearer", "longer", "empty"],
)
def test_without_the_key_every_protected_route_answers_401_and_stores_nothing(keyed, authorization):
    def state(c: ChatClient, sid: str) -> tuple:
        def ageless(d: dict) -> dict:
            return {k: v for k, v in d.items() if k != "age_seconds"}

        return [ageless(s) for s in c.sessions()], c.history(sid), ageless(c.stats(sid))

    with keyed.client() as c:
        sid = c.chat("new", "a first turn")["session_id"]
        before = state(c, sid)
    requests = _protected_requests(keyed.url, sid)
    assert len(requests) >= 12
    headers = {"Authorization": authorization} if authorization else {}
    for method, path, kwargs in requests:
        r = httpx.request(method, keyed.url + path, headers=headers, **kwargs)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        body = r.json()
        assert body["error"] == "unauthorized" and "Authorization: Bearer" in body["hint"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert KEY not in r.text
    with keyed.client() as c:
        after = state(c, sid)
    assert after == before


def test_with_the_key_the_course_scenarios_pass(keyed):
    """A short multi-turn conversation, its history and stats, the listing, delete."""
    with keyed.client() as c:
        first = c.stream("new", "My name is Ada.", system_prompt="Be brief.")
        sid = first.session_id
        assert first.done["stored"] and first.headers["cache-control"] == "no-cache"
        second = c.stream(sid, "What is my name?")
        third = c.chat(sid, "Thanks.")
        assert third["turn_count"] == 3
        assert second.done["usage"]["input"] > first.done["usage"]["input"]
        hist = c.history(sid)
        assert hist["system_prompt"] == "Be brief."
        assert [m["content"] for m in hist["messages"][::2]] == [
            "My name is Ada.",
            "What is my name?",
            "Thanks.",
        ]
        assert hist["messages"][1]["content"] == first.text
        stats = c.stats(sid)
        assert stats["turn_count"] == 3 and stats["output_tokens"] > 0
        assert sid in {s["id"] for s in c.sessions()}
        assert c.delete(sid) == {"session_id": sid, "deleted": True}
        with pytest.raises(ChatAPIError) as e:
            c.history(sid)
        assert e.value.status == 404


def test_health_is_open_and_names_its_upstream_only_to_the_key(keyed):
    open_ = httpx.get(keyed.url + "/health")
    assert open_.status_code == 200 and open_.json() == {"ok": True}
    full = httpx.get(keyed.url + "/health", headers=BEARER).json()
    assert full["ok"] and full["upstream"]["provider"] == "local" and full["store"]
    page = httpx.get(keyed.url + "/")
    assert page.status_code == 200 and KEY not in page.text  # the page holds nothing


def test_key_is_compared_in_constant_time():
    import inspect

    from labkit.server import auth

    assert "hmac.compare_digest" in inspect.getsource(auth.KeyAuth)


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "LABKIT_SERVER_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "labkit.cli", "serve", "--port", "0", *args],
        env={**environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_refuses_a_non_loopback_host_without_a_key():
    r = _serve("--host", "0.0.0.0")
    assert r.returncode != 0
    assert "will not listen on 0.0.0.0 without a key" in r.stderr
    assert "LABKIT_SERVER_KEY" in r.stderr and "--api-key" in r.stderr  # how to set one
    assert "Traceback" not in r.stderr and "listening on" not in r.stdout


def test_serve_refuses_a_key_too_short_to_be_one():
    r = _serve("--host", "0.0.0.0", env={"LABKIT_SERVER_KEY": "secret"})
    assert r.returncode != 0 and "16 to 512" in r.stderr and "secrets" in r.stderr
    assert "secret" not in r.stderr.replace("secrets", "")  # the value is not echoed


def test_insecure_no_auth_serves_off_loopback_with_a_warning(chat_sim, make_chat):
    server = make_chat(chat_sim, host="0.0.0.0", loopback_hosts_only=False)
    assert "WITHOUT a key" in server.log_text()
    r = httpx.get(server.url + "/sessions", headers={"Host": "chat.example"})
    assert r.status_code == 200


def test_without_a_key_only_loopback_host_names_are_answered(chat_sim, make_chat):
    """DNS rebinding: a page whose host name now resolves to 127.0.0.1 gets nothing."""
    server = make_chat(chat_sim)
    port = server.port
    for host in (f"attacker.example:{port}", "attacker.example", f"10.0.0.5:{port}"):
        r = httpx.get(server.url + "/sessions", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"] == "host_not_allowed", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert httpx.get(server.url + "/sessions", headers={"Host": host}).status_code == 200


# ── headers ──────────────────────────────────────────────────────────────────


def test_page_csp_allows_only_its_own_script_and_style(keyed):
    r = httpx.get(keyed.url + "/")
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'"
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        (inline,) = re.findall(rf"<{tag}>(.*?)</{tag}>", r.text, flags=re.DOTALL)
        digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
        assert csp[directive] == f"'sha256-{digest}'"  # that script, nothing else
    assert "unsafe-inline" not in r.headers["content-security-policy"]
    assert "<script src" not in r.text


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("GET", "/", {}),
        ("GET", "/health", {}),
        ("GET", "/sessions", {"headers": BEARER}),
        ("GET", "/sessions", {}),
        ("POST", "/chat/stream/new", {"headers": BEARER, "json": {"message": "hi"}}),
        ("GET", "/nowhere", {"headers": BEARER}),
    ],
)
def test_every_answer_says_nosniff(keyed, method, path, kwargs):
    r = httpx.request(method, keyed.url + path, **kwargs)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


def test_sse_answers_keep_cache_control_no_cache(keyed):
    with keyed.client() as c:
        turn = c.stream("new", "hello")
    assert turn.headers["content-type"].startswith("text/event-stream")
    assert turn.headers["cache-control"] == "no-cache"
    assert turn.headers["x-content-type-options"] == "nosniff"


# ── no secrets, no stack traces ──────────────────────────────────────────────


class _QuotingUpstream(BaseHTTPRequestHandler):
    """A model API that refuses every request and quotes the key it was sent (as some
    real APIs quote part of a wrong key)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        key = self.headers.get("x-api-key") or self.headers.get("authorization", "")
        body = json.dumps(
            {
                "type": "error",
                "error": {"type": "authentication_error", "message": f"invalid x-api-key: {key}"},
            }
        ).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def quoting_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _QuotingUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_no_key_or_stack_trace_in_any_error_body_or_log_line(
    quoting_upstream, chat_sim, sim_factory, make_chat
):
    from types import SimpleNamespace

    env = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "OPENAI_API_KEY": OPENAI_KEY}
    password = "url-password-0123456789"
    secrets = (ANTHROPIC_KEY, OPENAI_KEY, KEY, ANTHROPIC_KEY[-12:], password)
    quoting = make_chat(
        SimpleNamespace(base_url=quoting_upstream), provider="anthropic", env=env, server_key=KEY
    )
    failing_sim = sim_factory(**CHAT_SIM, fail_after=2, fail_with="api_error")
    failing = make_chat(failing_sim, env=env, server_key=KEY)
    sim_url = chat_sim.base_url
    with_credentials = SimpleNamespace(base_url=sim_url.replace("//", f"//labkit:{password}@"))
    userinfo = make_chat(with_credentials, env=env, server_key=KEY)
    bodies = []
    with ChatClient(quoting.url, api_key=KEY) as c:
        turn = c.stream("new", "hello")  # the upstream refuses, quoting the key
        assert turn.error is not None and "[redacted]" in turn.error["message"]
        bodies += [json.dumps(e) for e in turn.events]
        with pytest.raises(ChatAPIError) as e:
            c.chat("new", "hello again")
        bodies.append(json.dumps(e.value.body))
        bodies.append(c.http.get("/health").text)
    with ChatClient(failing.url, api_key=KEY) as c:
        bodies += [json.dumps(e) for e in c.stream("new", "fails mid-stream").events]
        for method, path, kwargs in [
            ("GET", "/sessions/nope/history", {}),
            ("GET", "/sessions/0123456789abcdef0123456789abcdef/stats", {}),
            ("POST", "/chat/new", {"content": b'{"message": '}),
            ("POST", "/chat/new", {"json": {"message": "x" * 40_000}}),
            ("POST", "/chat/new", {"json": {"message": "hi", "extra": ANTHROPIC_KEY}}),
            ("GET", "/nowhere", {}),
        ]:
            bodies.append(c.http.request(method, path, **kwargs).text)
    bodies.append(httpx.get(failing.url + "/sessions", headers={"Authorization": "Bearer x"}).text)
    health = httpx.get(userinfo.url + "/health", headers=BEARER).json()
    assert health["upstream"]["base_url"].startswith("http://labkit:[redacted]@")
    bodies.append(json.dumps(health))
    for server in (quoting, failing, userinfo):
        server.stop()
    logs = quoting.log_text() + failing.log_text() + userinfo.log_text()
    assert "upstream failed" in logs  # the failures were logged ...
    for text in [*bodies, logs]:
        for secret in secrets:
            assert secret not in text, (secret, text[:500])  # ... without the key
        assert "Traceback" not in text and 'File "' not in text


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG], ids=["info", "debug"])
def test_an_unexpected_error_answers_a_reference_and_logs_one_redacted_line(caplog, level):
    """In process: a route that fails with the key in its exception's message; the
    traceback is logged (redacted) only at debug level."""
    from fastapi import FastAPI

    from labkit.server import errors
    from labkit.server.redact import RedactingFilter, add_secret

    add_secret(ANTHROPIC_KEY)
    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError(f"could not call the API with {ANTHROPIC_KEY}")

    handler = logging.StreamHandler()
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("labkit.server")
    logger.addHandler(handler)
    caplog.set_level(level, logger="labkit.server")
    try:
        import asyncio

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.get("/boom")

        r = asyncio.run(call())
    finally:
        logger.removeHandler(handler)
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal_error" and "RuntimeError" not in body["message"]
    ref = re.search(r"reference ([0-9a-f]{8})", body["message"]).group(1)
    (record,) = [r for r in caplog.records if ref in r.getMessage()]
    formatted = logging.Formatter().format(record)
    assert ANTHROPIC_KEY not in formatted and "[redacted]" in formatted
    assert "RuntimeError" in formatted
    assert ("Traceback" in formatted) == (level == logging.DEBUG)


def test_redaction_covers_env_secrets_key_shapes_and_url_passwords():
    from labkit.server.redact import redact, secrets_from_environment

    env = {"MY_SERVICE_TOKEN": "tok-0123456789", "HOME": "/root", "SHORT_KEY": "abc"}
    assert secrets_from_environment(env) == ["tok-0123456789"]
    assert redact(f"key {OPENAI_KEY} here") == "key [redacted] here"
    assert redact("redis://:hunter2hunter2@db:6379/0") == "redis://:[redacted]@db:6379/0"
    assert redact("postgresql://ada:pw@host/db") == "postgresql://ada:[redacted]@host/db"
    assert redact("nothing secret") == "nothing secret"
