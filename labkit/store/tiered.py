"""The tiered store: Redis as the hot cache, a durable archive (SQLite or PostgreSQL) as the truth.

>>> store = open_store("redis://127.0.0.1:6379/0", archive="postgresql://app@db/labkit")

The course's rule for choosing a store ends with "Both: use Redis as cache +
SQLite/PostgreSQL for durable archive". This is that store: the same
:class:`~labkit.store.base.SessionStore` contract, a session idle past its TTL leaves
memory but is not lost.

- **Writes** go to the archive first; only once the archive has committed is the turn
  copied into Redis (one Lua script: append, totals, sliding TTL).
- **Reads** come from Redis; on a miss (expired, evicted, never loaded) the session is
  read from the archive and put back into Redis (*rehydrated*) with a fresh TTL.
- **Listing** reads the archive (Redis holds only the sessions in use). The per-session
  **turn lock** is the archive's, so it holds while Redis is down, and across machines
  when the archive is PostgreSQL.

The Redis copy of a session uses the keys and the turn format of
:mod:`labkit.store.redis` (a plain ``RedisStore`` on the same URL reads it), plus three
small keys per session for rule 6: ``…session:{id}:writing`` (writes in flight),
``…:fill`` (the rehydration lease) and ``…:ver`` (what writers have committed).

Failure rules (deliberate choices):

1. **Archive down → the turn is refused.** ``append_turn`` (and ``create_session``,
   ``set_summary``, ``delete_session``, ``turn_lock``, ``list_sessions``) raise
   :class:`~labkit.errors.StoreUnavailableError` and Redis keeps nothing of the write
   (its announcement, rule 6, is withdrawn): a turn is never acknowledged on Redis
   alone, and nothing is half stored (the archive's write is one transaction). ``labkit serve`` answers 503 or an error event; ``labkit chat``
   prints the error and keeps the turn unsaved. Reads of a session whose copy is in
   Redis still succeed (they show only acknowledged turns).
2. **Redis down → serve from the archive.** A Redis error on any call is logged once
   (``logging``, logger ``labkit.store.tiered``, WARNING), the store switches to the
   archive for reads and to archive-only writes, and :meth:`TieredStore.stats` reports
   ``redis: "down"`` with the error and counts. Every ``retry_after_s`` seconds one
   call tries Redis again; when it answers, recovery is logged (INFO) and the copies of
   the sessions written meanwhile are deleted *before* Redis is used again (they would
   be stale), so they rehydrate on their next read. Writes are acknowledged as soon as
   the archive has them: slower, never lost.
3. **A Redis write that fails after the archive committed** (the turn is stored) is
   not an error for the caller: the session's copy is marked stale and handled as in
   rule 2.
4. **Limit of rule 2:** the stale-copy list lives in the process that saw Redis fail.
   If one process cannot reach Redis while another can (a partition, not an outage),
   the other may read a copy that lacks the first one's latest turns until the first
   recovers or the copy's TTL runs out. When Redis itself was down there is no such
   copy to read (Valkey/Redis without persistence restart empty).
5. **The Redis copy is checked on every read**: a copy whose turn list and turn count
   disagree (one of its keys was evicted under ``maxmemory``) counts as a miss.
6. **Reads never go back in time, and no old copy is cached.** A write first announces
   itself in the session's ``writing`` set (with a deadline of ``WRITE_WINDOW_S``),
   then commits to the archive, then updates Redis and withdraws its announcement in
   one script. While a write is announced, reads of that session bypass Redis and go
   to the archive (the copy may lag the archive only then), so a reader that saw a
   turn never sees a copy without it afterwards. (An announcement left by a process
   killed mid-write sends that session's reads to the archive until its deadline; a
   write slower than the deadline loses this guarantee, not its turn.) Rehydration takes a lease (``SET …
   NX PX`` on ``fill``) before reading the archive and writes the copy only if the
   lease is still its own (every write deletes it) and no write is in flight. Writers
   also record in ``ver`` the turn count they committed (and a new summary's coverage,
   or a deletion), and a copy with fewer turns is never written: this covers a command
   that timed out on a frozen server and runs later, after newer ones. A copy is
   appended to only if it holds exactly the turns before the new one; one that already
   holds it is left alone, and one with a gap is deleted. A session re-created with the
   id of one deleted less than ``VERSION_TTL_S`` ago is served from the archive until then.
7. ``set_summary`` deletes the Redis copy (it rehydrates, with the summary, on the next
   read) rather than editing it: two summaries written at once could otherwise land in
   Redis in the other order than in the archive. Summaries are rare (one per many turns).
8. Timestamps in a Redis copy come from the archive when it is rehydrated; a turn
   appended to a live copy carries the appending process's clock (the archive keeps
   its own, authoritative one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis as redis_py

from ..errors import SessionNotFoundError, StoreError
from .base import (
    SessionInfo,
    SessionStore,
    Summary,
    TurnRecord,
    check_last_n,
    check_turn_args,
    turns_to_messages,
    validate_session_id,
)
from .redis import RedisStore

__all__ = ["TieredStore"]

log = logging.getLogger("labkit.store.tiered")
T = TypeVar("T")

#: Seconds between attempts to use Redis again after it failed (rule 2).
RETRY_AFTER_S = 5.0
#: Lifetime of a rehydration lease (rule 6): longer than reading one session from the archive.
FILL_LEASE_S = 10.0
#: A write's announcement lapses after this many seconds even if its process died mid-write.
WRITE_WINDOW_S = 30.0
#: How long writers' announcements (the ver key) outlive a write: far longer than a
#: command can sit in a frozen server's socket (rule 6).
VERSION_TTL_S = 300.0
#: Stale copies remembered one by one; past this many, the whole cache namespace is dropped.
MAX_STALE = 100_000

# Every script takes the session's KEYS: meta, turns, index, fill, ver, writing
# (see TieredStore._keys).

# ARGV: turn_json, n, now, in, out, ttl_ms, deadline, id, ver_ttl_ms, write token
# Rule 6: append the archived turn n (1-based) only where it belongs; withdraw the write.
_MIRROR = """
redis.call('DEL', KEYS[4])
redis.call('ZREM', KEYS[6], ARGV[10])
local n = tonumber(ARGV[2])
if n > tonumber(redis.call('HGET', KEYS[5], 'turns') or '0') then
  redis.call('HSET', KEYS[5], 'turns', n)
end
redis.call('PEXPIRE', KEYS[5], ARGV[9])
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local len = redis.call('LLEN', KEYS[2])
if len >= n then return len end
if len ~= n - 1 then
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[8])
  return -2
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'turn_count', n, 'updated_at', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[5])
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[8])
return n
"""

# ARGV: id, ver_ttl_ms, field, value, write token. Drop the copy, announce a change that
# makes any copy read before it stale (a summary's covers, or a deletion), withdraw the write.
_DROP = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[5])
redis.call('HSET', KEYS[5], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[5], ARGV[2])
return 1
"""

# ARGV: lease token ('' = none needed), ttl_ms, deadline, id, turn count, summary covers
# (-1: none), now, number of hash items F, F field/value items, then one JSON per turn.
# Rule 6: refused unless the lease is still ours, no write is in flight, and the copy is
# no older than what writers have committed.
_PUT = """
if ARGV[1] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[1] then return 0 end
local v = redis.call('HMGET', KEYS[5], 'turns', 'covers', 'deleted')
if v[3] or tonumber(v[1] or '0') > tonumber(ARGV[5])
   or tonumber(v[2] or '-1') > tonumber(ARGV[6])
   or redis.call('ZCOUNT', KEYS[6], ARGV[7], '+inf') > 0 then
  if ARGV[1] ~= '' then redis.call('DEL', KEYS[4]) end
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[4])
local f = tonumber(ARGV[8])
redis.call('HSET', KEYS[1], unpack(ARGV, 9, 8 + f))
local last = #ARGV
for i = 9 + f, last, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, last)))
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  if last >= 9 + f then redis.call('PEXPIRE', KEYS[2], ttl) end
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
return 1
"""


@dataclass(frozen=True)
class _Snapshot:
    """One session as the archive holds it, read consistently."""

    info: SessionInfo
    turns: list[TurnRecord]
    summary: Summary | None


class _Miss(Exception):
    """The Redis copy is absent or incomplete."""


class _Busy(Exception):
    """A write to the session is in flight: read the archive (rule 6)."""


def _shown(url: str) -> str:
    """``url`` without its password, for logs, stats and reprs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _epoch(dt: datetime) -> str:
    return repr(dt.timestamp())


def _dt(epoch: str | float) -> datetime:
    return datetime.fromtimestamp(float(epoch), UTC)


def _turn_json(
    user: str, assistant: str, in_tok: int, out_tok: int, t: float, meta: dict[str, Any] | None
) -> str:
    """One turn in :mod:`labkit.store.redis`'s list format."""
    record: dict[str, Any] = {
        "user": user,
        "assistant": assistant,
        "in": in_tok,
        "out": out_tok,
        "t": t,
    }
    if meta:
        record["meta"] = meta
    return json.dumps(record, ensure_ascii=False)


def _turn_from_json(index: int, raw: str) -> TurnRecord:
    d = json.loads(raw)
    return TurnRecord(
        index=index,
        user=d["user"],
        assistant=d["assistant"],
        input_tokens=d.get("in", 0),
        output_tokens=d.get("out", 0),
        created_at=_dt(d["t"]),
        meta=d.get("meta") or {},
    )


class TieredStore(SessionStore):
    """Redis in front of a durable archive (see the module notes for the failure rules).

    Args:
        cache: the Redis store whose server, namespace and TTL hold the hot copies.
        archive: the durable store (SQLite or PostgreSQL) that is the truth.
        retry_after_s: seconds between attempts to use Redis again after it failed.
    """

    def __init__(
        self,
        cache: RedisStore,
        archive: SessionStore,
        *,
        retry_after_s: float = RETRY_AFTER_S,
        fill_lease_s: float = FILL_LEASE_S,
    ) -> None:
        if isinstance(archive, (RedisStore, TieredStore)):
            raise StoreError(
                f"{archive.url!r} cannot be an archive: it is not durable.",
                hint="Use sqlite:///path.db or postgresql://user@host/db as the archive.",
            )
        self.cache = cache
        self.archive = archive
        self.url = cache.url
        self.archive_url = archive.url
        self.ttl = cache.ttl
        self.retry_after_s = retry_after_s
        self._fill_lease_ms = max(1, int(fill_lease_s * 1000))
        self._r = cache.redis
        self._ns = cache.namespace
        self._mirror = self._r.register_script(_MIRROR)
        self._put = self._r.register_script(_PUT)
        self._drop = self._r.register_script(_DROP)
        self._ver_ttl_ms = int(VERSION_TTL_S * 1000)
        self._mu = threading.Lock()
        self._down_since: float | None = None  # wall clock, for stats
        self._retry_at = 0.0  # monotonic
        self._last_error: str | None = None
        self._stale: set[str] = set()
        self._stale_all = False
        self._counts = dict.fromkeys(
            ("redis_hits", "rehydrations", "bypass_reads", "archive_reads",
             "archive_only_writes", "redis_errors", "redis_recoveries"), 0,
        )  # fmt: skip

    def __repr__(self) -> str:
        return f"TieredStore({_shown(self.url)!r}, archive={_shown(self.archive_url)!r})"

    # ── keys (the layout of labkit.store.redis) ──────────────────────────────

    def _keys(self, sid: str) -> list[str]:
        """meta, turns, index (as :mod:`labkit.store.redis`), then fill, ver, writing (rule 6)."""
        base = f"{self._ns}session:{sid}"
        return [base, f"{base}:turns", f"{self._ns}sessions", f"{base}:fill", f"{base}:ver",
                f"{base}:writing"]  # fmt: skip

    def _deadline(self, now: float) -> float | str:
        return now + self.ttl if self.ttl else "+inf"

    # ── Redis health (rules 2-4) ─────────────────────────────────────────────

    def _count(self, name: str) -> None:
        with self._mu:
            self._counts[name] += 1

    def _mark_stale(self, sid: str) -> None:
        with self._mu:
            if self._stale_all:
                return
            self._stale.add(sid)
            if len(self._stale) > MAX_STALE:
                self._stale.clear()
                self._stale_all = True

    def _redis_failed(self, exc: BaseException, stale: str | None = None) -> None:
        if stale:
            self._mark_stale(stale)
        with self._mu:
            self._counts["redis_errors"] += 1
            self._last_error = f"{type(exc).__name__}: {exc}"
            self._retry_at = time.monotonic() + self.retry_after_s
            first = self._down_since is None
            if first:
                self._down_since = time.time()
        if first:
            log.warning(
                "Redis cache %s failed (%s): serving sessions from the archive %s until it "
                "answers again (retrying every %.0f s)",
                _shown(self.url), exc, _shown(self.archive_url), self.retry_after_s,
            )  # fmt: skip

    def _redis_ok(self) -> bool:
        """True if Redis may be used now; tries it again once ``retry_after_s`` has passed."""
        with self._mu:
            if self._down_since is None:
                return True
            if time.monotonic() < self._retry_at:
                return False
            self._retry_at = time.monotonic() + self.retry_after_s  # one prober at a time
            stale, drop_all = set(self._stale), self._stale_all
        try:
            self._drop_copies(stale, drop_all)
        except redis_py.RedisError as exc:
            self._redis_failed(exc)
            return False
        with self._mu:
            self._stale -= stale
            self._stale_all = self._stale_all and not drop_all
            down_for = time.time() - (self._down_since or time.time())
            self._down_since = None
            self._counts["redis_recoveries"] += 1
        log.info(
            "Redis cache %s answers again after %.1f s; %s stale copies dropped",
            _shown(self.url), down_for, "all" if drop_all else len(stale),
        )  # fmt: skip
        return True

    def _drop_copies(self, sids: set[str], everything: bool = False) -> None:
        if everything:
            batch: list[str] = []
            for key in self._r.scan_iter(match=f"{self._ns}session:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    self._r.delete(*batch)
                    batch = []
            self._r.delete(*batch, f"{self._ns}sessions")
            return
        if not sids:
            self._r.ping()
            return
        with self._r.pipeline(transaction=False) as pipe:
            for sid in sids:
                meta, turns, index, fill = self._keys(sid)[:4]
                pipe.delete(meta, turns, fill)
                pipe.zrem(index, sid)
            pipe.execute()

    def _write(self, sid: str, commit: Callable[[], T], finish: Callable[[T, str], object]) -> T:
        """Announce, ``commit()`` to the archive, then ``finish(result, token)`` in Redis.

        The archive decides (rule 1: its error reaches the caller, Redis keeps nothing of
        the write); a Redis failure never fails the caller (rules 2, 3).
        """
        token = uuid.uuid4().hex
        writing = self._keys(sid)[5]
        announced = False
        if self._redis_ok():
            try:
                with self._r.pipeline(transaction=True) as pipe:
                    pipe.zadd(writing, {token: time.time() + WRITE_WINDOW_S})
                    pipe.pexpire(writing, int(WRITE_WINDOW_S * 1000) + 1000)
                    pipe.execute()
                announced = True
            except redis_py.RedisError as exc:
                self._redis_failed(exc, stale=sid)
        else:
            self._mark_stale(sid)
        try:
            result = commit()
        except BaseException:
            if announced:
                with contextlib.suppress(redis_py.RedisError):
                    self._r.zrem(writing, token)
            raise
        if not announced:
            self._count("archive_only_writes")
            return result
        try:
            finish(result, token)
        except redis_py.RedisError as exc:
            # the announcement lapses on its own; until then reads go to the archive
            self._redis_failed(exc, stale=sid)
            self._count("archive_only_writes")
        return result

    # ── reading: Redis, else rehydrate from the archive (rules 5, 6) ─────────

    def _snapshot(self, sid: str) -> _Snapshot:
        """The session from the archive, consistent: read in the order summary, info, turns.

        Turns are append-only, so the first ``info.turn_count`` turns read after ``info``
        are exactly the turns its totals count, however many were appended meanwhile; a
        summary read before ``info`` covers no more turns than it has.
        """
        for _ in range(3):
            summary = self.archive.get_summary(sid)
            info = self.archive.get_session(sid)
            turns = self.archive.load_turns(sid)
            if len(turns) >= info.turn_count:
                return _Snapshot(info, turns[: info.turn_count], summary)
        raise StoreError(  # turns vanished under us: the session was deleted and re-created
            f"Session {sid!r} changed while it was read from the archive.",
            hint="Retry the request.",
        )

    def _put_copy(self, snap: _Snapshot, token: str) -> bool:
        info = snap.info
        fields: dict[str, str] = {
            "id": info.id,
            "created_at": _epoch(info.created_at),
            "updated_at": _epoch(info.updated_at),
            "system_prompt": info.system_prompt,
            "model": info.model,
            "turn_count": str(info.turn_count),
            "input_tokens": str(info.input_tokens),
            "output_tokens": str(info.output_tokens),
        }
        if snap.summary is not None:
            fields["summary"] = snap.summary.summary
            fields["summary_covers_turns"] = str(snap.summary.covers_turns)
        flat = [x for kv in fields.items() for x in kv]
        turns = [
            _turn_json(t.user, t.assistant, t.input_tokens, t.output_tokens,
                       t.created_at.timestamp(), t.meta)
            for t in snap.turns
        ]  # fmt: skip
        covers = snap.summary.covers_turns if snap.summary is not None else -1
        now = time.time()
        args = [token, self.ttl * 1000, self._deadline(now), info.id, info.turn_count, covers,
                repr(now), len(flat), *flat, *turns]  # fmt: skip
        return bool(self._put(keys=self._keys(info.id), args=args))

    def _rehydrate(self, sid: str) -> _Snapshot:
        """Read the session from the archive and, if no write intervened, cache it."""
        token = uuid.uuid4().hex
        fill = self._keys(sid)[3]
        try:
            leased = bool(self._r.set(fill, token, nx=True, px=self._fill_lease_ms))
        except redis_py.RedisError as exc:
            self._redis_failed(exc)
            leased = False
        try:
            snap = self._snapshot(sid)
        except SessionNotFoundError:
            if leased:
                self._release_fill(fill, token)
            raise
        if leased:
            try:
                if self._put_copy(snap, token):
                    self._count("rehydrations")
            except redis_py.RedisError as exc:
                self._redis_failed(exc)
        return snap

    def _release_fill(self, fill: str, token: str) -> None:
        try:
            if self._r.get(fill) == token:
                self._r.delete(fill)
        except redis_py.RedisError:
            pass

    def _read(
        self,
        sid: str,
        from_cache: Callable[[], T],
        from_snapshot: Callable[[_Snapshot], T],
        from_archive: Callable[[], T],
    ) -> T:
        validate_session_id(sid)
        if self._redis_ok():
            try:
                value = from_cache()
            except _Miss:
                return from_snapshot(self._rehydrate(sid))
            except _Busy:
                self._count("bypass_reads")
                return from_archive()
            except redis_py.RedisError as exc:
                self._redis_failed(exc)
            else:
                self._count("redis_hits")
                return value
        self._count("archive_reads")
        return from_archive()

    def _pipe(self, sid: str, ops: Callable[[Any, list[str]], None]) -> list[Any]:
        """One MULTI/EXEC of reads on the session's keys (+ sliding TTL if asked).

        Raises:
            _Busy: a write to the session is in flight (rule 6).
        """
        keys = self._keys(sid)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.zcount(keys[5], time.time(), "+inf")
            ops(pipe, keys)
            if self.cache.refresh_on_read and self.ttl:
                ms = self.ttl * 1000
                pipe.pexpire(keys[0], ms)
                pipe.pexpire(keys[1], ms)
                pipe.zadd(keys[2], {sid: time.time() + self.ttl})
            busy, *out = pipe.execute()
        if busy:
            raise _Busy
        return out

    def _cached_turns(self, sid: str, last_n: int) -> tuple[int, list[str]]:
        def ops(pipe: Any, k: list[str]) -> None:
            pipe.hget(k[0], "turn_count")
            pipe.llen(k[1])
            pipe.lrange(k[1], -last_n if last_n else 0, -1)

        count, length, raw = self._pipe(sid, ops)[:3]
        if count is None or int(count) != int(length):
            raise _Miss
        return int(length), raw

    # ── contract ─────────────────────────────────────────────────────────────

    def create_session(
        self, *, system_prompt: str = "", model: str = "", session_id: str | None = None
    ) -> SessionInfo:
        info = self.archive.create_session(
            system_prompt=system_prompt, model=model, session_id=session_id
        )
        if self._redis_ok():
            try:
                self._put_copy(_Snapshot(info, [], None), "")
            except redis_py.RedisError as exc:
                self._redis_failed(exc, stale=info.id)
        else:
            self._mark_stale(info.id)
        return info

    def get_session(self, session_id: str) -> SessionInfo:
        def cached() -> SessionInfo:
            h, length = self._pipe(session_id, lambda p, k: (p.hgetall(k[0]), p.llen(k[1])))[:2]
            if not h or int(h.get("turn_count", -1)) != int(length):
                raise _Miss
            return SessionInfo(
                id=h["id"],
                created_at=_dt(h["created_at"]),
                updated_at=_dt(h["updated_at"]),
                system_prompt=h.get("system_prompt", ""),
                model=h.get("model", ""),
                turn_count=int(h["turn_count"]),
                input_tokens=int(h.get("input_tokens", 0)),
                output_tokens=int(h.get("output_tokens", 0)),
            )

        return self._read(
            session_id, cached, lambda s: s.info, lambda: self.archive.get_session(session_id)
        )

    def append_turn(
        self,
        session_id: str,
        user: str,
        assistant: str,
        *,
        input_tokens: int = 0,
        output_tokens: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> int:
        validate_session_id(session_id)
        check_turn_args(user, assistant, input_tokens, output_tokens)

        # Rule 1: the archive first; if it fails, Redis is never touched.
        def commit() -> int:
            return self.archive.append_turn(
                session_id, user, assistant,
                input_tokens=input_tokens, output_tokens=output_tokens, meta=meta,
            )  # fmt: skip

        def finish(n: int, token: str) -> None:
            now = time.time()
            payload = _turn_json(user, assistant, input_tokens, output_tokens, now, meta)
            args = [payload, n, repr(now), input_tokens, output_tokens, self.ttl * 1000,
                    self._deadline(now), session_id, self._ver_ttl_ms, token]  # fmt: skip
            self._mirror(keys=self._keys(session_id), args=args)

        return self._write(session_id, commit, finish)

    def bulk_append(
        self, turns: Iterable[tuple[str, str, str, int, int]], *, batch: int = 500
    ) -> int:
        """Append many ``(session_id, user, assistant, input_tokens, output_tokens)`` turns
        (for seeding and benchmarks) through the archive's own ``bulk_append``.

        The sessions written are announced first and their Redis copies dropped after the
        archive committed (they rehydrate on their next read), as for any write (rule 6).
        Turns of unknown sessions are skipped. Returns how many turns were stored.
        """
        rows = list(turns)
        sids = sorted({validate_session_id(r[0]) for r in rows})
        token = uuid.uuid4().hex
        announced = False
        if self._redis_ok():
            try:
                with self._r.pipeline(transaction=False) as pipe:
                    for sid in sids:
                        pipe.zadd(self._keys(sid)[5], {token: time.time() + WRITE_WINDOW_S})
                        pipe.pexpire(self._keys(sid)[5], int(WRITE_WINDOW_S * 1000) + 1000)
                    pipe.execute()
                announced = True
            except redis_py.RedisError as exc:
                self._redis_failed(exc)
        try:
            stored = self.archive.bulk_append(rows, batch=batch)  # type: ignore[attr-defined]
        finally:
            dropped = False
            if announced:
                try:
                    with self._r.pipeline(transaction=False) as pipe:
                        for sid in sids:
                            meta, turns_key, index, fill, _ver, writing = self._keys(sid)
                            pipe.delete(meta, turns_key, fill)
                            pipe.zrem(index, sid)
                            pipe.zrem(writing, token)
                        pipe.execute()
                    dropped = True
                except redis_py.RedisError as exc:
                    self._redis_failed(exc)
            if not dropped:
                for sid in sids:
                    self._mark_stale(sid)
        return stored

    def load_turns(self, session_id: str, last_n_turns: int = 0) -> list[TurnRecord]:
        last_n = check_last_n(last_n_turns)

        def cached() -> list[TurnRecord]:
            length, raw = self._cached_turns(session_id, last_n)
            first = length - len(raw)
            return [_turn_from_json(first + i, item) for i, item in enumerate(raw)]

        def snap(s: _Snapshot) -> list[TurnRecord]:
            return s.turns[-last_n:] if last_n else s.turns

        return self._read(
            session_id, cached, snap, lambda: self.archive.load_turns(session_id, last_n)
        )

    def load_history(self, session_id: str, last_n_turns: int = 0) -> list[dict[str, str]]:
        last_n = check_last_n(last_n_turns)

        def cached() -> list[dict[str, str]]:
            out: list[dict[str, str]] = []
            for item in self._cached_turns(session_id, last_n)[1]:
                d = json.loads(item)
                out.append({"role": "user", "content": d["user"]})
                out.append({"role": "assistant", "content": d["assistant"]})
            return out

        def snap(s: _Snapshot) -> list[dict[str, str]]:
            return turns_to_messages(s.turns[-last_n:] if last_n else s.turns)

        return self._read(
            session_id, cached, snap, lambda: self.archive.load_history(session_id, last_n)
        )

    def list_sessions(self) -> list[SessionInfo]:
        return self.archive.list_sessions()

    def delete_session(self, session_id: str) -> bool:
        validate_session_id(session_id)
        keys = self._keys(session_id)
        return self._write(
            session_id,
            lambda: self.archive.delete_session(session_id),
            lambda _, token: self._drop(
                keys=keys, args=[session_id, self._ver_ttl_ms, "deleted", 1, token]
            ),
        )

    def set_summary(self, session_id: str, summary: str, covers_turns: int) -> None:
        validate_session_id(session_id)
        # Rule 7: drop the copy; the next read rehydrates it with the new summary.
        keys = self._keys(session_id)
        self._write(
            session_id,
            lambda: self.archive.set_summary(session_id, summary, covers_turns),
            lambda _, token: self._drop(
                keys=keys, args=[session_id, self._ver_ttl_ms, "covers", covers_turns, token]
            ),
        )

    def get_summary(self, session_id: str) -> Summary | None:
        def cached() -> Summary | None:
            (summary, covers, count), length = self._pipe(
                session_id,
                lambda p, k: (
                    p.hmget(k[0], ["summary", "summary_covers_turns", "turn_count"]),
                    p.llen(k[1]),
                ),
            )[:2]
            if count is None or int(count) != int(length):
                raise _Miss
            return None if summary is None else Summary(summary, int(covers or 0))

        return self._read(
            session_id, cached, lambda s: s.summary, lambda: self.archive.get_summary(session_id)
        )

    def turn_lock(self, session_id: str, *, lease_s: float = 120.0) -> AbstractContextManager[None]:
        return self.archive.turn_lock(session_id, lease_s=lease_s)

    def close(self) -> None:
        try:
            self.cache.close()
        finally:
            self.archive.close()

    # ── extras ───────────────────────────────────────────────────────────────

    def stats(self) -> dict[str, Any]:
        """Where reads were served from, and whether Redis is up (rule 2).

        ``redis`` is ``"up"`` or ``"down"``; ``redis_down_since`` (ISO time) and
        ``last_redis_error`` say since when and why; counts: ``redis_hits``,
        ``rehydrations`` (misses put back into Redis), ``bypass_reads`` (reads sent to
        the archive because a write to the session was in flight), ``archive_reads``
        (reads served by the archive while Redis was down), ``archive_only_writes``,
        ``redis_errors``,
        ``redis_recoveries``, and ``stale_copies`` (copies to drop when Redis is back).
        """
        with self._mu:
            down = self._down_since
            return {
                "cache": _shown(self.url),
                "archive": _shown(self.archive_url),
                "redis": "down" if down is not None else "up",
                "redis_down_since": None
                if down is None
                else datetime.fromtimestamp(down, UTC).isoformat(),
                "last_redis_error": self._last_error,
                **self._counts,
                "stale_copies": "all" if self._stale_all else len(self._stale),
            }

    def cached(self, session_id: str) -> bool:
        """True if Redis holds a complete copy of the session now (for the lab)."""
        validate_session_id(session_id)
        meta, turns = self._keys(session_id)[:2]
        with self._r.pipeline(transaction=True) as pipe:
            pipe.hget(meta, "turn_count")
            pipe.llen(turns)
            count, length = pipe.execute()
        return count is not None and int(count) == int(length)

    def ttl_remaining(self, session_id: str) -> float | None:
        """Seconds until the Redis copy expires (None: no expiry). Raises if not cached."""
        validate_session_id(session_id)
        ms = self._r.pttl(self._keys(session_id)[0])
        if ms == -2:
            raise SessionNotFoundError(session_id, hint="The session is not in Redis now.")
        return None if ms == -1 else ms / 1000

    def iter_cached(self) -> Iterator[str]:
        """Ids of the sessions whose copy is in Redis now (for the lab)."""
        for key in self._r.scan_iter(match=f"{self._ns}session:*", count=1000):
            rest = key[len(self._ns) + len("session:") :]
            if ":" not in rest and self.cached(rest):
                yield rest
