"""Security headers of the chat API's answers.

Notes:

1. **Every answer** carries ``X-Content-Type-Options: nosniff`` (a browser never
   guesses a type other than the one sent, so a JSON body with HTML-looking text is
   never run as a page) and ``Referrer-Policy: no-referrer`` (session ids are in URLs).
2. **The chat page** carries a content security policy that lets it run its own
   inline script and style and nothing else: ``script-src`` and ``style-src`` list the
   SHA-256 of the page's own ``<script>`` and ``<style>`` elements, computed from the
   file when it is first served (so editing the page keeps the policy right);
   ``connect-src 'self'`` lets it call this API only; no plugins, frames, forms
   posted elsewhere, or base-URL changes; the page cannot be framed.
3. SSE answers keep their own ``Cache-Control: no-cache`` (:mod:`labkit.server.sse`):
   this module adds headers and never replaces one a route set.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from typing import Any

__all__ = ["COMMON_HEADERS", "SecurityHeaders", "page_csp"]

#: Headers added to every answer (note 1).
COMMON_HEADERS: dict[str, str] = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


_NONE = "'none'"


def _hashes(html: str, tag: str) -> str:
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in found
    )


@functools.cache
def page_csp(html: str) -> str:
    """The chat page's ``Content-Security-Policy``: its own script and style only (note 2)."""
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {_hashes(html, 'script') or _NONE}",
            f"style-src {_hashes(html, 'style') or _NONE}",
            "connect-src 'self'",
            "img-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class SecurityHeaders:
    """Pure ASGI middleware: adds :data:`COMMON_HEADERS` to every answer (notes 1, 3)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._extra = [(k.lower().encode(), v.encode()) for k, v in COMMON_HEADERS.items()]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self._extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
