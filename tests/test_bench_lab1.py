"""labkit.bench.lab1: Lab 1's runner (prompts × trials, streamed and not) and `labkit ttft`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import sim_header
from typer.testing import CliRunner

from labkit.bench.lab1 import Prompt, load_prompts, measure_stream, per_prompt_table, run_trials
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


def test_lab1_prompts_span_short_to_long_replies():
    prompts = load_prompts(ROOT / "data" / "lab1_prompts.jsonl")
    caps = [p.max_tokens for p in prompts]
    assert len(prompts) == 5 and caps == sorted(caps) and caps[0] <= 64 and caps[-1] >= 500


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
