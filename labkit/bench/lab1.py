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
"""

from __future__ import annotations

import json
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
    "Prompt",
    "default_prompts_path",
    "load_prompts",
    "measure_call",
    "measure_stream",
    "per_prompt_table",
    "run_trials",
]

#: Where ``labkit ttft`` looks for prompts when ``--prompts`` is not given (note 1).
DEFAULT_PROMPTS = Path("data") / "lab1_prompts.jsonl"


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
            row.update(
                measure_stream(
                    clients, prompt, api=api, cache=cache, extra_headers=extra_headers
                ).row()
            )
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
    TTFT speedup (non-stream total / stream TTFT, medians)."""
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
                "n": ttft["n"],
            }
        )
    return table
