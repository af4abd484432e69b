"""Sessions of the web dashboard: signed, expiring, revocable cookies and
the CSRF tokens bound to them.

A browser logs in by posting the bearer token once; it gets back a cookie
``v1.<issued_ms>.<nonce>.<mac>``, where ``mac`` is HMAC-SHA256 over the rest
under a key derived from the token and from a random secret each
``SessionSigner`` draws when it is made (so once per ``serve`` process).
The cookie is checked in constant time and refused once
``SESSION_MAX_AGE_S`` has passed since it was issued, once its session was
revoked (log out), or by any other process: a restart ends every session,
and each replica behind a load balancer has its own (route a browser to
one replica).  That is what makes log out final: the signer keeps the
nonces of the sessions revoked in its lifetime, each until the session
would have expired anyway, and no other process could accept the cookie.

Each session's CSRF token is another HMAC, over the session's random
nonce: a page puts it in a hidden field of every form, and a POST whose
field does not match its cookie's session is refused.  The standard
library's ``hmac`` does all of it; the format is four dot-separated fields,
which did not seem worth a dependency.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from typing import Callable, Dict, NamedTuple, Optional

__all__ = ["SESSION_MAX_AGE_S", "Session", "SessionSigner"]

SESSION_MAX_AGE_S = 12 * 3600
"""How long a dashboard login lasts (12 hours)."""

_VERSION = "v1"
_CLOCK_SKEW_MS = 60_000


class Session(NamedTuple):
    """A valid session: when it was issued, its CSRF token and its random
    nonce (what ``SessionSigner.revoke`` remembers)."""

    issued_ms: int
    csrf_token: str
    nonce: str


class SessionSigner:
    """Issues, checks and revokes session cookies for the bearer token
    ``token``; its sessions are good with this signer only (see the module
    notes).  ``clock`` returns wall-clock milliseconds; ``max_age_s`` bounds
    a session's life.  Thread-safe."""

    def __init__(self, token: str, clock: Callable[[], int],
                 max_age_s: int = SESSION_MAX_AGE_S) -> None:
        self._token = token.encode("utf-8")
        self._key = hmac.new(self._token, b"callbackworker dashboard session key "
                             + secrets.token_bytes(32), hashlib.sha256).digest()
        self._clock = clock
        self.max_age_s = max_age_s
        self._revoked_lock = threading.Lock()
        self._revoked: Dict[str, int] = {}  # nonce -> when its session expires (ms)

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the bearer token, compared in constant time."""
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self._token)

    def csrf_matches(self, session: Session, given: str) -> bool:
        """Whether a form's ``given`` CSRF token is ``session``'s, compared in
        constant time."""
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                   session.csrf_token.encode("ascii"))

    def issue(self) -> str:
        """A new session's cookie value."""
        body = f"{_VERSION}.{int(self._clock())}.{secrets.token_hex(16)}"
        return f"{body}.{self._mac(body)}"

    def check(self, cookie: Optional[str]) -> Optional[Session]:
        """The session ``cookie`` carries, or None if it is missing, forged,
        from another token, or expired."""
        if not cookie:
            return None
        body, _, mac = cookie.rpartition(".")
        if not hmac.compare_digest(mac.encode("ascii", "replace"),
                                   self._mac(body).encode("ascii")):
            return None
        version, issued, nonce = (body.split(".") + ["", "", ""])[:3]
        if version != _VERSION or not issued.isdigit():
            return None
        issued_ms, now = int(issued), int(self._clock())
        if not issued_ms - _CLOCK_SKEW_MS <= now < issued_ms + self.max_age_s * 1000:
            return None
        with self._revoked_lock:
            if nonce in self._revoked:
                return None
        return Session(issued_ms, self._mac(f"csrf.{nonce}"), nonce)

    def revoke(self, session: Session) -> None:
        """Ends ``session`` for good: its cookie is refused from now on.
        Revoked sessions are remembered until they would have expired."""
        now = int(self._clock())
        with self._revoked_lock:
            self._revoked = {nonce: until for nonce, until in self._revoked.items()
                             if until > now}
            self._revoked[session.nonce] = session.issued_ms + self.max_age_s * 1000

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()
