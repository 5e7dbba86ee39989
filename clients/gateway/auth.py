"""Who may call what: the role each path needs, and the admin console's login sessions.

API calls carry `Authorization: Bearer KEY`. A browser cannot add that header to the
console's page loads, so the console logs in once (a form POSTs the admin key to
/admin/login) and gets an HttpOnly, SameSite=Strict session cookie scoped to /admin;
the session token is random and maps to the key server-side (a restart logs everyone
out). Neither keys nor session tokens are ever logged.
"""

from __future__ import annotations

import secrets
import time

from clients.gateway.keys import ApiKey

SESSION_COOKIE = "lego_admin_session"
PUBLIC_PATHS = ("/healthz", "/openapi.json", "/admin/login")
PUBLIC_PREFIXES = ("/admin/static/",)


def required_role(path: str) -> str | None:
    """None (anyone), "user" (any key) or "admin"."""
    if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
        return None
    if path == "/admin" or path.startswith("/admin/"):
        return "admin"
    return "user"


class Sessions:
    """Console sessions: random token -> (key, expiry). Expired ones are dropped on lookup."""

    def __init__(self, ttl_s: float, clock=time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._by_token: dict[str, tuple[ApiKey, float]] = {}

    def open(self, key: ApiKey) -> str:
        now = self._clock()
        self._by_token = {t: s for t, s in self._by_token.items() if s[1] > now}
        token = secrets.token_urlsafe(32)
        self._by_token[token] = (key, now + self.ttl_s)
        return token

    def lookup(self, token: str | None) -> ApiKey | None:
        if not token:
            return None
        session = self._by_token.get(token)
        if session is None:
            return None
        if session[1] <= self._clock():
            del self._by_token[token]
            return None
        return session[0]

    def close(self, token: str | None) -> None:
        self._by_token.pop(token or "", None)
