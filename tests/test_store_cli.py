"""`labkit sessions list|show|delete` (through Typer's runner), on a real SQLite file and a real Redis."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from labkit.chat.sessions_cli import format_age
from labkit.cli import app
from labkit.store import open_store

runner = CliRunner()


@pytest.fixture
def seeded(store_url):
    with open_store(store_url) as store:
        a = store.create_session(system_prompt="Be [bold]brief[/bold].", model="m")
        store.append_turn(a.id, "Hi, I'm Ada [x].", "Hello Ada!", input_tokens=12, output_tokens=4)
        store.set_summary(a.id, "Ada said hi.", 1)
        b = store.create_session()
    return store_url, a.id, b.id


def test_list_shows_every_session_with_counts(seeded):
    url, a, b = seeded
    res = runner.invoke(app, ["sessions", "list", "--store", url])
    assert res.exit_code == 0, res.output
    assert a in res.output and b in res.output
    rows = json.loads(runner.invoke(app, ["sessions", "list", "--store", url, "--json"]).output)
    assert {r["id"]: r["turn_count"] for r in rows} == {a: 1, b: 0}


def test_list_uses_labkit_store_env(seeded, monkeypatch):
    url, a, _ = seeded
    monkeypatch.setenv("LABKIT_STORE", url)
    assert a in runner.invoke(app, ["sessions", "list"]).output


def test_show_prints_turns_verbatim_and_json(seeded):
    url, a, _ = seeded
    res = runner.invoke(app, ["sessions", "show", a, "--store", url])
    assert res.exit_code == 0, res.output
    assert "Hi, I'm Ada [x]." in res.output and "Hello Ada!" in res.output
    assert "Ada said hi." in res.output
    doc = json.loads(runner.invoke(app, ["sessions", "show", a, "--store", url, "--json"]).output)
    assert doc["session"]["input_tokens"] == 12
    assert doc["summary"] == {"summary": "Ada said hi.", "covers_turns": 1}
    assert [t["user"] for t in doc["turns"]] == ["Hi, I'm Ada [x]."]


def test_delete_then_show_says_not_found_and_how_to_list(seeded):
    url, a, b = seeded
    res = runner.invoke(app, ["sessions", "delete", a, "--store", url])
    assert res.exit_code == 0 and "Deleted" in res.output
    res = runner.invoke(app, ["sessions", "show", a, "--store", url])
    assert res.exit_code == 2
    assert "labkit sessions list" in res.output
    res = runner.invoke(app, ["sessions", "delete", a, "--store", url])
    assert res.exit_code == 2
    rows = json.loads(runner.invoke(app, ["sessions", "list", "--store", url, "--json"]).output)
    assert [r["id"] for r in rows] == [b]


def test_malformed_id_and_bad_store_are_one_line_errors(sqlite_store_url):
    res = runner.invoke(app, ["sessions", "show", "not-an-id", "--store", sqlite_store_url])
    assert res.exit_code == 2 and "32 lowercase hex" in res.output
    res = runner.invoke(app, ["sessions", "list", "--store", "mysql://x"])
    assert res.exit_code == 2 and "sqlite:///" in res.output
    assert "Traceback" not in res.output


def test_format_age():
    assert [format_age(s) for s in (5, 65, 3700, 90000)] == ["5s", "1m 5s", "1h 1m", "1d 1h"]
