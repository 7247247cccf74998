"""labkit.exercises: every checker passes the reference solution (solutions/) and fails
each known-wrong implementation (tests/exercise_mistakes.py, the course's own code) with
the feedback that names the mistake; unfinished code is "not done yet", never an error."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from labkit.exercises import (
    CheckResult,
    check_chat_api,
    check_conversation,
    check_session_store,
    check_sliding_window,
    check_total_time,
    check_ttft,
)
from labkit.exercises.result import Finding

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import exercise_mistakes as wrong  # noqa: E402

from solutions import lab1, lab2, lab3  # noqa: E402


def _failed(result: CheckResult) -> str:
    """The text of the failed findings only."""
    return "\n".join(f.text() for f in result.failed())


# ── CheckResult ───────────────────────────────────────────────────────────────


def test_check_result_renders_as_text_markdown_and_html():
    result = CheckResult(
        passed=False,
        feedback="✘ x: y",
        name="check_x",
        findings=[Finding("x <b>", "fail", "measured 3 ms", "do this")],
    )
    assert str(result).startswith("check_x: not yet right")
    assert "hint" in result._repr_markdown_() and "&lt;b&gt;" in result._repr_markdown_()
    html = result._repr_html_()
    assert "x &lt;b&gt;" in html and "do this" in html and "not yet right" in html
    assert not result


@pytest.mark.parametrize(
    "check",
    [
        lambda: check_ttft(None),
        lambda: check_total_time(...),
        lambda: check_conversation(None),
        lambda: check_sliding_window(lambda m, t, n: ...),
        lambda: check_session_store(None, None, None),
        lambda: check_chat_api(None),
    ],
)
def test_unfinished_code_is_not_done_yet_and_does_not_raise(check):
    result = check()
    assert not result.passed and not result.attempted
    assert "not done yet" in str(result)
    assert result.findings[0].hint  # guidance


def test_a_function_raising_not_implemented_is_not_done_yet():
    def todo(*args, **kwargs):
        raise NotImplementedError

    assert not check_sliding_window(todo).attempted
    assert not check_session_store(todo, todo, todo).attempted
    assert not check_ttft(todo).attempted


# ── Lab 1: TTFT and total time against the sim ───────────────────────────────


def test_check_ttft_passes_the_reference_solution():
    result = check_ttft(lab1.ttft, seed=11)
    assert result.passed, result.feedback
    assert len(result.measured["trials"]) == 3


def test_check_ttft_passes_the_openai_reference_solution():
    result = check_ttft(lab1.ttft_openai, api="openai", seed=12)
    assert result.passed, result.feedback


@pytest.mark.parametrize(
    ("fn", "says"),
    [
        (wrong.ttft_first_event, "first *event*"),
        (wrong.ttft_seconds, "look like seconds"),
        (wrong.ttft_whole_stream, "timed the whole stream"),
        (wrong.ttft_after_send, "clock started after the request was sent"),
    ],
)
def test_check_ttft_fails_each_classic_mistake_and_names_it(fn, says):
    result = check_ttft(fn, seed=13)
    assert not result.passed and result.attempted
    assert says in _failed(result), result.feedback


def test_check_total_time_passes_the_reference_solution():
    result = check_total_time(lab1.total_time, seed=21)
    assert result.passed, result.feedback


@pytest.mark.parametrize(
    ("fn", "says"),
    [
        (wrong.total_seconds, "look like seconds"),
        (wrong.total_after_call, "did not include the request"),
        (lab1.ttft, "uses the non-streaming call"),
    ],
)
def test_check_total_time_fails_each_mistake_and_names_it(fn, says):
    result = check_total_time(fn, seed=22)
    assert not result.passed
    assert says in _failed(result), result.feedback


# ── Lab 2: ConversationManager, sliding window ───────────────────────────────


def test_check_conversation_passes_the_reference_manager():
    result = check_conversation(lambda client, model: lab2.ConversationManager(client, model))
    assert result.passed, result.feedback


def test_check_conversation_sees_a_manager_that_sends_no_history():
    result = check_conversation(wrong.ManagerNoHistory)
    assert not result.passed
    assert "turn 2 sent [u2]; expected [u1, a1, u2]" in _failed(result)


def test_check_conversation_sees_the_dangling_user_message_of_a_failed_turn():
    result = check_conversation(wrong.ManagerDanglingUser)
    failed = _failed(result)
    assert "u_failed, u4" in failed and "two user messages" in failed
    assert "turn_count does not count a failed turn: 4" in failed
    assert "turn n carries all earlier turns" not in failed


def test_check_sliding_window_passes_the_reference_solution():
    result = check_sliding_window(lab2.sliding_window)
    assert result.passed, result.feedback


def test_check_sliding_window_reports_the_course_functions_newest_first_order():
    result = check_sliding_window(wrong.window_newest_first)
    assert [f.requirement for f in result.failed()] == ["keeps chronological order"]
    assert "→ yours [u2, a2, u1, a1, u3]" in result.feedback or "→ yours [u" in result.feedback


@pytest.mark.parametrize(
    ("fn", "failed"),
    [
        (
            wrong.window_split_pairs,
            {"keeps user/assistant pairs together", "never starts with an assistant message"},
        ),
        (
            wrong.window_ignores_budget,
            {
                "stays within max_tokens unless min_turns forces more",
                "uses the budget (does not stop early)",
            },
        ),
    ],
)
def test_check_sliding_window_fails_wrong_windows_on_the_right_property(fn, failed):
    result = check_sliding_window(fn)
    assert {f.requirement for f in result.failed()} == failed, result.feedback


# ── Lab 3: the session store ─────────────────────────────────────────────────


def test_check_session_store_passes_the_reference_solution():
    result = check_session_store(lab3.save_turn, lab3.load_history, lab3.list_sessions)
    assert result.passed, result.feedback
    assert result.measured["scale_rows"] >= 100_000


def test_check_session_store_finds_the_full_scan_of_the_courses_table():
    result = check_session_store(*wrong.course_store())
    assert [f.requirement for f in result.failed()] == [
        "load_history at 100,000 messages uses an index"
    ]
    failed = _failed(result)
    assert "SCAN messages" in failed and "CREATE INDEX" in failed


def test_check_session_store_finds_a_half_saved_turn():
    result = check_session_store(wrong.save_turn_half, lab3.load_history, lab3.list_sessions)
    failed = _failed(result)
    assert [f.requirement for f in result.failed()] == [
        "a turn is saved atomically (both messages or none)"
    ]
    assert "half-saved turn" in failed


def test_check_session_store_without_list_sessions_is_unfinished_not_failed():
    result = check_session_store(lab3.save_turn, lab3.load_history, None, scale=0)
    assert not result.passed and result.attempted and not result.failed()
    assert any(f.status == "todo" for f in result.findings)


# ── Lab 4: the chat API ──────────────────────────────────────────────────────

SERVE = [
    "{python}", "-m", "labkit.cli", "serve", "--host", "127.0.0.1", "--port", "{port}",
    "--provider", "local", "--base-url", "{upstream}", "--max-retries", "0", "--no-access-log",
]  # fmt: skip


@pytest.mark.slow
def test_check_chat_api_passes_labkit_serve():
    result = check_chat_api(SERVE)
    assert result.passed, result.feedback
    assert not [f for f in result.findings if f.status == "skip"]


@pytest.mark.slow
def test_check_chat_api_fails_the_courses_server_and_says_which_requirement_and_why():
    result = check_chat_api(str(HERE / "course_chat_server.py"))
    failed = {f.requirement: f.detail for f in result.failed()}
    assert (
        "no X-Session-Id header" in failed['session_id "new" starts a session the client can name']
    )
    assert "only the new message" in failed["each turn sends the stored history"]
    assert "no stored history to survive" in failed["history survives a server restart"]
    assert "GET /sessions/{id}/history returns the conversation" in failed
    passed = {f.requirement for f in result.findings if f.status == "pass"}
    assert "an upstream error mid-stream becomes an SSE error event" in passed


@pytest.mark.slow
def test_check_chat_api_fails_a_server_that_keeps_sessions_in_memory_only_on_restart():
    result = check_chat_api(str(HERE / "memory_chat_server.py"), context=False)
    assert [f.requirement for f in result.failed()] == ["history survives a server restart"]
    assert "dies with the process" in result.failed()[0].detail


@pytest.mark.slow
def test_check_chat_api_on_a_base_url_checks_what_it_can_and_skips_the_rest(chat_sim, make_chat):
    server = make_chat(chat_sim)
    result = check_chat_api(server.url)
    assert result.passed, result.feedback
    skipped = [f.requirement for f in result.findings if f.status == "skip"]
    assert "history survives a server restart" in skipped
