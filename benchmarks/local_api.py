"""What the local API costs, measured side by side in one run.

1. SmolLM2-135M-Instruct decode tokens/s and TTFT, in process (llama-cpp-python's
   ``create_completion(stream=True)`` called directly) vs through the local API
   with the official Anthropic SDK (``messages.stream``). Same prompt tokens,
   temperature 0, prompt cache off on both sides (cold TTFT), trials interleaved.
   Goal: API decode rate ≥ 95% of in process.
2. The sim engine at zero latency: the TTFT the API itself adds (request sent →
   first text delta), p50/p99, through the Anthropic SDK, the OpenAI SDK and a raw
   httpx stream. Goal: p50 ≤ 10 ms.

Run: ``.venv/bin/python benchmarks/local_api.py [--trials 5] [--max-tokens 128] [--sim-requests 200]``
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import anthropic
import httpx
import openai

from labkit.localapi import MODEL_ID, LocalAPIServer
from labkit.localapi.engine import ChatMessage, render_chatml
from labkit.localapi.llama import available_cores, default_threads, model_path

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_process_trial(llm, tokens: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, decode tokens/s, tokens) for one cold generation."""
    llm.reset()
    t0 = time.perf_counter()
    first = last = None
    n = 0
    for chunk in llm.create_completion(
        tokens, max_tokens=max_tokens, temperature=0.0, stream=True, repeat_penalty=1.0
    ):
        now = time.perf_counter()
        if chunk["choices"][0]["text"]:
            first = first or now
            last = now
        n += 1
    # each streamed chunk is one sampled token, except a final flush chunk with finish_reason
    n = max(n - 1, 1)
    return first - t0, (n - 1) / (last - first) if last > first else float("nan"), n


def api_trial(client: anthropic.Anthropic, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = last = None
    with client.messages.stream(
        model=MODEL_ID,
        max_tokens=max_tokens,
        messages=[{"role": "user", "content": PROMPT}],
        extra_body={"temperature": 0},
        extra_headers={"x-labkit-cache": "off"},
    ) as stream:
        for text in stream.text_stream:
            now = time.perf_counter()
            if text:
                first = first or now
                last = now
        n = stream.get_final_message().usage.output_tokens
    return first - t0, (n - 1) / (last - first) if last > first else float("nan"), n


def sim_ttfts(api: LocalAPIServer, requests: int) -> dict[str, list[float]]:
    a = anthropic.Anthropic(base_url=api.base_url, api_key="bench", max_retries=0)
    o = openai.OpenAI(base_url=api.openai_base_url, api_key="bench", max_retries=0)
    h = httpx.Client(timeout=30)
    msgs = [{"role": "user", "content": "Say hello."}]
    body = {"model": MODEL_ID, "max_tokens": 8, "messages": msgs, "stream": True}
    out: dict[str, list[float]] = {"anthropic SDK": [], "openai SDK": [], "raw httpx": []}
    for i in range(requests + 5):
        t0 = time.perf_counter()
        with a.messages.stream(model=MODEL_ID, max_tokens=8, messages=msgs) as s:
            for _ in s.text_stream:
                ttft = time.perf_counter() - t0
                break
            s.until_done()
        if i >= 5:
            out["anthropic SDK"].append(ttft)
        t0 = time.perf_counter()
        ttft = None
        for chunk in o.chat.completions.create(
            model=MODEL_ID, max_tokens=8, messages=msgs, stream=True
        ):
            if ttft is None and chunk.choices and chunk.choices[0].delta.content:
                ttft = time.perf_counter() - t0
        if i >= 5:
            out["openai SDK"].append(ttft)
        t0 = time.perf_counter()
        with h.stream("POST", api.base_url + "/v1/messages", json=body) as r:
            seen = False
            for line in r.iter_lines():
                if not seen and line.startswith("data:") and '"text_delta"' in line:
                    ttft = time.perf_counter() - t0
                    seen = True
        if i >= 5:
            out["raw httpx"].append(ttft)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--trials",
        type=int,
        default=5,
        help="Generations per side (interleaved), after one warm-up each.",
    )
    ap.add_argument("--max-tokens", type=int, default=128, help="Tokens generated per trial.")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="llama threads (decode and prompt) on both sides (default: the engine's, see labkit.localapi.llama note 5).",
    )
    ap.add_argument(
        "--sim-requests",
        type=int,
        default=200,
        help="Requests per client on the zero-latency sim engine.",
    )
    args = ap.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same policy as the server's engine
    from llama_cpp import Llama

    decode, batch = (args.threads, args.threads) if args.threads else default_threads()
    print(
        f"# machine: {available_cores()} cores available, llama threads {decode} decode / {batch} prompt, "
        f"load average {os.getloadavg()[0]:.1f}; model {model_path().name}; "
        f"{args.trials} trials x {args.max_tokens} tokens; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    llm = Llama(
        model_path=str(model_path()),
        n_ctx=8192,
        n_threads=decode,
        n_threads_batch=batch,
        verbose=False,
    )
    tokens = llm.tokenize(
        render_chatml("", [ChatMessage("user", PROMPT)]).encode(), add_bos=True, special=True
    )

    rows = []
    with LocalAPIServer("llama", n_threads=args.threads) as api:
        client = anthropic.Anthropic(
            base_url=api.base_url, api_key="bench", max_retries=0, timeout=300
        )
        in_process_trial(llm, tokens, args.max_tokens)  # warm-up
        api_trial(client, args.max_tokens)
        ip, viaapi, cpu_ip, cpu_api = [], [], [], []
        for _ in range(args.trials):
            c0 = own_cpu()
            ip.append(in_process_trial(llm, tokens, args.max_tokens))
            cpu_ip.append(own_cpu() - c0)
            c0 = proc_cpu(api.proc.pid)
            viaapi.append(api_trial(client, args.max_tokens))
            cpu_api.append(proc_cpu(api.proc.pid) - c0)
    del llm
    for name, res in (("in process (llama-cpp-python)", ip), ("local API + Anthropic SDK", viaapi)):
        rates = [r[1] for r in res]
        rows.append(
            (
                name,
                statistics.median(rates),
                statistics.median(r[0] for r in res) * 1000,
                res[0][2],
                min(rates),
                max(rates),
            )
        )

    print("\n## SmolLM2 decode speed and cold TTFT (medians; tokens/s range over trials)")
    print(f"{'path':34} {'tokens/s':>9} {'range':>13} {'TTFT ms':>9} {'tokens':>7}")
    for name, tps, ttft, n, lo, hi in rows:
        print(f"{name:34} {tps:9.1f} {lo:6.1f}-{hi:<6.1f} {ttft:9.1f} {n:7d}")
    cip, capi = statistics.median(cpu_ip), statistics.median(cpu_api)
    print(
        f"CPU seconds per generation (median): in process {cip:.2f}, API server process {capi:.2f} "
        f"({(capi / cip - 1) * 100:+.1f}%; the SDK client's own CPU is not included)"
    )
    ratio = rows[1][1] / rows[0][1]
    print(
        f"API / in-process decode rate: {ratio * 100:.1f}%  (goal >= 95%: {'met' if ratio >= 0.95 else 'NOT met'})"
    )
    print(f"TTFT added by the API (median difference): {rows[1][2] - rows[0][2]:.1f} ms")

    with LocalAPIServer("sim", ttft_ms=0, itl_ms=0, reply_tokens=4) as sim:
        res = sim_ttfts(sim, args.sim_requests)
    print(
        f"\n## TTFT the API adds (sim engine, zero configured latency, {args.sim_requests} requests each)"
    )
    print(f"{'client':16} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8}")
    for name, xs in res.items():
        ms = [x * 1000 for x in xs]
        print(f"{name:16} {pct(ms, 50):8.2f} {pct(ms, 99):8.2f} {min(ms):8.2f}")
    p50 = pct([x * 1000 for x in res["anthropic SDK"]], 50)
    print(
        f"added TTFT p50 via the Anthropic SDK: {p50:.2f} ms (goal <= 10 ms: {'met' if p50 <= 10 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
