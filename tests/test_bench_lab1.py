"""labkit.bench.lab1: Lab 1's runner (prompts × trials, streamed and not) and `labkit ttft`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import sim_header
from typer.testing import CliRunner

from labkit.bench.lab1 import (
    FLOW_LIMIT_MS,
    Prompt,
    apply_ratings,
    crossover_tokens,
    key_insight,
    load_prompts,
    measure_stream,
    per_prompt_table,
    run_trials,
    streaming_gain,
    ux_rating,
    ux_rubric,
)
from labkit.cli import app
from labkit.errors import ConfigurationError
from labkit.providers import client

ROOT = Path(__file__).resolve().parent.parent


def test_run_trials_rows_and_lab1_table(sim_api):
    clients = client("local", base_url=sim_api.base_url)
    prompts = [Prompt("a", "Say hi.", 5), Prompt("b", "Say more.", 12)]
    rows = run_trials(
        clients,
        prompts,
        trials=2,
        warmup=1,
        concurrency=2,
        progress=False,
        extra_headers=sim_header(ttft_ms=30, itl_ms=25, reply_tokens=100),
    )
    assert len(rows) == 2 * 2 * 2 and not any(r.get("error") for r in rows)
    assert {r["mode"] for r in rows} == {"stream", "non_stream"}
    table = per_prompt_table(rows)
    assert [r["prompt"] for r in table] == ["a", "b"]
    assert [r["output_tokens"] for r in table] == [5, 12]  # max_tokens caps the sim reply
    for r in table:
        # the whole reply takes (tokens - 1) x 25 ms more than its first token: 100 ms or
        # more, a margin no scheduling delay on a shared machine closes (2 ms did not)
        assert r["stream_ttft_ms"] >= 30 and r["non_stream_total_ms"] > r["stream_ttft_ms"]
        assert r["ttft_speedup"] == pytest.approx(r["non_stream_total_ms"] / r["stream_ttft_ms"])
        assert r["ux_stream"] == ux_rating(
            r["stream_ttft_ms"], r["stream_total_ms"], r["output_tokens"]
        )
        assert r["ux_non_stream"] == ux_rating(r["non_stream_total_ms"])


def test_run_trials_refuses_an_empty_prompt_list(sim_api):
    clients = client("local", base_url=sim_api.base_url)
    with pytest.raises(ConfigurationError, match="No prompts"):
        run_trials(clients, [], progress=False)


def test_load_prompts_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"id": "x", "prompt": "hi"}\n')
    with pytest.raises(ConfigurationError, match="not a prompt line") as info:
        load_prompts(bad)
    assert "max_tokens" in info.value.hint
    with pytest.raises(ConfigurationError, match="not found") as info:
        load_prompts(tmp_path / "missing.jsonl")
    assert "--prompts" in info.value.hint


def test_lab1_prompts_span_a_few_tokens_to_long_replies():
    prompts = load_prompts(ROOT / "data" / "lab1_prompts.jsonl")
    caps = [p.max_tokens for p in prompts]
    assert caps == sorted(caps) and caps[-1] >= 500
    assert caps[0] <= 20, "a reply this short is where streaming should be negligible"
    assert len([c for c in caps if 50 <= c <= 512]) >= 5, "the course's five, 50 to 500 tokens"


def _row(prompt, tokens, ttft, stream_total, whole):
    return {
        "prompt": prompt,
        "output_tokens": tokens,
        "stream_ttft_ms": ttft,
        "stream_total_ms": stream_total,
        "non_stream_total_ms": whole,
        "ttft_speedup": whole / ttft,
        "ux_stream": ux_rating(ttft, stream_total, tokens),
        "ux_non_stream": ux_rating(whole),
    }


# 100 ms to the first token, then 20 ms a token: 16, 64 and 512 tokens.
TABLE = [
    _row("short", 16, 100, 400, 400),
    _row("mid", 64, 100, 1360, 1360),
    _row("long", 512, 100, 10320, 10320),
]


@pytest.mark.parametrize(
    ("visible_ms", "rating"),
    [(0, 5), (100, 5), (101, 4), (1000, 4), (1001, 3), (3000, 3), (9999, 2), (10001, 1)],
)
def test_ux_rating_bands_on_the_wait_until_text_is_visible(visible_ms, rating):
    assert ux_rating(visible_ms) == rating


def test_ux_rating_docks_a_stream_slower_than_reading_but_not_below_one():
    assert ux_rating(50, 50 + 10_000, 100) == 5  # 10 tokens/s: faster than a reader
    assert ux_rating(50, 50 + 10_000, 20) == 4  # 2 tokens/s: the reader waits on the text
    assert ux_rating(20_000, 30_000, 10) == 1
    with pytest.raises(ConfigurationError, match="not a wait"):
        ux_rating(-1)


def test_ux_rubric_states_every_band_it_applies():
    text = ux_rubric()
    for band in ("5: 0–0.1 s", "4: 0.1–1 s", "3: 1–3 s", "2: 3–10 s", "1: over 10 s"):
        assert band in text
    assert "tokens/s" in text


def test_apply_ratings_uses_yours_where_given_and_keeps_the_rubrics_beside():
    rows = apply_ratings(TABLE, {"short": {"stream": 2, "non_stream": None}, "mid": None})
    short, mid, _ = rows
    assert short["ux_stream"] == 2 and short["rubric_stream"] == TABLE[0]["ux_stream"]
    assert short["ux_non_stream"] == short["rubric_non_stream"] == TABLE[0]["ux_non_stream"]
    assert short["rated_by"] == "you + rubric" and mid["rated_by"] == "rubric"
    assert [r["rated_by"] for r in apply_ratings(TABLE)] == ["rubric"] * 3


@pytest.mark.parametrize(
    ("mine", "message"),
    [
        ({"nope": {"stream": 3}}, "No prompt 'nope'"),
        ({"short": {"streamed": 3}}, "unknown mode"),
        ({"short": {"stream": 6}}, "not a rating"),
        ({"short": {"stream": 2.5}}, "not a rating"),
        ({"short": {"stream": True}}, "not a rating"),
    ],
)
def test_apply_ratings_rejects_what_is_not_a_rating_of_this_run(mine, message):
    with pytest.raises(ConfigurationError, match=message) as info:
        apply_ratings(TABLE, mine)
    assert info.value.hint


def test_streaming_gain_calls_a_reply_within_the_flow_limit_negligible():
    gain = {g["prompt"]: g for g in streaming_gain(TABLE)}
    assert gain["short"]["verdict"] == "negligible" and gain["short"]["saved_ms"] == 300
    assert gain["mid"]["verdict"] == gain["long"]["verdict"] == "matters"
    assert streaming_gain(TABLE, negligible_wait_ms=2000)[1]["verdict"] == "negligible"
    assert streaming_gain([{**TABLE[0], "non_stream_total_ms": None}]) == []


def test_crossover_tokens_is_where_the_fitted_wait_reaches_the_limit():
    assert crossover_tokens(TABLE) == pytest.approx((FLOW_LIMIT_MS - 80) / 20)
    slow_start = [
        _row(r["prompt"], r["output_tokens"], 2000, 0, r["non_stream_total_ms"] + 2000)
        for r in TABLE
    ]
    assert crossover_tokens(slow_start) == 0
    assert crossover_tokens(TABLE[:1]) is None


def test_key_insight_names_where_streaming_matters_and_where_it_is_negligible():
    text = " ".join(key_insight(TABLE))
    assert "matters most for long (512 output tokens)" in text
    assert "least for short (16 tokens): 300 ms saved (4.0× as a ratio)" in text
    assert "Negligible (whole reply visible within 1 s without streaming): short." in text
    assert "reaches 1 s at about 46 output tokens" in text
    assert "TTFT itself stays between 100 and 100 ms" in text
    never = " ".join(key_insight(TABLE[1:]))
    assert "never negligible" in never


def test_cli_ttft_writes_one_csv_row_per_request(sim_api, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"id": "one", "prompt": "Hi", "max_tokens": 4}\n'
        '{"id": "two", "prompt": "Hello", "max_tokens": 6}\n'
    )
    out = tmp_path / "out.csv"
    result = CliRunner().invoke(
        app,
        [
            "ttft",
            "--provider",
            "local",
            "--base-url",
            sim_api.base_url,
            "--prompts",
            str(prompts),
            "--trials",
            "2",
            "--warmup",
            "0",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "one" in result.output and "two" in result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 2 * 2
    stream = [r for r in rows if r["mode"] == "stream"]
    assert all(
        r["text_rel_ns"] and r["ttft_ms"] and r["sent_source"] == "httpx_hook" for r in stream
    )


def test_cli_ttft_reads_data_lab1_prompts_from_the_working_directory(
    sim_api, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    args = [
        "ttft",
        "--provider",
        "local",
        "--base-url",
        sim_api.base_url,
        "--trials",
        "1",
        "--warmup",
        "0",
        "--stream-only",
    ]
    missing = CliRunner().invoke(app, args)
    assert missing.exit_code == 2
    assert "data/lab1_prompts.jsonl" in missing.output and "--prompts" in missing.output
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "lab1_prompts.jsonl").write_text(
        '{"id": "here", "prompt": "Hi", "max_tokens": 3}\n'
    )
    found = CliRunner().invoke(app, args)
    assert found.exit_code == 0, found.output
    assert "here" in found.output


def test_cli_ttft_bad_cache_value_is_a_clear_error():
    result = CliRunner().invoke(app, ["ttft", "--cache", "maybe"])
    assert result.exit_code == 2
    assert "--cache must be on or off" in result.output


@pytest.mark.llama
def test_warm_prefix_cache_keeps_the_whole_prompt_in_input_tokens(llama_api):
    clients = client("local", base_url=llama_api.base_url)
    prompt = Prompt("p", "Name three colours.", 4, "You are a terse assistant. " * 20)
    cold = measure_stream(clients, prompt, cache=False)
    warm = measure_stream(clients, prompt, cache=True)
    assert cold.error is None and warm.error is None
    assert cold.cached_tokens == 0 and warm.cached_tokens > 0
    assert warm.input_tokens == cold.input_tokens, "a cache makes the prompt cheaper, not shorter"
