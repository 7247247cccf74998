"""Names and numbers of the local API that other modules need without starting it.

This module imports nothing, so ``from labkit.localapi.constants import MODEL_ID``
costs nothing (``labkit.providers`` does that for its default model id) — the
package's ``__init__`` loads the server, the app and the engines only on first use.
"""

from __future__ import annotations

__all__ = ["CONTEXT_WINDOW", "DEFAULT_HOST", "DEFAULT_PORT", "ENGINES", "MODEL_ID"]

#: The id the local API serves its model under.
MODEL_ID = "smollm2-135m-instruct"
#: SmolLM2-135M-Instruct's context window, in tokens.
CONTEXT_WINDOW = 8192
#: The engines the local API can run (the first is the default).
ENGINES = ("llama", "sim")
#: Interface ``labkit local-api`` listens on by default.
DEFAULT_HOST = "127.0.0.1"
#: Port ``labkit local-api`` listens on by default (0 picks a free one).
DEFAULT_PORT = 8765
