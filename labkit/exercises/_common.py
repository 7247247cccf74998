"""What every checker shares: calling the learner's code safely, and the sim it runs against."""

from __future__ import annotations

import os
import threading
import traceback
from typing import Any

from ..errors import ConfigurationError

__all__ = [
    "NotDone",
    "call_learner",
    "describe_error",
    "is_placeholder",
    "make_client",
    "shared_sim",
    "sim_requests",
]

MODEL = "smollm2-135m-instruct"
API_KEY = "labkit-exercise"


class NotDone(Exception):
    """The learner's code is not written yet (NotImplementedError, ``...`` or ``None``)."""


def is_placeholder(obj: Any) -> bool:
    """True for what a starter cell leaves in place of code: ``None`` or ``...``."""
    return obj is None or obj is Ellipsis


def call_learner(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn``; raise :class:`NotDone` for unfinished code, else return its value.

    A function whose body is only ``...`` (or ``pass``) returns None: that is unfinished
    too. Any other exception propagates for the checker to describe.
    """
    if is_placeholder(fn):
        raise NotDone()
    try:
        value = fn(*args, **kwargs)
    except NotImplementedError:
        raise NotDone() from None
    if is_placeholder(value):
        raise NotDone()
    return value


def _library_file(filename: str) -> bool:
    import sysconfig

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sysconfig.get_paths()
    roots = (here, paths["stdlib"], paths["purelib"], paths["platlib"])
    return "site-packages" in filename or filename.startswith(roots)


def describe_error(exc: BaseException) -> str:
    """``TypeError: ... (line 12, in ttft)`` — the exception and where in the learner's code."""
    where = ""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if not _library_file(frame.filename):
            where = f" (line {frame.lineno}, in {frame.name})"
            break
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' + text[:300] if text else ''}{where}"


_sim_lock = threading.Lock()
_sim: Any = None


def shared_sim() -> Any:
    """One sim-engine local API for this process's checkers, started on first use.

    Its defaults are zero latency; each checker sets the truth per request with the
    ``x-labkit-sim`` header. Stopped at exit (LocalAPIServer registers that itself).
    """
    global _sim
    from ..localapi import LocalAPIServer

    with _sim_lock:
        if _sim is None or not _sim.running:
            _sim = LocalAPIServer("sim", ttft_ms=0, itl_ms=0).start()
        return _sim


def make_client(
    api: str,
    server: Any,
    sim_header: str | None = None,
    *,
    max_retries: int = 0,
    hooks: list[Any] | None = None,
) -> Any:
    """An SDK client pointed at ``server`` (a LocalAPIServer), with the sim header set.

    ``hooks`` are httpx request event hooks added to the SDK's own HTTP client (a
    checker uses one to switch a fault on and off between the learner's calls).
    """
    headers = {"x-labkit-sim": sim_header} if sim_header else None
    if api == "anthropic":
        import anthropic

        client: Any = anthropic.Anthropic(
            base_url=server.base_url,
            api_key=API_KEY,
            max_retries=max_retries,
            default_headers=headers,
        )
    elif api == "openai":
        import openai

        client = openai.OpenAI(
            base_url=server.openai_base_url,
            api_key=API_KEY,
            max_retries=max_retries,
            default_headers=headers,
        )
    else:
        raise ConfigurationError(f"Unknown api {api!r}.", hint="Use api='anthropic' or 'openai'.")
    if hooks:
        http = client._client
        http.event_hooks = {
            "request": [*http.event_hooks["request"], *hooks],
            "response": list(http.event_hooks["response"]),
        }
    return client


def sim_requests(server: Any, marker: str) -> list[dict[str, Any]] | None:
    """Requests the sim received whose body mentions ``marker``, oldest first.

    None when the server cannot report what it received (an older local API).
    """
    reader = getattr(server, "requests", None)
    if reader is None:
        return None
    try:
        entries = reader()
    except Exception:
        return None
    import json

    return [e for e in entries if marker in json.dumps(e.get("body"), ensure_ascii=False)]
