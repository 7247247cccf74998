"""SQLite-only behaviour: migrations, pragmas, the index, cascades, bad files, URLs."""

from __future__ import annotations

import sqlite3

import pytest

from labkit.errors import StoreError, StoreUnavailableError
from labkit.store import DEFAULT_STORE_URL, open_store, resolve_store_url
from labkit.store.sqlite import MIGRATIONS, SQLiteStore, migrate, path_from_url


def test_migrations_are_recorded_by_name_and_run_once(tmp_path):
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        names = [name for name, _ in MIGRATIONS]
        assert store.applied_migrations() == names
        assert names == sorted(names) and all(n.startswith("m0") for n in names)
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db) == []  # nothing left to run
    assert db.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)


def test_an_old_file_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
    name, first = MIGRATIONS[0]
    first(db)
    db.execute("INSERT INTO migrations VALUES (?, 'then')", (name,))
    db.execute(
        "INSERT INTO sessions (id, created_at, updated_at) VALUES (?, ?, ?)",
        ("a" * 32, "2026-01-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00"),
    )
    db.close()
    with SQLiteStore(path) as store:
        assert store.applied_migrations() == [n for n, _ in MIGRATIONS]
        assert store.get_session("a" * 32).turn_count == 0  # old data kept
        assert store.get_summary("a" * 32) is None  # new table usable


def test_wal_and_foreign_keys_are_on(tmp_path):
    with SQLiteStore(tmp_path / "s.db") as store:
        db = store._db
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_loading_one_session_uses_the_index_not_a_scan(tmp_path):
    with SQLiteStore(tmp_path / "s.db") as store:
        for last_n in (0, 3):  # the whole history, and the last turns only
            plan = " | ".join(store.explain_load(last_n))
            assert "SEARCH messages USING INDEX messages_session_turn" in plan, plan
            assert "SCAN messages" not in plan, plan


def test_deleting_a_session_cascades_to_its_rows(tmp_path):
    with SQLiteStore(tmp_path / "s.db") as store:
        sid = store.create_session().id
        store.append_turn(sid, "u", "a")
        store.set_summary(sid, "s", 1)
        with store.turn_lock(sid):
            store.delete_session(sid)
        for table in ("messages", "summaries", "turn_locks"):
            (n,) = store._db.execute(f"SELECT count(*) FROM {table}").fetchone()
            assert n == 0, table


def test_a_turn_is_two_rows_written_in_one_transaction(tmp_path):
    with SQLiteStore(tmp_path / "s.db") as store:
        sid = store.create_session().id
        store.append_turn(sid, "u", "a", input_tokens=7, output_tokens=2)
        rows = store._db.execute(
            "SELECT turn, role, input_tokens, output_tokens, created_at FROM messages ORDER BY id"
        ).fetchall()
        assert [r[:4] for r in rows] == [(0, "user", 0, 0), (0, "assistant", 7, 2)]
        assert rows[0][4] == rows[1][4]


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreUnavailableError) as exc:
        SQLiteStore(bad)
    assert exc.value.hint


def test_an_unwritable_location_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises((StoreUnavailableError, OSError)):
        SQLiteStore(blocker / "sub" / "s.db")


def test_urls_resolve_to_paths():
    assert path_from_url("sqlite:///conversations.db") == "conversations.db"
    assert path_from_url("sqlite:////abs/x.db") == "/abs/x.db"
    for bad in ("sqlite://x.db", "sqlite:///", "postgres:///x"):
        with pytest.raises(StoreError):
            path_from_url(bad)


def test_open_store_default_env_and_unknown_scheme(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_STORE", raising=False)
    assert resolve_store_url() == DEFAULT_STORE_URL == "sqlite:///conversations.db"
    monkeypatch.setenv("LABKIT_STORE", f"sqlite:///{tmp_path}/env.db")
    with open_store() as store:
        assert isinstance(store, SQLiteStore) and store.path == f"{tmp_path}/env.db"
    assert resolve_store_url("sqlite:///given.db") == "sqlite:///given.db"
    with pytest.raises(StoreError) as exc:
        open_store("mongodb://localhost/x")
    assert "sqlite:///" in exc.value.hint


def test_memory_store_works_for_quick_experiments():
    with open_store("sqlite:///:memory:") as store:
        sid = store.create_session().id
        store.append_turn(sid, "u", "a")
        assert store.load_history(sid)[1]["content"] == "a"
