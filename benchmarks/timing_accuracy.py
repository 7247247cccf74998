"""How accurate is labkit.timing? Measured against the sim engine's ground truth.

    .venv/bin/python benchmarks/timing_accuracy.py [--requests 20] [--aiperf PATH]

For each ground truth (TTFT/ITL = 300/15 ms and 0/0 ms) one sim-engine local API is
started with that latency server-wide, and, side by side against that same server:

- ``labkit (anthropic)``: ``timed(client.messages.stream(...))`` on an instrumented client;
- ``labkit (openai)``: ``timed(lambda: client.chat.completions.create(stream=True))``;
- ``bare SDK loop``: the course's own way — ``perf_counter`` before ``messages.stream``
  and at each ``text_stream`` item, no wrapper;
- ``AIPerf 0.13``: NVIDIA's tool (``aiperf profile``), when installed (the optional
  ``peer`` extra, or any venv: ``--aiperf`` / ``$LABKIT_AIPERF`` / ``aiperf`` on PATH).

Errors are measured − truth: TTFT error at the median and p90 of requests; ITL error at the
median of all inter-delta gaps (AIPerf: its ``inter_chunk_latency`` samples, which are the
same quantity; its ``inter_token_latency`` divides by its own tokenizer's count and is
printed too). The sim engine stamps TTFT from when it *received* the request, so a client
can only read a little above the truth: the loopback round trip and the server's own
work are in every tool's error alike.

Then the harness's own cost: per chunk, iterating the raw SDK stream vs iterating it
through ``timed()`` (sim at 0/0, long replies, alternating runs), and the in-process cost
of :func:`labkit.timing.observe_event` per event.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anthropic
import openai

from labkit.localapi import LocalAPIServer
from labkit.timing import StreamTiming, instrument, observe_event, percentile, timed

MODEL = "smollm2-135m-instruct"
MSGS = [{"role": "user", "content": "Tell me something."}]


def _labkit_anthropic(srv: LocalAPIServer, n: int, reply: int) -> tuple[list[float], list[float]]:
    client = instrument(anthropic.Anthropic(api_key="sim", base_url=srv.base_url))
    ttfts, gaps = [], []
    for _ in range(n):
        with timed(client.messages.stream(model=MODEL, max_tokens=reply, messages=MSGS)) as s:
            for _ in s.text_stream:
                pass
        ttfts.append(s.timing.ttft_ms)
        gaps += s.timing.itl_ms
    return ttfts, gaps


def _labkit_openai(srv: LocalAPIServer, n: int, reply: int) -> tuple[list[float], list[float]]:
    client = instrument(openai.OpenAI(api_key="sim", base_url=srv.openai_base_url))
    ttfts, gaps = [], []
    for _ in range(n):
        with timed(
            lambda: client.chat.completions.create(
                model=MODEL,
                max_tokens=reply,
                messages=MSGS,
                stream=True,
                stream_options={"include_usage": True},
            )
        ) as s:
            for _ in s:
                pass
        ttfts.append(s.timing.ttft_ms)
        gaps += s.timing.itl_ms
    return ttfts, gaps


def _bare_sdk(srv: LocalAPIServer, n: int, reply: int) -> tuple[list[float], list[float]]:
    client = anthropic.Anthropic(api_key="sim", base_url=srv.base_url)
    ttfts, gaps = [], []
    for _ in range(n):
        stamps = []
        t0 = time.perf_counter_ns()
        with client.messages.stream(model=MODEL, max_tokens=reply, messages=MSGS) as s:
            for text in s.text_stream:
                if text:
                    stamps.append(time.perf_counter_ns())
        ttfts.append((stamps[0] - t0) / 1e6)
        gaps += [(b - a) / 1e6 for a, b in itertools.pairwise(stamps)]
    return ttfts, gaps


def find_aiperf(explicit: str | None) -> str | None:
    for cand in (
        explicit,
        os.environ.get("LABKIT_AIPERF"),
        shutil.which("aiperf"),
        str(Path(sys.executable).with_name("aiperf")),
    ):
        if cand and Path(cand).exists():
            return cand
    return None


def _aiperf(
    exe: str, srv: LocalAPIServer, n: int, reply: int
) -> tuple[list[float], list[float], list[float]]:
    """Run AIPerf against the server; returns (ttfts, inter-chunk gaps, its ITLs)."""
    from labkit.tokens import install_offline_encodings

    env = dict(
        os.environ,
        TIKTOKEN_CACHE_DIR=str(install_offline_encodings()),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            exe,
            "profile",
            "--model",
            MODEL,
            "--url",
            srv.base_url,
            "--endpoint-type",
            "chat",
            "--streaming",
            "--tokenizer",
            "builtin",
            "--request-count",
            str(n),
            "--concurrency",
            "1",
            "--artifact-dir",
            tmp,
            "--ui-type",
            "none",
            "--output-tokens-mean",
            str(reply),
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        files = list(Path(tmp).rglob("profile_export.jsonl"))
        if proc.returncode != 0 or not files:
            tail = (proc.stderr or proc.stdout)[-800:]
            raise RuntimeError(f"aiperf exited {proc.returncode}: {tail}")
        ttfts, gaps, itls = [], [], []
        for line in files[0].read_text().splitlines():
            rec = json.loads(line)
            m = rec.get("metrics", rec)

            def val(name: str, m: dict = m) -> object:
                v = m.get(name)
                return v.get("value") if isinstance(v, dict) else v

            if val("time_to_first_token") is not None:
                ttfts.append(float(val("time_to_first_token")))
            icl = val("inter_chunk_latency")
            if isinstance(icl, list):
                gaps += [float(x) for x in icl]
            if val("inter_token_latency") is not None:
                itls.append(float(val("inter_token_latency")))
        return ttfts, gaps, itls


def _fmt(x: float | None, spec: str = "+.2f") -> str:
    return "—" if x is None else format(x, spec)


def accuracy(args: argparse.Namespace, aiperf: str | None) -> None:
    print(
        f"\n== Accuracy vs sim ground truth ({args.requests} requests per tool, "
        f"{args.reply} text deltas each; errors in ms, measured − truth) =="
    )
    header = f"{'truth TTFT/ITL':>15} {'tool':<20} {'TTFT err p50':>13} {'TTFT err p90':>13} {'ITL err p50':>12} {'ITL err p99':>12}"
    print(header)
    print("-" * len(header))
    for ttft, itl in ((300, 15), (0, 0)):
        with LocalAPIServer(
            engine="sim", ttft_ms=ttft, itl_ms=itl, jitter_ms=0, reply_tokens=args.reply
        ) as srv:
            _labkit_anthropic(srv, 2, args.reply)  # warm the connection and server
            tools: list[tuple[str, object]] = [
                ("labkit (anthropic)", lambda: _labkit_anthropic(srv, args.requests, args.reply)),
                ("labkit (openai)", lambda: _labkit_openai(srv, args.requests, args.reply)),
                ("bare SDK loop", lambda: _bare_sdk(srv, args.requests, args.reply)),
            ]
            for name, run in tools:
                ttfts, gaps = run()  # type: ignore[operator]
                errs = [t - ttft for t in ttfts]
                gerrs = [g - itl for g in gaps]
                print(
                    f"{f'{ttft}/{itl} ms':>15} {name:<20} {_fmt(percentile(errs, 50)):>13} "
                    f"{_fmt(percentile(errs, 90)):>13} {_fmt(percentile(gerrs, 50), '+.3f'):>12} "
                    f"{_fmt(percentile(gerrs, 99), '+.3f'):>12}"
                )
            if aiperf:
                try:
                    ttfts, gaps, itls = _aiperf(aiperf, srv, args.requests, args.reply)
                    errs = [t - ttft for t in ttfts]
                    gerrs = [g - itl for g in gaps]
                    print(
                        f"{f'{ttft}/{itl} ms':>15} {'AIPerf 0.13':<20} {_fmt(percentile(errs, 50)):>13} "
                        f"{_fmt(percentile(errs, 90)):>13} {_fmt(percentile(gerrs, 50), '+.3f'):>12} "
                        f"{_fmt(percentile(gerrs, 99), '+.3f'):>12}   (its own ITL, by its "
                        f"tokenizer: p50 {_fmt(percentile(itls, 50), '.3f')} ms)"
                    )
                except Exception as exc:  # the peer is optional; say why it is missing
                    print(f"{f'{ttft}/{itl} ms':>15} {'AIPerf 0.13':<20} failed: {exc}")
    if not aiperf:
        print(
            "AIPerf: not installed — skipped. Install the optional peer tool "
            "(`pip install aiperf==0.13.0`, ideally in its own venv) and pass --aiperf PATH "
            "or set LABKIT_AIPERF."
        )


def overhead(args: argparse.Namespace) -> None:
    n_tokens = args.overhead_tokens
    print(
        f"\n== Harness overhead (sim 0/0 ms, {n_tokens} deltas per stream, "
        f"{args.overhead_runs} alternating runs each) =="
    )
    with LocalAPIServer(
        engine="sim", ttft_ms=0, itl_ms=0, jitter_ms=0, reply_tokens=n_tokens
    ) as srv:
        raw_client = anthropic.Anthropic(api_key="sim", base_url=srv.base_url)
        inst_client = instrument(anthropic.Anthropic(api_key="sim", base_url=srv.base_url))
        kw = {"model": MODEL, "max_tokens": n_tokens, "messages": MSGS}

        def raw() -> float:
            t0 = time.perf_counter_ns()
            with raw_client.messages.stream(**kw) as s:
                n = sum(1 for _ in s.text_stream)
            return (time.perf_counter_ns() - t0) / n / 1000

        def wrapped() -> float:
            t0 = time.perf_counter_ns()
            with timed(inst_client.messages.stream(**kw)) as s:
                n = sum(1 for _ in s.text_stream)
            return (time.perf_counter_ns() - t0) / n / 1000

        raw(), wrapped()
        raws, wraps = [], []
        for _ in range(args.overhead_runs):
            raws.append(raw())
            wraps.append(wrapped())
        r, w = statistics.median(raws), statistics.median(wraps)
        print(f"raw SDK text_stream        : {r:8.1f} µs per chunk (median)")
        print(f"timed(...).text_stream     : {w:8.1f} µs per chunk (median)")
        print(
            f"overhead                   : {w - r:+8.1f} µs per chunk ({(w - r) / r * 100:+.1f}%)"
        )

        # in-process: the accumulation alone, on events captured from one real stream
        with raw_client.messages.stream(**kw) as s:
            events = list(s)
        reps = 20
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            timing = StreamTiming(sent_ns=0)
            for i, ev in enumerate(events):
                observe_event(timing, ev, i)
        per = (time.perf_counter_ns() - t0) / (reps * len(events))
        print(
            f"observe_event (in process) : {per / 1000:8.2f} µs per SDK event "
            f"({len(events)} events incl. helper events)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20, help="requests per tool and ground truth")
    ap.add_argument("--reply", type=int, default=40, help="text deltas per reply")
    ap.add_argument("--overhead-tokens", type=int, default=2000)
    ap.add_argument("--overhead-runs", type=int, default=7)
    ap.add_argument("--aiperf", default=None, help="path to the aiperf executable")
    args = ap.parse_args()
    aiperf = find_aiperf(args.aiperf)
    print(
        f"labkit timing accuracy — python {sys.version.split()[0]}, anthropic {anthropic.__version__}, "
        f"openai {openai.__version__}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}; "
        f"AIPerf: {aiperf or 'not found'}"
    )
    accuracy(args, aiperf)
    overhead(args)


if __name__ == "__main__":
    main()
