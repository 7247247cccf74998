"""`labkit chat` end to end: a real subprocess, stdin piped, the sim engine behind the
local API, sessions in a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from helpers import wait_for

from labkit.errors import SessionNotFoundError
from labkit.services import ChatProcess
from labkit.store import open_store


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABKIT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def chat(
    url: str, api, *args: str, stdin: str = "", timeout: float = 120
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "labkit.cli", "chat", "--store", url, "--provider", "local",
           "--base-url", api.base_url, "--max-tokens", "64", *args]  # fmt: skip
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=_env()
    )


def _session_id(stdout: str) -> str:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("session ") and "(" in ln)
    return line.split()[1]


def live(url: str, api, *args: str) -> ChatProcess:
    return ChatProcess("--store", url, "--provider", "local", "--base-url", api.base_url, *args,
                       env={k: "" for k in os.environ if k.startswith("LABKIT_")})  # fmt: skip


def test_new_session_prints_its_id_and_saves_every_turn(tmp_path, chat_sim):
    url = f"sqlite:///{tmp_path}/c.db"
    res = chat(url, chat_sim, "--system", "Be brief.", stdin="Hello, I am Ada.\nWhat is my name?\n")
    assert res.returncode == 0, res.stderr
    sid = _session_id(res.stdout)
    assert f"session {sid} (new)" in res.stdout
    with open_store(url) as store:
        info = store.get_session(sid)
        turns = store.load_turns(sid)
    assert info.system_prompt == "Be brief."
    assert [t.user for t in turns] == ["Hello, I am Ada.", "What is my name?"]
    assert all(t.assistant and t.assistant in res.stdout for t in turns)
    assert all(t.output_tokens > 0 and t.input_tokens > 0 for t in turns)
    assert f"labkit chat --session {sid}" in res.stdout


def test_resume_sends_the_full_stored_context(tmp_path, chat_sim):
    url = f"sqlite:///{tmp_path}/c.db"
    first = chat(url, chat_sim, stdin="My name is Ada.\nI write Python.\n")
    sid = _session_id(first.stdout)
    again = chat(url, chat_sim, "--session", sid, stdin="What is my name?\n")
    assert again.returncode == 0, again.stderr
    assert f"session {sid} (resumed, 2 turns)" in again.stdout
    with open_store(url) as store:
        turns = store.load_turns(sid)
    assert [t.user for t in turns] == ["My name is Ada.", "I write Python.", "What is my name?"]
    # the resumed request carried the two earlier turns: its prompt is the longest
    assert turns[2].input_tokens > turns[1].input_tokens > turns[0].input_tokens


def test_empty_new_session_is_not_kept_and_eof_ends_cleanly(tmp_path, chat_sim):
    url = f"sqlite:///{tmp_path}/c.db"
    res = chat(url, chat_sim, stdin="")
    assert res.returncode == 0, res.stderr
    assert "not kept" in res.stdout
    with open_store(url) as store:
        assert store.list_sessions() == []


def test_unknown_session_says_so_and_how_to_list(tmp_path, chat_sim):
    url = f"sqlite:///{tmp_path}/c.db"
    res = chat(url, chat_sim, "--session", "0" * 32, stdin="hi\n")
    assert res.returncode == 2
    assert "No session with id" in res.stderr and "labkit sessions list" in res.stderr
    assert "Traceback" not in res.stderr
    res = chat(url, chat_sim, "--session", "not-an-id", stdin="hi\n")
    assert res.returncode == 2 and "32 lowercase hex" in res.stderr


def test_ctrl_c_mid_reply_cancels_without_saving_a_partial_turn(tmp_path, chat_sim, slow_sim):
    url = f"sqlite:///{tmp_path}/c.db"
    sid = _session_id(chat(url, chat_sim, stdin="First question.\n").stdout)
    with live(url, slow_sim, "--session", sid) as proc:
        proc.wait_for(lambda o: "you> " in o)
        proc.send("Tell me a long story.")
        # wait until part of the reply has been shown, then press Ctrl+C
        partial = proc.wait_for_reply("Tell me a long story.", words=3)
        proc.interrupt()
        proc.wait_for(lambda o: "reply cancelled" in o)
        rc = proc.close()
    assert rc == 0, proc.output
    assert partial.split()[0] in proc.output
    with open_store(url) as store:
        turns = store.load_turns(sid)
        assert [t.user for t in turns] == ["First question."]
        assert store.get_session(sid).turn_count == 1
        history = store.load_history(sid)
    assert [m["role"] for m in history] == ["user", "assistant"]


def test_killed_mid_reply_leaves_no_half_turn_and_resumes(tmp_path, chat_sim, slow_sim):
    url = f"sqlite:///{tmp_path}/c.db"
    sid = _session_id(chat(url, chat_sim, stdin="Remember the word mango.\n").stdout)
    with live(url, slow_sim, "--session", sid) as proc:
        proc.wait_for(lambda o: "you> " in o)
        proc.send("Now write a long poem.")
        proc.wait_for_reply("Now write a long poem.", words=3)
        assert proc.kill() == -signal.SIGKILL
    with open_store(url) as store:
        assert store.get_session(sid).turn_count == 1
    res = chat(url, chat_sim, "--session", sid, stdin="Which word?\n")
    assert res.returncode == 0, res.stderr
    with open_store(url) as store:
        turns = store.load_turns(sid)
    assert [t.user for t in turns] == ["Remember the word mango.", "Which word?"]
    assert turns[1].input_tokens > turns[0].input_tokens


def test_summarise_folds_past_20_turns_persists_and_reloads(tmp_path, chat_sim):
    url = f"sqlite:///{tmp_path}/c.db"
    lines = "".join(f"Fact number {i}: the code word is w{i}.\n" for i in range(22))
    res = chat(url, chat_sim, "--summarise", stdin=lines, timeout=240)
    assert res.returncode == 0, res.stderr
    sid = _session_id(res.stdout)
    with open_store(url) as store:
        summary = store.get_summary(sid)
        turns = store.load_turns(sid)
    assert len(turns) == 22
    assert summary is not None and summary.covers_turns == 10 and summary.summary
    # turn 21 (index 20) is the first sent as summary + the last 10 turns: a shorter prompt
    assert turns[20].input_tokens < turns[19].input_tokens
    assert turns[20].meta.get("dropped_turns") == 10
    assert all(t.meta.get("dropped_turns", 0) == 0 for t in turns[:20])
    again = chat(url, chat_sim, "--summarise", "--session", sid, stdin="And now?\n")
    assert again.returncode == 0, again.stderr
    assert "summary of turns 1-10 loaded" in again.stdout
    with open_store(url) as store:
        last = store.load_turns(sid, last_n_turns=1)[0]
        assert store.get_summary(sid).covers_turns == 10  # not recomputed on resume
    assert last.meta.get("dropped_turns") == 10
    assert last.input_tokens < turns[19].input_tokens


@pytest.mark.redis
def test_redis_store_saves_resumes_and_expires_after_ttl(redis_store_url, chat_sim):
    url = redis_store_url
    first = chat(url, chat_sim, "--ttl", "60", stdin="My name is Ada.\n")
    assert first.returncode == 0, first.stderr
    sid = _session_id(first.stdout)
    again = chat(url, chat_sim, "--session", sid, "--ttl", "60", stdin="What is my name?\n")
    assert again.returncode == 0, again.stderr
    assert f"session {sid} (resumed, 1 turns)" in again.stdout
    with open_store(url, ttl=60) as store:
        assert [t.user for t in store.load_turns(sid)] == ["My name is Ada.", "What is my name?"]
        assert 50 < store.ttl_remaining(sid) <= 60
    short = chat(url, chat_sim, "--ttl", "1", stdin="Forget me soon.\n")
    gone = _session_id(short.stdout)
    with open_store(url) as store:
        assert wait_for(lambda: not store.exists(gone)), "the 1 s TTL never expired"
        with pytest.raises(SessionNotFoundError):
            store.get_session(gone)
    res = chat(url, chat_sim, "--session", gone, stdin="hello?\n")
    assert res.returncode != 0 and "labkit sessions list" in (res.stdout + res.stderr)


@pytest.mark.redis
@pytest.mark.postgres
def test_redis_with_a_postgres_archive_resumes_after_the_redis_key_expires(
    redis_store_url, postgres_store_url, chat_sim
):
    from labkit.store.redis import RedisStore

    url, archive = redis_store_url, postgres_store_url
    first = chat(url, chat_sim, "--archive", archive, "--ttl", "1", stdin="My name is Ada.\n")
    assert first.returncode == 0, first.stderr
    sid = _session_id(first.stdout)
    assert f"+ archive {archive}" in first.stdout
    cache = RedisStore(url)
    assert wait_for(lambda: not cache.exists(sid)), "the Redis copy never expired"
    again = chat(url, chat_sim, "--archive", archive, "--session", sid, stdin="What is my name?\n")
    assert again.returncode == 0, again.stderr
    assert f"session {sid} (resumed, 1 turns)" in again.stdout  # ...the archive still had it
    with open_store(archive) as truth:
        turns = truth.load_turns(sid)
    assert [t.user for t in turns] == ["My name is Ada.", "What is my name?"]
    assert turns[1].input_tokens > turns[0].input_tokens  # the first turn was sent again
    assert cache.get_session(sid).turn_count == 2  # rehydrated, then the new turn mirrored
    listed = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "sessions", "list", "--store", url,
         "--archive", archive, "--json"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r["turn_count"] for r in json.loads(listed.stdout)}
    assert rows == {sid: 2}
    cache.close()
