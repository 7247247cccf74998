"""The `labkit local-api` command itself: what a user types, in a subprocess."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anthropic
import pytest
from helpers import USER

from labkit.localapi import MODEL_ID


@contextmanager
def local_api(*flags: str) -> Iterator[str]:
    proc = subprocess.Popen(  # --port 0: the listening line names the port it got
        [sys.executable, "-m", "labkit.cli", "local-api", "--port", "0", *flags],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        line = ""
        while time.monotonic() < deadline and "Ctrl+C" not in line:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                raise AssertionError(f"labkit local-api exited {proc.returncode}")
        url = re.search(r"http://127\.0\.0\.1:\d+", line)
        assert url, line
        yield url.group(0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_sim_flags_set_latency_length_and_a_mid_stream_fault():
    with local_api(
        "--engine",
        "sim",
        "--ttft-ms",
        "40",
        "--itl-ms",
        "1",
        "--reply-tokens",
        "6",
        "--fail-after",
        "3",
        "--fail-with",
        "api_error",
    ) as url:
        client = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)
        texts: list[str] = []
        t0 = time.perf_counter()
        with (
            pytest.raises(anthropic.APIStatusError),
            client.messages.stream(model=MODEL_ID, max_tokens=50, messages=USER) as stream,
        ):
            for text in stream.text_stream:
                texts.append(text)
                if len(texts) == 1:
                    assert time.perf_counter() - t0 >= 0.040
        assert len(texts) == 3


def test_unknown_engine_says_which_engines_exist():
    r = subprocess.run(
        [sys.executable, "-m", "labkit.cli", "local-api", "--engine", "gpt9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "--engine llama or --engine sim" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.llama
def test_no_cache_flag_turns_prefix_caching_off_for_every_request():
    with local_api("--engine", "llama", "--no-cache") as url:
        client = anthropic.Anthropic(base_url=url, api_key="local", max_retries=0)
        usages = [
            client.messages.create(
                model=MODEL_ID, max_tokens=4, messages=USER, extra_body={"temperature": 0}
            ).usage
            for _ in range(2)
        ]
    assert usages[0].input_tokens == usages[1].input_tokens > 0
    assert not usages[1].cache_read_input_tokens


@pytest.mark.llama
def test_flash_attention_is_on_by_default_and_the_flag_turns_it_off():
    import llama_cpp

    from labkit.localapi.engine import make_engine
    from labkit.localapi.options import build_parser, options_from_args

    for flags, wanted in (
        ([], llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED),
        (["--flash-attn", "off"], llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED),
    ):
        engine, opts = options_from_args(build_parser().parse_args(["--engine", "llama", *flags]))
        llm = make_engine(engine, **opts).llm
        assert llm.context_params.flash_attn_type == wanted, flags


# ── the flags, defined once (labkit.localapi.options) ─────────────────────────


def test_help_explains_every_flag_the_same_for_labkit_and_python_m():
    from dataclasses import fields

    from labkit.localapi.sim import SimOptions

    helps = [
        subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        for cmd in (
            [sys.executable, "-m", "labkit.cli", "local-api", "--help"],
            [sys.executable, "-m", "labkit.localapi", "--help"],
        )
    ]
    flags = ["--engine", "--host", "--port", "--no-cache", "--n-threads", "--flash-attn"]
    flags += ["--" + f.name.replace("_", "-") for f in fields(SimOptions)]
    for text in helps:
        for flag in flags:
            assert re.search(rf"^\s+{flag}\b.*\S", text, re.MULTILINE), (
                f"{flag} is not explained:\n{text}"
            )
    assert helps[0].split("options:")[1] == helps[1].split("options:")[1]  # one parser for both


def test_local_api_server_options_become_the_flags_that_give_them_back():
    from labkit.localapi.options import build_parser, option_args, options_from_args

    for engine, opts in (
        ("sim", {"ttft_ms": 5.0, "reply_tokens": 3, "fail_before": "rate_limit_error"}),
        ("llama", {"cache": False, "n_threads": 2}),
        ("llama", {"flash_attn": False}),
        ("llama", {"flash_attn": True}),
    ):
        args = build_parser().parse_args(option_args(engine, opts))
        assert options_from_args(args) == (engine, opts)


def test_flags_of_the_other_engine_are_named_in_the_error():
    from labkit.errors import ConfigurationError
    from labkit.localapi.options import build_parser, options_from_args

    with pytest.raises(ConfigurationError, match="--ttft-ms") as exc:
        options_from_args(build_parser().parse_args(["--engine", "llama", "--ttft-ms", "5"]))
    assert "--engine sim" in exc.value.hint
    with pytest.raises(ConfigurationError, match="--no-cache") as exc:
        options_from_args(build_parser().parse_args(["--engine", "sim", "--no-cache"]))
    assert "--engine llama" in exc.value.hint


def test_every_way_to_name_an_engine_rejects_an_unknown_one_alike():
    from labkit.errors import ConfigurationError
    from labkit.localapi import LocalAPIServer
    from labkit.localapi.engine import make_engine
    from labkit.localapi.options import build_parser, options_from_args

    attempts = [
        lambda: LocalAPIServer("gpt9"),
        lambda: make_engine("gpt9"),
        lambda: options_from_args(build_parser().parse_args(["--engine", "gpt9"])),
    ]
    for attempt in attempts:
        with pytest.raises(ConfigurationError, match="Unknown engine 'gpt9'") as exc:
            attempt()
        assert exc.value.hint == "Use --engine llama or --engine sim."
