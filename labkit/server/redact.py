"""Keep secrets and stack traces out of what the chat API says and logs.

Notes:

1. **What is a secret.** The server key; the model API key the server holds; the value
   of every environment variable whose name says it is one (``*_KEY``, ``*_TOKEN``,
   ``*_SECRET``, ``*_PASSWORD``, e.g. ``ANTHROPIC_API_KEY``, ``LABKIT_SERVER_KEY``),
   if at least 8 characters long; anything shaped like a provider key (``sk-...``,
   ``sk-ant-...``) even when no variable holds it (an SDK error may quote the tail of a
   wrong key); and the password part of a URL (``redis://:pw@host``). Each is replaced
   by ``[redacted]``.
2. **Where it applies.** Every error body of the API (:meth:`HTTPError.body
   <labkit.server.errors.HTTPError.body>`, so JSON answers and stream error events
   alike), ``/health``'s URLs, and every log record of ``labkit serve`` (the
   :class:`RedactingFilter` sits on uvicorn's log handlers, and labkit's loggers log
   through them: :func:`log_config`).
3. **No stack traces in logs.** A record that carries an exception is logged as one
   line (the exception's type and redacted message) unless the log level is
   ``debug`` (``labkit serve --log-level debug``), where the traceback follows,
   redacted. Error bodies never carry a traceback or an exception's text: an
   unexpected error answers with a reference that the log line also names.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterable
from typing import Any

__all__ = [
    "RedactingFilter",
    "add_secret",
    "log_config",
    "redact",
    "reference",
    "secrets_from_environment",
]

REDACTED = "[redacted]"
#: Environment variable names whose values are secrets (note 1).
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD)$", re.IGNORECASE)
#: Provider key shapes: Anthropic ``sk-ant-...``, OpenAI ``sk-...``/``sk-proj-...``.
_KEY_SHAPE = re.compile(r"\bsk-[A-Za-z0-9_\-*]{6,}")
#: ``scheme://user:password@`` → the password.
_URL_PASSWORD = re.compile(r"(?<=://)([^/@\s:]*):([^/@\s]+)@")
_MIN_SECRET = 8

_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None


def add_secret(value: str | None) -> None:
    """Redact ``value`` from now on (ignored when shorter than 8 characters)."""
    global _pattern
    if value and len(value) >= _MIN_SECRET and value not in _secrets:
        _secrets.add(value)
        _pattern = re.compile(
            "|".join(re.escape(s) for s in sorted(_secrets, key=len, reverse=True))
        )


def secrets_from_environment(environ: dict[str, str] | None = None) -> Iterable[str]:
    """Values of the environment variables whose names say they are secrets (note 1)."""
    env = os.environ if environ is None else environ
    return [v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET]


def redact(text: str) -> str:
    """``text`` with every known secret, key-shaped word and URL password replaced."""
    if _pattern is not None:
        text = _pattern.sub(REDACTED, text)
    text = _KEY_SHAPE.sub(REDACTED, text)
    return _URL_PASSWORD.sub(lambda m: f"{m.group(1)}:{REDACTED}@", text)


def reference() -> str:
    """A short id that ties an error answer to its log line."""
    return secrets.token_hex(4)


class RedactingFilter(logging.Filter):
    """Redacts each record's message; drops its traceback unless debugging (note 3)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if logging.getLogger(record.name).getEffectiveLevel() <= logging.DEBUG:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            else:
                message += f" ({type(exc).__name__}: {exc}; traceback with --log-level debug)"
                record.exc_text = None
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = redact(message), None
        return True


def log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's logging configuration with redaction on its handlers, and labkit's
    loggers logging through them at ``level`` (note 2)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": f"{__name__}.RedactingFilter"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    config["loggers"]["labkit"] = {
        "handlers": ["default"],
        "level": level.upper(),
        "propagate": False,
    }
    return config
