"""Who may use the chat API: the server key, and where a server may listen without one.

Notes:

1. **The key.** With ``labkit serve --api-key KEY`` (or ``LABKIT_SERVER_KEY``), every
   request but ``GET /health`` and ``GET /`` (the chat page: static HTML that holds
   nothing and must load before it can ask for the key) needs ``Authorization:
   Bearer KEY``; anything else answers 401 ``unauthorized`` (with ``WWW-Authenticate:
   Bearer``) before the request reaches a route, so nothing is read, stored or
   listed. The key is compared with :func:`hmac.compare_digest`, in time that does not
   depend on how much of it matched. ``/health`` then answers ``{"ok": true}`` only;
   its details (model API, store) are for requests with the key. ``/docs`` and
   ``/openapi.json`` need the key too (read the schema with ``curl -H``).
2. **One key, one trust domain; sessions carry no secret of their own.** Whoever holds
   the key may do everything, the session listing included: the key is the server's,
   not a user's. A per-session secret (a token returned when a session is created and
   required to read, continue or delete it) was considered and left out. It would only
   separate people who share one key; it needs a second secret that key holders do
   not have, which survives restarts and is shared by every server process on the
   store (or a store migration to keep a hash per session); and every client of the
   API (the course's, the page, notebook 04) would have to carry it beside the id. People
   who must not read each other's conversations should not share a key: run a server
   and store per person; if one server must serve several people, the fitting design is
   a key per person, with the key's id recorded as each session's owner (a store
   migration) and the listing and every session route filtered by it.
3. **A key is required off loopback.** :func:`check_binding` refuses a non-loopback
   ``--host`` without a key (a server on the network would show every conversation to
   anyone who can reach the port); ``--insecure-no-auth`` overrides it with a warning.
   A key must be 16 to 512 visible ASCII characters (it travels in a header).
4. **Loopback without a key still checks the Host header.** A web page the user
   visits cannot call ``127.0.0.1`` and read the answer (no CORS), but through DNS
   rebinding it can make its own host name resolve to ``127.0.0.1`` and then read
   every answer as same-origin. Without a key, the server therefore answers only
   requests addressed to a loopback name (``Host: 127.0.0.1:PORT``, ``localhost``,
   ``[::1]``; 403 ``host_not_allowed`` otherwise). With a key the check is moot (the
   rebinding page does not have the key); ``--insecure-no-auth`` turns it off.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from typing import Any

from ..errors import ConfigurationError
from .errors import HTTPError

__all__ = ["KEY_ENV", "KeyAuth", "check_binding", "check_key", "is_loopback"]

#: The environment variable that holds the server key.
KEY_ENV = "LABKIT_SERVER_KEY"
#: Paths answered without the key (GET and HEAD only; note 1).
OPEN_PATHS = frozenset({"/health", "/"})
_KEY_CHARS = re.compile(r"[\x21-\x7e]{16,512}")
_MAKE_KEY = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine's loopback."""
    host = host.strip().strip("[]").lower()
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key(key: str | None) -> str | None:
    """``key`` if usable (None or empty: no key), else ConfigurationError (note 3)."""
    if not key:
        return None
    if not _KEY_CHARS.fullmatch(key):
        raise ConfigurationError(
            "The server key must be 16 to 512 visible ASCII characters (no spaces).",
            hint=f"Make one with: {_MAKE_KEY}",
        )
    return key


def check_binding(host: str, key: str | None, *, insecure_no_auth: bool = False) -> str | None:
    """Refuse a non-loopback ``host`` without a key (note 3); returns the warning to
    print when ``insecure_no_auth`` lets it through, else None."""
    if key or is_loopback(host):
        return None
    if not insecure_no_auth:
        raise ConfigurationError(
            f"labkit serve will not listen on {host} without a key: anyone who can reach "
            "the port could read, continue and delete every conversation.",
            hint=(
                f"Set a key: export {KEY_ENV}=$({_MAKE_KEY}) (or --api-key KEY), and send it "
                "as 'Authorization: Bearer KEY'. Or listen on 127.0.0.1. "
                "(--insecure-no-auth serves without a key anyway.)"
            ),
        )
    return (
        f"labkit serve is listening on {host} WITHOUT a key (--insecure-no-auth): anyone "
        "who can reach this port can read, continue and delete every conversation."
    )


def _header(scope: dict[str, Any], name: bytes) -> list[bytes]:
    return [v for k, v in scope.get("headers", ()) if k == name]


def _host_name(host: bytes) -> str:
    text = host.decode("latin-1").strip()
    if text.startswith("["):  # [::1]:8000
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class KeyAuth:
    """Pure ASGI middleware: the server key (note 1) or, without one, the Host check (note 4)."""

    def __init__(self, app: Any, key: str | None, *, loopback_hosts_only: bool = True) -> None:
        self.app = app
        self.key = key.encode() if key else None
        self.loopback_hosts_only = loopback_hosts_only

    def _check(self, scope: dict[str, Any]) -> tuple[bool, HTTPError | None]:
        """``(authorized, refusal)``: whether the request holds the key (or none is
        needed), and the error to answer with instead of the app, if any."""
        if self.key is None:
            hosts = _header(scope, b"host")
            if self.loopback_hosts_only and not (
                len(hosts) == 1 and is_loopback(_host_name(hosts[0]))
            ):
                return False, HTTPError(
                    403,
                    "host_not_allowed",
                    "This server has no key, so it answers only requests addressed to "
                    "127.0.0.1 or localhost.",
                    "Use http://127.0.0.1:PORT, or start the server with a key "
                    f"({KEY_ENV} or --api-key) to reach it by another name.",
                )
            return True, None
        given = _header(scope, b"authorization")
        token = b""
        if len(given) == 1:
            scheme, _, token = given[0].strip().partition(b" ")
            token = token.strip() if scheme.lower() == b"bearer" else b""
        if token and hmac.compare_digest(token, self.key):
            return True, None
        if scope.get("method") in ("GET", "HEAD") and scope.get("path") in OPEN_PATHS:
            return False, None
        message = (
            "The key sent is not this server's key."
            if given
            else "This server needs its key: send 'Authorization: Bearer <key>'."
        )
        return False, HTTPError(
            401,
            "unauthorized",
            message,
            "Send the key labkit serve was started with (--api-key or "
            f"{KEY_ENV}) as 'Authorization: Bearer <key>'; the chat page asks for it once per tab.",
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        authorized, refusal = self._check(scope)
        scope["labkit.authorized"] = authorized
        if refusal is None:
            await self.app(scope, receive, send)
            return
        headers = {"Connection": "close"}  # the body, if any, is never read
        if refusal.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="labkit"'
        await refusal.response(headers=headers)(scope, receive, send)
