"""Lab 1's runner: every prompt × trials, streamed and not, one timed row per request.

``labkit ttft`` and notebook 01 run it; :func:`per_prompt_table` turns its rows into
Lab 1's table (TTFT against total time, per prompt).

Notes:

1. **The prompts file is explicit.** :func:`load_prompts` takes a path; nothing is
   looked up relative to the installed package. ``labkit ttft`` defaults to
   :data:`DEFAULT_PROMPTS` (``data/lab1_prompts.jsonl``) in the working directory, i.e.
   a run from the top of the labkit checkout.
2. Requests are built by :class:`labkit.upstream.Request` (the one request builder):
   temperature 0, so trials of one prompt are comparable, and on labkit's local API
   the header ``x-labkit-cache: off`` unless ``cache=True``, so TTFT is measured cold
   (other servers ignore the header).
3. Streamed requests go through :func:`labkit.timing.timed` on an instrumented client
   (the request is stamped as it leaves), non-streamed ones through
   :func:`labkit.timing.timed_call`. A failed request is a row with ``error`` set, not
   an exception: the run goes on, and tables leave such rows out.
4. ``concurrency`` requests are in flight at once (a closed loop of worker threads).
5. **Lab 1 step 3's UX rating is a stated rubric, not a measurement.** :func:`ux_rating`
   maps the wait until text is visible (stream: TTFT; non-stream: the whole reply) to
   1–5 using the response-time limits usability work has long used — about 0.1 s feels
   instantaneous, about 1 s keeps the user's flow of thought, about 10 s is as long as
   attention holds — plus a 3 s step between the last two. A streamed reply loses a
   point when its text, once visible, arrives slower than a person reads
   (:data:`READING_TOKENS_PER_S`), since then the total wait shows too. The bands are
   constants here so a learner can argue with them; :func:`apply_ratings` lets them
   replace the rubric's ratings with their own.
6. **Step 5's verdict uses the absolute wait, not the speedup ratio.** A 3× speedup on
   a reply that takes a third of a second to write changes nothing a user feels.
   :func:`streaming_gain` calls streaming *negligible* for a prompt whose whole
   non-streamed reply is visible within :data:`FLOW_LIMIT_MS` (the rubric's 1 s
   step); :func:`crossover_tokens` fits total time against output tokens to say at
   what length the non-streamed wait crosses that limit.
7. **Only the cache state the server acknowledged is claimed.** labkit's local API
   echoes the state it applied in an ``x-labkit-cache`` response header (each stream
   row's ``server_cache``); other servers ignore the request header and say nothing.
   :func:`cache_report` then calls the state *unknown*, and warns when a run asked
   for a cold cache looks cached: cached prompt tokens reported, or a prompt whose
   whole non-streamed reply came back faster than its streamed first token (which a
   cold prompt cannot do: both must read the prompt first).
8. **A stream that breaks the Anthropic protocol is named, not dropped.** Every
   Messages stream starts with ``message_start`` (it carries the input tokens); a
   server that starts with another event (llama.cpp's ``llama-server`` does when a
   reply's first token is part of a multi-byte character) still streams its text, and
   the SDK's ``text_stream`` reads it without complaint. Such a row keeps its timings,
   says what the server sent first in ``protocol_error``, and :func:`protocol_report`
   warns about it (its input tokens are unknown, not zero).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import upstream
from ..errors import ConfigurationError
from ..timing import CallTiming, StreamTiming, finish, instrument, summarize, timed, timed_call

__all__ = [
    "DEFAULT_PROMPTS",
    "FLOW_LIMIT_MS",
    "READING_TOKENS_PER_S",
    "UX_BANDS",
    "Prompt",
    "apply_ratings",
    "cache_report",
    "crossover_tokens",
    "default_prompts_path",
    "key_insight",
    "load_prompts",
    "measure_call",
    "measure_stream",
    "per_prompt_table",
    "protocol_report",
    "run_trials",
    "streaming_gain",
    "ux_rating",
    "ux_rubric",
]

#: Where ``labkit ttft`` looks for prompts when ``--prompts`` is not given (note 1).
DEFAULT_PROMPTS = Path("data") / "lab1_prompts.jsonl"

#: Streaming is negligible when the whole non-streamed reply is visible within this (note 6);
#: it is also the rubric's step from 4 to 3.
FLOW_LIMIT_MS = 1000.0
#: The rubric's bands (note 5): (longest wait until text is visible, in seconds; rating).
#: A longer wait than the last band rates 1.
UX_BANDS: tuple[tuple[float, int], ...] = (
    (0.1, 5),
    (FLOW_LIMIT_MS / 1000, 4),
    (3.0, 3),
    (10.0, 2),
)
_UX_WORDS = {
    5: "feels instantaneous",
    4: "a pause, but the flow of thought holds",
    3: "a noticeable wait",
    2: "attention starts to drift",
    1: "longer than attention holds: the user wonders if it broke",
}
#: A person reads about 4 words a second, about 5 tokens of English (note 5).
READING_TOKENS_PER_S = 5.0


@dataclass
class Prompt:
    """One Lab 1 prompt."""

    id: str
    """Short name shown in tables."""
    prompt: str
    """The user message."""
    max_tokens: int
    """Cap on the reply, sized to the output length this prompt aims for."""
    system: str | None = None
    """Optional system prompt (e.g. a long shared prefix for the caching experiment)."""


def default_prompts_path() -> Path:
    """:data:`DEFAULT_PROMPTS` in the working directory (note 1)."""
    return Path.cwd() / DEFAULT_PROMPTS


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSON-lines prompts file (``id``, ``prompt``, ``max_tokens`` per line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(
            f"Prompts file not found: {p}",
            hint=f"Run from the top of the labkit checkout (it has {DEFAULT_PROMPTS}) or pass "
            "--prompts FILE (JSON lines: id, prompt, max_tokens).",
        )
    prompts = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            prompts.append(
                Prompt(str(d["id"]), str(d["prompt"]), int(d["max_tokens"]), d.get("system"))
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(
                f"{p}:{n}: not a prompt line ({exc}).",
                hint='Each line must be JSON like {"id": "short", "prompt": "...", "max_tokens": 64}.',
            ) from exc
    if not prompts:
        raise ConfigurationError(f"{p} holds no prompts.", hint="Add one JSON object per line.")
    return prompts


def _request(
    clients: Any, prompt: Prompt, cache: bool, extra_headers: dict[str, str] | None
) -> upstream.Request:
    headers = dict(extra_headers or {})
    if not cache and (
        getattr(clients, "provider", "") == "local" or getattr(clients, "base_url", None)
    ):
        # labkit's local API honours it whichever SDK reaches it (also behind
        # LABKIT_PROVIDER=anthropic|openai with a base URL); other servers ignore it.
        headers["x-labkit-cache"] = "off"
    return upstream.Request(
        clients.model,
        [{"role": "user", "content": prompt.prompt}],
        prompt.max_tokens,
        system=prompt.system or "",
        temperature=0,
        extra_headers=headers or None,
    )


def measure_stream(
    clients: Any,
    prompt: Prompt,
    *,
    api: str = "anthropic",
    cache: bool = False,
    extra_headers: dict[str, str] | None = None,
) -> StreamTiming:
    """One streamed request for ``prompt``; returns its :class:`StreamTiming` (note 3)."""
    request = _request(clients, prompt, cache, extra_headers)
    if api == "anthropic":
        source: Any = instrument(clients.anthropic).messages.stream(**request.kwargs(api))
    else:
        oc = instrument(clients.openai)
        kw = request.kwargs(api, stream=True)
        source = lambda: oc.chat.completions.create(**kw)  # noqa: E731
    ctx = timed(source)
    try:
        with ctx as stream:
            for _ in stream.text_stream:
                pass
    except Exception as exc:  # recorded in the row (``error``); the run goes on
        finish(ctx.timing, time.perf_counter_ns(), exc)
    return ctx.timing


def measure_call(
    clients: Any,
    prompt: Prompt,
    *,
    api: str = "anthropic",
    cache: bool = False,
    extra_headers: dict[str, str] | None = None,
) -> CallTiming:
    """One non-streaming request for ``prompt``; returns its :class:`CallTiming`."""
    kw = _request(clients, prompt, cache, extra_headers).kwargs(api)
    if api == "anthropic":
        return timed_call(clients.anthropic.messages.create, **kw)[1]
    return timed_call(clients.openai.chat.completions.create, **kw)[1]


def run_trials(
    clients: Any,
    prompts: Sequence[Prompt],
    *,
    trials: int = 3,
    warmup: int = 1,
    concurrency: int = 1,
    cache: bool = False,
    api: str | None = None,
    non_stream: bool = True,
    extra_headers: dict[str, str] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every prompt ``trials`` times streamed (and, with ``non_stream``, not
    streamed), after ``warmup`` unrecorded requests; ``concurrency`` requests in
    flight at once (a closed loop of worker threads). One row per request: the
    prompt, mode, trial, settings and every field of :meth:`StreamTiming.row`."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if trials < 1 or warmup < 0 or concurrency < 1:
        raise ConfigurationError(
            f"trials={trials}, warmup={warmup}, concurrency={concurrency} is not a run.",
            hint="Use trials >= 1, warmup >= 0 and concurrency >= 1.",
        )
    if not prompts:
        raise ConfigurationError("No prompts to run.", hint="Pass at least one Prompt.")
    api = api or ("openai" if getattr(clients, "provider", "") == "openai" else "anthropic")
    if api not in ("anthropic", "openai"):
        raise ConfigurationError(f"Unknown API {api!r}.", hint="Use api='anthropic' or 'openai'.")
    for i in range(warmup):
        measure_stream(
            clients, prompts[i % len(prompts)], api=api, cache=cache, extra_headers=extra_headers
        )
    jobs = [
        (t, p, mode)
        for t in range(trials)
        for p in prompts
        for mode in (("stream", "non_stream") if non_stream else ("stream",))
    ]
    base = {
        "provider": getattr(clients, "provider", ""),
        "model": getattr(clients, "model", ""),
        "api": api,
        "cache": "on" if cache else "off",
        "concurrency": concurrency,
    }

    def one(job: tuple[int, Prompt, str]) -> dict[str, Any]:
        trial, prompt, mode = job
        row: dict[str, Any] = {
            **base,
            "prompt_id": prompt.id,
            "max_tokens": prompt.max_tokens,
            "trial": trial,
            "mode": mode,
            "error": "",
        }
        if mode == "stream":
            timing = measure_stream(
                clients, prompt, api=api, cache=cache, extra_headers=extra_headers
            )
            row.update(timing.row())
            row["protocol_error"] = _protocol_lapse(timing)
        else:
            try:
                row.update(
                    measure_call(
                        clients, prompt, api=api, cache=cache, extra_headers=extra_headers
                    ).row()
                )
            except Exception as exc:
                row["error"] = type(exc).__name__
        row["api"] = api
        return row

    bar = tqdm(total=len(jobs), desc=f"ttft ×{concurrency}", disable=not progress, leave=False)
    rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for row in pool.map(one, jobs):
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def per_prompt_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lab 1's table from :func:`run_trials` rows: per prompt, medians and p10/p90 of
    stream TTFT, stream total and non-stream total; output tokens (median) and the
    TTFT speedup (non-stream total / stream TTFT, medians); the rubric's UX rating of
    each mode's medians (``ux_stream``, ``ux_non_stream``; note 5)."""
    order: list[str] = []
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("error"):
            continue
        if r["prompt_id"] not in by:
            order.append(r["prompt_id"])
        by.setdefault(r["prompt_id"], []).append(r)
    table = []
    for pid in order:
        rs = by[pid]
        stream = [r for r in rs if r["mode"] == "stream"]
        plain = [r for r in rs if r["mode"] == "non_stream"]
        ttft = summarize(r.get("ttft_ms") for r in stream)
        total = summarize(r.get("e2e_ms") for r in stream)
        nst = summarize(r.get("e2e_ms") for r in plain)
        toks = summarize(r.get("output_tokens") for r in stream)
        itl = summarize(r.get("itl_p50_ms") for r in stream)
        speedup = (nst["median"] / ttft["median"]) if nst["median"] and ttft["median"] else None
        table.append(
            {
                "prompt": pid,
                "output_tokens": toks["median"],
                "stream_ttft_ms": ttft["median"],
                "stream_ttft_p10": ttft["p10"],
                "stream_ttft_p90": ttft["p90"],
                "stream_total_ms": total["median"],
                "stream_total_p10": total["p10"],
                "stream_total_p90": total["p90"],
                "non_stream_total_ms": nst["median"],
                "non_stream_total_p10": nst["p10"],
                "non_stream_total_p90": nst["p90"],
                "ttft_speedup": speedup,
                "itl_p50_ms": itl["median"],
                "ux_stream": None
                if ttft["median"] is None
                else ux_rating(ttft["median"], total["median"], toks["median"]),
                "ux_non_stream": None if nst["median"] is None else ux_rating(nst["median"]),
                "n": ttft["n"],
            }
        )
    return table


# ── Lab 1 steps 3 and 5: UX rating and the key insight (notes 5 and 6) ─────────────


def ux_rating(
    visible_ms: float, total_ms: float | None = None, output_tokens: float | None = None
) -> int:
    """The rubric's 1–5 rating (note 5) of a reply whose text became visible after
    ``visible_ms`` and finished after ``total_ms`` with ``output_tokens`` tokens. A
    non-streamed reply is visible only when it is complete: pass its total as
    ``visible_ms`` alone."""
    if visible_ms is None or visible_ms < 0:
        raise ConfigurationError(
            f"visible_ms={visible_ms!r} is not a wait.",
            hint="Pass the milliseconds until text was visible (TTFT, or the total if not streamed).",
        )
    rating = next((r for limit_s, r in UX_BANDS if visible_ms <= limit_s * 1000), 1)
    streaming_s = ((total_ms or 0.0) - visible_ms) / 1000  # text arriving, once visible
    if output_tokens and streaming_s > 0 and output_tokens / streaming_s < READING_TOKENS_PER_S:
        rating = max(rating - 1, 1)
    return rating


def ux_rubric() -> str:
    """The rubric :func:`ux_rating` applies, in words (built from its constants)."""
    lines = ["Rubric: wait until text is visible (streamed: TTFT; not streamed: the total)"]
    low = 0.0
    for limit_s, rating in UX_BANDS:
        lines.append(f"  {rating}: {low:g}–{limit_s:g} s, {_UX_WORDS[rating]}")
        low = limit_s
    lines.append(f"  1: over {low:g} s, {_UX_WORDS[1]}")
    lines.append(
        f"  streamed only: one point off (not below 1) if the text, once visible, arrives "
        f"slower than a person reads ({READING_TOKENS_PER_S:g} tokens/s)"
    )
    return "\n".join(lines)


def apply_ratings(
    table: Sequence[dict[str, Any]], mine: dict[str, dict[str, int | None]] | None = None
) -> list[dict[str, Any]]:
    """Per prompt of :func:`per_prompt_table`: the UX ratings to use — yours from
    ``mine`` (``{prompt id: {"stream": 1–5 or None, "non_stream": 1–5 or None}}``)
    where given, else the rubric's — with ``rated_by`` saying whose, and the rubric's
    own ratings alongside (``rubric_stream``, ``rubric_non_stream``)."""
    mine = mine or {}
    ids = [r["prompt"] for r in table]
    for pid, modes in mine.items():
        if pid not in ids:
            raise ConfigurationError(
                f"No prompt {pid!r} in this run.", hint=f"Rate one of: {', '.join(ids)}."
            )
        for mode, value in (modes or {}).items():
            if mode not in ("stream", "non_stream"):
                raise ConfigurationError(
                    f"{pid}: unknown mode {mode!r}.", hint='Use the keys "stream" and "non_stream".'
                )
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5
            ):
                raise ConfigurationError(
                    f"{pid} {mode}: {value!r} is not a rating.",
                    hint="Use a whole number from 1 (bad) to 5 (great), or None.",
                )
    out = []
    for r in table:
        yours = mine.get(r["prompt"]) or {}
        row: dict[str, Any] = {"prompt": r["prompt"]}
        by = set()
        for mode in ("stream", "non_stream"):
            rubric = r.get(f"ux_{mode}")
            value = yours.get(mode)
            row[f"ux_{mode}"] = rubric if value is None else value
            row[f"rubric_{mode}"] = rubric
            by.add("rubric" if value is None else "you")
        row["rated_by"] = " + ".join(sorted(by, reverse=True))
        out.append(row)
    return out


def streaming_gain(
    table: Sequence[dict[str, Any]], *, negligible_wait_ms: float = FLOW_LIMIT_MS
) -> list[dict[str, Any]]:
    """Per prompt: the wait streaming removes (``saved_ms`` = non-stream total − stream
    TTFT), the TTFT speedup, and a ``verdict``: "negligible" when the whole non-streamed
    reply is visible within ``negligible_wait_ms``, else "matters" (note 6). Prompts
    without both modes are left out."""
    out = []
    for r in table:
        ttft, whole = r.get("stream_ttft_ms"), r.get("non_stream_total_ms")
        if ttft is None or whole is None:
            continue
        out.append(
            {
                "prompt": r["prompt"],
                "output_tokens": r["output_tokens"],
                "stream_ttft_ms": ttft,
                "non_stream_total_ms": whole,
                "saved_ms": whole - ttft,
                "ttft_speedup": r.get("ttft_speedup"),
                "verdict": "negligible" if whole <= negligible_wait_ms else "matters",
            }
        )
    return out


def crossover_tokens(
    table: Sequence[dict[str, Any]], *, wait_ms: float = FLOW_LIMIT_MS
) -> float | None:
    """Output tokens at which the non-streamed wait reaches ``wait_ms``, from a straight
    line fitted through (output tokens, non-stream total) of every prompt: below it,
    streaming is negligible (note 6). 0 when even an empty reply waits longer; None
    when the data cannot say (fewer than two lengths, or time not growing with length)."""
    pts = [
        (float(r["output_tokens"]), float(r["non_stream_total_ms"]))
        for r in table
        if r.get("output_tokens") is not None and r.get("non_stream_total_ms") is not None
    ]
    if len({x for x, _ in pts}) < 2:
        return None
    slope, intercept = statistics.linear_regression([x for x, _ in pts], [y for _, y in pts])
    if slope <= 0:
        return None
    return max((wait_ms - intercept) / slope, 0.0)


def key_insight(
    table: Sequence[dict[str, Any]], *, negligible_wait_ms: float = FLOW_LIMIT_MS
) -> list[str]:
    """Lab 1 step 5 in sentences, computed from :func:`per_prompt_table`: where streaming
    matters most, where it is negligible, and the output length between the two."""
    gain = streaming_gain(table, negligible_wait_ms=negligible_wait_ms)
    if not gain:
        return ["No prompt ran both streamed and not streamed: nothing to compare."]
    most = max(gain, key=lambda g: g["saved_ms"])
    least = min(gain, key=lambda g: g["saved_ms"])
    limit = f"{negligible_wait_ms / 1000:g} s"
    out = [
        f"Streaming matters most for {most['prompt']} ({most['output_tokens']:.0f} output "
        f"tokens): text after {most['stream_ttft_ms']:.0f} ms instead of "
        f"{most['non_stream_total_ms']:.0f} ms, {most['saved_ms'] / 1000:.1f} s less blank screen.",
        f"It matters least for {least['prompt']} ({least['output_tokens']:.0f} tokens): "
        f"{least['saved_ms']:.0f} ms saved ({least['ttft_speedup']:.1f}× as a ratio).",
    ]
    small = [g["prompt"] for g in gain if g["verdict"] == "negligible"]
    if small:
        out.append(
            f"Negligible (whole reply visible within {limit} without streaming): {', '.join(small)}."
        )
    else:
        out.append(f"No prompt's non-streamed reply arrives within {limit}: never negligible here.")
    ttfts = [g["stream_ttft_ms"] for g in gain]
    out.append(
        f"TTFT itself stays between {min(ttfts):.0f} and {max(ttfts):.0f} ms whatever the length."
    )
    cross = crossover_tokens(table, wait_ms=negligible_wait_ms)
    if cross is None:
        out.append("The data cannot place a crossover length (time does not grow with length).")
    elif cross == 0:
        out.append(
            f"A straight line through the non-streamed totals starts above {limit} even at "
            f"zero output tokens: here streaming helps at every length."
        )
    else:
        out.append(
            f"A straight line through the non-streamed totals reaches {limit} at about "
            f"{cross:.0f} output tokens: the trend's estimate of where streaming starts to "
            f"matter (single prompts scatter around it; the table has them)."
        )
    return out


def _protocol_lapse(timing: StreamTiming) -> str:
    """What an Anthropic stream sent instead of starting with ``message_start`` (note 8),
    or ""."""
    if timing.api != "anthropic" or not timing.events:
        return ""
    if any(e.type == "message_start" for e in timing.events):
        return ""
    return f"{timing.events[0].type} before any message_start"


def protocol_report(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Warnings about streams whose server broke the Anthropic streaming protocol (note 8)."""
    broken = [r for r in rows if r.get("protocol_error")]
    if not broken:
        return []
    streams = sum(1 for r in rows if r.get("mode") == "stream")
    firsts = ", ".join(sorted({str(r["protocol_error"]) for r in broken}))
    return [
        f"{len(broken)} of {streams} stream(s) broke the Anthropic streaming protocol: the "
        f"server sent {firsts} (every Messages stream starts with message_start). Their text "
        "and timings are kept; their input tokens are unknown. That is the server's bug "
        "(llama.cpp's llama-server does it when a reply starts inside a multi-byte character)."
    ]


def cache_report(rows: Sequence[dict[str, Any]], *, cache: bool) -> tuple[str, list[str]]:
    """``(state, warnings)`` for a run of :func:`run_trials` rows (note 7).

    ``state`` is what may be claimed: ``"off"``/``"on"`` when every answering stream
    row's server acknowledged it, else ``"on/off requested, unknown (the server did not
    acknowledge x-labkit-cache)"``. ``warnings`` say why a cold run looks cached.
    """
    asked = "on" if cache else "off"
    acks = {
        r.get("server_cache") or ""
        for r in rows
        if r.get("mode") == "stream" and not r.get("error")
    }
    warnings: list[str] = []
    if acks == {asked}:
        state = asked
    elif acks and "" not in acks:
        state = f"{asked} requested, but the server applied {'/'.join(sorted(acks))}"
        warnings.append(
            f"The server answered x-labkit-cache: {'/'.join(sorted(acks))} to a request for {asked}."
        )
    else:
        state = f"{asked} requested, unknown (the server did not acknowledge x-labkit-cache)"
    if not cache and state != "off":
        cached = [r for r in rows if (r.get("cached_tokens") or 0) > 0 and not r.get("error")]
        if cached:
            warnings.append(
                f"{len(cached)} request(s) reported cached prompt tokens: this cold run was "
                "partly served from the server's prompt cache."
            )
        fast = [
            t["prompt"]
            for t in per_prompt_table(rows)
            if t["ttft_speedup"] is not None and t["ttft_speedup"] < 1
        ]
        if fast:
            warnings.append(
                f"Prompt(s) {', '.join(fast)}: the whole non-streamed reply came faster than the "
                "streamed first token, which a cold prompt cannot do: the server likely reused "
                "a cached prompt prefix. Treat TTFT here as warm, or use a server that honours "
                "x-labkit-cache (labkit local-api)."
            )
    return state, warnings
