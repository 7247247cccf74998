"""The chat API under load, side by side with a minimal server written the course's way.

One run, one machine, one sim-engine upstream (``labkit local-api --engine sim``):

- **labkit**: ``labkit serve`` (sse-starlette, pings, persistence of every turn in
  SQLite, per-session lock, context rule), each stream a new session;
- **course**: the course's ``StreamingResponse`` with a hand-formatted ``data:``
  generator relaying ``AsyncAnthropic.messages.stream(...).text_stream`` (no
  sessions, no persistence, no pings), same upstream, same uvicorn;
- **floor** (TTFT only): a bare ASGI app relaying ``labkit.upstream.astream`` (no
  framework, no store): what any relay built on the SDK pays at least;
- **direct** (TTFT only): calling the upstream's ``/v1/messages`` directly.

Figures printed:

1. *Added TTFT*: time to the first text delta through each server minus calling the
   upstream directly, sequential requests interleaved round-robin (p50/p99); labkit
   twice: a new session each turn, and later turns of one session (lock and history
   read before the request). Goal: labkit adds ≤ 2 ms at p50.
2. *Concurrency*: at 100, 300 and 1,000 concurrent streams with a 100 ms upstream
   ITL, per server: errors, text events per second, per-stream ITL (mean gap between
   text events at the client) with its inflation over the upstream's 100 ms, and TTFT
   p50. Each level runs ``--rounds`` times (default 3), the servers taking turns in an
   order reversed each round; the table gives each server's median. The verdicts compare
   labkit with the course server round by round (the two ran back to back, so a burst
   of noise on the machine hits both) and take the median over the rounds; the
   per-round comparisons are printed after them. Goals, labkit against the course server
   of the same run: 0 errors; TTFT p50 ≤ 1.1× at every level; ITL p99 inflation ≤ the
   course's + 2 ms; events/s ≥ the course's at the top level. ``--workers 1,2`` adds
   ``labkit serve --workers N`` rows on one Redis store (sessions and locks shared).

The client load runs in a separate process (aiohttp), on loopback, bounded by the
stream count. Servers are loaded one at a time against the same upstream.

Usage: ``python benchmarks/chat_api.py [--levels 100,300,1000] [--ttft-n 200]
[--rounds 3] [--workers 1,2] [--quick]``

(No ``from __future__ import annotations`` here: the course-style app declares its
request model inside a function, and FastAPI must resolve the annotation at runtime.)
"""

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

UPSTREAM_ITL_MS = 100.0
MODEL = "smollm2-135m-instruct"


# ── the course-style server (run with --course-server) ────────────────────────


def course_app(base_url: str) -> Any:
    """The course's 'FastAPI Streaming Endpoint — SSE Pattern', pointed at base_url."""
    import anthropic
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from pydantic import BaseModel

    app = FastAPI()
    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="sk-local")

    class ChatRequest(BaseModel):
        message: str
        session_id: str = "default"

    @app.post("/chat/stream/{session_id}")
    async def chat_stream(session_id: str, request: ChatRequest) -> StreamingResponse:
        async def generate():
            async with client.messages.stream(
                model=MODEL,
                max_tokens=2048,
                messages=[{"role": "user", "content": request.message}],
            ) as stream:
                async for text in stream.text_stream:
                    yield f"data: {json.dumps({'text': text})}\n\n"
                final = await stream.get_final_message()
                yield f"data: {json.dumps({'done': True, 'usage': {'input': final.usage.input_tokens, 'output': final.usage.output_tokens}})}\n\n"

        return StreamingResponse(
            generate(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    return app


def floor_app(base_url: str) -> Any:
    """The floor of any relay built on the SDK: a bare ASGI app (no framework, no store)
    that relays ``labkit.upstream.astream`` text as the course's ``data:`` events."""
    import anthropic

    from labkit import upstream

    client = anthropic.AsyncAnthropic(base_url=base_url, api_key="sk-local", max_retries=0)
    head = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/event-stream")],
    }

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/health":
            await send({**head, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        text = json.loads(body)["message"]
        request = upstream.Request(MODEL, [{"role": "user", "content": text}], 2048)
        async with upstream.astream(client, request) as stream:
            await send(head)
            async for delta in stream.text_stream:
                event = f"data: {json.dumps({'text': delta})}\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b'data: {"done": true}\n\n'})

    return app


def run_script_server(kind: str, base_url: str) -> None:
    import uvicorn

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(2048)
    print(f"labkit serve: listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    app = course_app(base_url) if kind == "course" else floor_app(base_url)
    config = uvicorn.Config(app, access_log=False, log_level="warning", backlog=2048)
    uvicorn.Server(config).run(sockets=[sock])


class ScriptServer:
    """The course-style server (or the floor relay) in its own process."""

    def __init__(self, base_url: str, kind: str = "course") -> None:
        self.base_url = base_url
        self.kind = kind
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> "ScriptServer":
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--script-server", self.kind, self.base_url],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.url = line.rsplit(" ", 1)[1].strip()
        import httpx

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


# ── the client load (run with --client) ───────────────────────────────────────


async def _one_stream(session: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request; times of the first text event and of every text event."""
    t0 = time.perf_counter()
    times: list[float] = []
    out: dict[str, Any] = {"ok": False, "error": None}
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                out["error"] = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                done = False
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    now = time.perf_counter()
                    data = json.loads(line[6:])
                    if "text" in data or data.get("type") == "content_block_delta":
                        times.append(now)
                    elif "session_id" in data and "done" not in data:
                        out["session_id"] = data["session_id"]
                    elif "error" in data:
                        out["error"] = str(data["error"])
                    elif data.get("done") or data.get("type") == "message_stop":
                        done = True
                out["ok"] = done and out["error"] is None
                if not done and out["error"] is None:
                    out["error"] = "no done event"
    except Exception as exc:  # counted, not raised: this is a load test
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["ttft"] = (times[0] - t0) if times else None
    out["itl"] = ((times[-1] - times[0]) / (len(times) - 1)) if len(times) > 1 else None
    out["events"] = len(times)
    out["start"], out["end"] = t0, time.perf_counter()
    return out


def _target(
    kind: str, url: str, session: str = "new"
) -> tuple[str, dict[str, Any], dict[str, str]]:
    if kind == "direct":
        body = {
            "model": MODEL,
            "max_tokens": 2048,
            "stream": True,
            "messages": [{"role": "user", "content": "Hello"}],
        }
        headers = {"x-api-key": "sk-local", "anthropic-version": "2023-06-01"}
        return url + "/v1/messages", body, headers
    return url + f"/chat/stream/{session}", {"message": "Hello"}, {}


#: Turns per session for the "continuing" row (a new session after that many).
SESSION_TURNS = 20


async def client_ttft(targets: dict[str, str], n: int) -> dict[str, list[float]]:
    """Sequential TTFT, the targets interleaved round-robin. A target named
    ``<name>-continuing`` sends later turns of one session (a new one every
    SESSION_TURNS turns; the turn that creates it is not counted)."""
    import aiohttp

    res: dict[str, list[float]] = {k: [] for k in targets}
    sessions: dict[str, tuple[str, int]] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        for i in range(n + 5):
            for kind, base in targets.items():
                continuing = kind.endswith("-continuing")
                sid, turns = sessions.get(kind, ("new", 0))
                if continuing and (sid == "new" or turns >= SESSION_TURNS):
                    first = await _one_stream(s, *_target(kind, base)[:2])
                    if first["error"]:
                        raise RuntimeError(f"{kind}: {first['error']}")
                    sid, turns = first["session_id"], 1
                url, body, headers = _target(kind, base, sid if continuing else "new")
                s.headers.clear()
                s.headers.update(headers)
                r = await _one_stream(s, url, body)
                if r["error"]:
                    raise RuntimeError(f"{kind}: {r['error']}")
                sessions[kind] = (sid, turns + 1)
                if i >= 5 and r["ttft"] is not None:  # 5 warm-up rounds
                    res[kind].append(r["ttft"] * 1000)
    return res


async def client_load(kind: str, base: str, concurrency: int) -> dict[str, Any]:
    import aiohttp

    url, body, headers = _target(kind, base)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=conn, headers=headers, timeout=aiohttp.ClientTimeout(total=120)
    ) as s:
        # Warm-up burst, not counted: lazy imports, connection pools, first-call caches.
        await asyncio.gather(*(_one_stream(s, url, body) for _ in range(min(concurrency, 50))))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(_one_stream(s, url, body) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    errors = [r["error"] for r in results if not r["ok"]]
    itls = sorted(r["itl"] * 1000 for r in results if r["ok"] and r["itl"] is not None)
    events = sum(r["events"] for r in results)
    first = min(r["start"] for r in results)
    last = max(r["end"] for r in results)
    return {
        "errors": len(errors),
        "error_kinds": sorted(set(map(str, errors)))[:3],
        "events": events,
        "events_per_s": events / max(last - first, 1e-9),
        "wall_s": wall,
        "itl_p50": _pct(itls, 50),
        "itl_p99": _pct(itls, 99),
        "ttft_p50": _pct(sorted(r["ttft"] * 1000 for r in results if r["ttft"]), 50),
    }


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def run_client(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if spec["mode"] == "ttft":
        return asyncio.run(client_ttft(spec["targets"], spec["n"]))
    return asyncio.run(client_load(spec["kind"], spec["url"], spec["concurrency"]))


def in_client_process(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--client", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"client process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ── orchestration ─────────────────────────────────────────────────────────────


def _settle(api: Any) -> None:
    """Wait until the upstream has no stream left (a previous level's tail)."""
    for _ in range(200):
        if api.metrics().get("labkit_active_streams", 0) == 0:
            return
        time.sleep(0.05)


def _labkit_server(api_url: str, store_url: str, workers: int) -> Any:
    from labkit.server import ChatServer

    return ChatServer(
        store_url=store_url, provider="local", base_url=api_url, max_retries=0, workers=workers
    )


def _row(n: int, name: str, r: dict[str, Any]) -> str:
    return (
        f"{n:>8} {name:16}{r['errors']:>7}{r['events_per_s']:>10.0f}{r['itl_p50']:>9.1f}"
        f"{r['itl_p99']:>9.1f}{r['itl_p50'] - UPSTREAM_ITL_MS:>10.1f}"
        f"{r['itl_p99'] - UPSTREAM_ITL_MS:>10.1f}{r['ttft_p50']:>10.1f}"
        + (f"  {r['error_kinds']}" if r["errors"] else "")
    )


def _verdicts(
    n: int, labs: list[dict[str, Any]], cous: list[dict[str, Any]], top: bool
) -> list[str]:
    """The issue's goals at one level, labkit against the course server: each round's
    labkit/course comparison (the two ran back to back), then the median over rounds."""
    import statistics

    pairs = list(zip(labs, cous, strict=True))
    ttft_ratio = statistics.median(lab["ttft_p50"] / cou["ttft_p50"] for lab, cou in pairs)
    eps_ratio = statistics.median(lab["events_per_s"] / cou["events_per_s"] for lab, cou in pairs)
    itl_extra = statistics.median(lab["itl_p99"] - cou["itl_p99"] for lab, cou in pairs)
    errors = sum(lab["errors"] for lab in labs)
    out = [
        f"{n:>5} streams, median of {len(pairs)} paired round(s): events/s {eps_ratio:.2f}x "
        f"course, TTFT p50 {ttft_ratio:.2f}x, ITL p99 inflation {itl_extra:+.1f} ms vs course",
        _goal("  0 errors", errors == 0, f"{errors}"),
        _goal("  TTFT p50 <= 1.1x course", ttft_ratio <= 1.1, f"{ttft_ratio:.2f}x"),
        _goal("  ITL p99 inflation <= course + 2 ms", itl_extra <= 2.0, f"{itl_extra:+.1f} ms"),
    ]
    if top:
        out.append(_goal("  events/s >= course", eps_ratio >= 1.0, f"{eps_ratio:.2f}x"))
    return out


def _goal(what: str, ok: bool, value: str) -> str:
    return f"{what}: {value} -> {'met' if ok else 'NOT met'}"


def main() -> None:
    from tqdm import tqdm

    from labkit.localapi import LocalAPIServer
    from labkit.results import quick

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="100,300,1000", help="concurrent streams per level")
    ap.add_argument("--ttft-n", type=int, default=200, help="sequential requests per server")
    ap.add_argument("--reply-tokens", type=int, default=20)
    ap.add_argument(
        "--workers",
        default="",
        help="also run `labkit serve --workers N` for each N listed (e.g. 1,2), all on one "
        "Redis store (LABKIT_REDIS_URL, else a throwaway Valkey)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="runs per server at each level, the servers taking turns; the table gives the "
        "median (one noisy burst does not decide a goal)",
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick or quick():
        args.ttft_n, args.levels, args.reply_tokens, args.rounds = 30, "100,300", 10, 1
    levels = [int(x) for x in args.levels.split(",")]
    workers = [int(x) for x in args.workers.split(",") if x.strip()]
    tmp = tempfile.mkdtemp(prefix="labkit-bench-")
    print(
        f"benchmarks/chat_api.py — {os.cpu_count()} CPUs; servers one at a time; client in its "
        f"own process; load average {os.getloadavg()[0]:.2f} at start"
    )

    # 1. Added TTFT ---------------------------------------------------------------
    with (
        LocalAPIServer(engine="sim", ttft_ms=20, itl_ms=5, reply_tokens=5, seed=1) as api,
        _labkit_server(api.base_url, f"sqlite:///{tmp}/ttft.db", 1) as lab,
        ScriptServer(api.base_url, "course") as course,
        ScriptServer(api.base_url, "floor") as floor,
    ):
        targets = {
            "direct": api.base_url,
            "floor": floor.url,
            "course": course.url,
            "labkit": lab.url,
            "labkit-continuing": lab.url,
        }
        res = in_client_process({"mode": "ttft", "n": args.ttft_n, "targets": targets})
    d50, d99 = _pct(res["direct"], 50), _pct(res["direct"], 99)
    print(
        f"\n1. TTFT added over calling the upstream directly (sim TTFT 20 ms, n={args.ttft_n} "
        "each, interleaved)\n   floor: a bare ASGI relay through the SDK (no framework, no "
        f"store); labkit: a new session each turn; labkit-continuing: turns 2-{SESSION_TURNS} "
        "of a session"
    )
    print(f"{'':18}{'p50 ms':>10}{'p99 ms':>10}{'added p50':>12}{'added p99':>12}")
    for kind in targets:
        p50, p99 = _pct(res[kind], 50), _pct(res[kind], 99)
        extra = f"{p50 - d50:>12.2f}{p99 - d99:>12.2f}" if kind != "direct" else ""
        print(f"{kind:18}{p50:>10.2f}{p99:>10.2f}{extra}")
    added = _pct(res["labkit"], 50) - d50
    print(_goal("goal: labkit added TTFT p50 <= 2 ms", added <= 2, f"{added:.2f} ms"))

    # 2. Concurrency ---------------------------------------------------------------
    print(
        f"\n2. Concurrent streams, upstream ITL {UPSTREAM_ITL_MS:.0f} ms, {args.reply_tokens} tokens "
        f"a reply, each stream a new session; {args.rounds} rounds per level, the servers "
        "taking turns (order reversed each round); the table gives each server's median"
        + ("; labkit-redis-wN: --workers N on one Redis store" if workers else "")
    )
    header = (
        f"{'streams':>8} {'server':16}{'errors':>7}{'events/s':>10}{'ITL p50':>9}{'ITL p99':>9}"
        f"{'infl p50':>10}{'infl p99':>10}{'TTFT p50':>10}"
    )
    verdicts: list[str] = []
    table: list[str] = []
    with contextlib.ExitStack() as stack:
        api = stack.enter_context(
            LocalAPIServer(
                engine="sim",
                ttft_ms=100,
                itl_ms=UPSTREAM_ITL_MS,
                reply_tokens=args.reply_tokens,
                seed=1,
            )
        )
        redis_url = ""
        if workers:
            redis_url = os.environ.get("LABKIT_REDIS_URL", "")
            if not redis_url:
                from labkit.services import throwaway_server

                redis_url = stack.enter_context(throwaway_server())
        progress = tqdm(
            total=len(levels) * args.rounds * (2 + len(workers)), desc="load runs", unit="run"
        )
        for n in levels:
            with contextlib.ExitStack() as servers:
                procs: dict[str, Any] = {
                    "course": servers.enter_context(ScriptServer(api.base_url, "course")),
                    "labkit": servers.enter_context(
                        _labkit_server(api.base_url, f"sqlite:///{tmp}/load-{n}.db", 1)
                    ),
                }
                for w in workers:
                    procs[f"labkit-redis-w{w}"] = servers.enter_context(
                        _labkit_server(api.base_url, redis_url, w)
                    )
                urls = {name: proc.url for name, proc in procs.items()}
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
                for r in range(args.rounds):
                    for name in list(urls)[:: 1 if r % 2 == 0 else -1]:
                        _settle(api)
                        kind = "course" if name == "course" else "labkit"
                        spec = {"mode": "load", "kind": kind, "url": urls[name], "concurrency": n}
                        runs[name].append(in_client_process(spec))
                        progress.update()
                for name, proc in procs.items():
                    if any(r["errors"] for r in runs[name]) and hasattr(proc, "log_text"):
                        verdicts += _upstream_failures(n, name, proc.log_text())
            row = {name: _median_run(rs) for name, rs in runs.items()}
            table += [_row(n, name, r) for name, r in row.items()]
            verdicts += _verdicts(n, runs["labkit"], runs["course"], top=n == max(levels))
            verdicts.append("  per round, labkit/course: " + _per_round(runs))
            for w in workers:
                r = row[f"labkit-redis-w{w}"]
                verdicts.append(
                    f"  --workers {w} (Redis): events/s {r['events_per_s'] / row['course']['events_per_s']:.2f}x "
                    f"course, TTFT p50 {r['ttft_p50'] / row['course']['ttft_p50']:.2f}x, errors {r['errors']}"
                )
        progress.close()
    print(header)
    print("\n".join(table))
    print()
    print("\n".join(verdicts))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def _upstream_failures(n: int, name: str, log: str) -> list[str]:
    """What a server logged about its failed turns (the first three distinct reasons)."""
    reasons = sorted(
        {
            line.split("failed on session ", 1)[1].split(": ", 1)[-1]
            for line in log.splitlines()
            if "failed on session " in line
        }
    )
    return [f"  {name} at {n} streams logged: {reason[:200]}" for reason in reasons[:3]]


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's rounds at one level: the median of each figure, errors summed."""
    import statistics

    out = {k: statistics.median(r[k] for r in runs) for k in _FIGURES}
    out["errors"] = sum(r["errors"] for r in runs)
    out["error_kinds"] = sorted({k for r in runs for k in r["error_kinds"]})[:3]
    return out


_FIGURES = ("events_per_s", "itl_p50", "itl_p99", "ttft_p50")


def _per_round(runs: dict[str, list[dict[str, Any]]]) -> str:
    return "; ".join(
        f"events/s {lab['events_per_s'] / cou['events_per_s']:.2f}x, "
        f"TTFT {lab['ttft_p50'] / cou['ttft_p50']:.2f}x, "
        f"ITL p99 {lab['itl_p99'] - cou['itl_p99']:+.1f} ms"
        for lab, cou in zip(runs["labkit"], runs["course"], strict=True)
    )


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--script-server":
        run_script_server(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 2 and sys.argv[1] == "--client":
        print(json.dumps(run_client(json.loads(sys.argv[2]))))
    else:
        main()
