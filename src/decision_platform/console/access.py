"""Who may use the console, and proof that a form was posted by the console's own page.

- **Login**: when ``DP_CONSOLE_PASSWORD`` (or, failing it, ``DP_API_KEY``) is set, every page asks for it
  once; the session is a signed, expiring cookie (HttpOnly, SameSite=Strict, path ``/console``). Unset,
  the console is open and every page says so.
- **CSRF**: signed double submit. A random nonce lives in a cookie; every form carries
  HMAC(key, nonce); a POST is accepted only when the two agree and, if the browser sent an ``Origin``,
  it is this server's. Nothing is kept on the server, so it works across ``--workers``.

The signing key derives from the password, so sessions survive restarts and are shared by workers; an
open console signs CSRF tokens with a random key kept in a 0600 file beside the spool (``console.key``), so
that ``--workers N`` processes on one machine agree on it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

SESSION_COOKIE = "dp_console_session"
CSRF_COOKIE = "dp_console_csrf"
COOKIE_PATH = "/console"


class ConsoleAccess:
    """Session and CSRF tokens for one configured password (None: an open console)."""

    def __init__(
        self, password: str | None, session_hours: float = 12.0, key_file: Path | None = None
    ) -> None:
        self.password = password or None
        self.session_s = session_hours * 3600.0
        if self.password:
            self._key = hashlib.sha256(b"decision-platform console v1\0" + self.password.encode()).digest()
        else:
            self._key = shared_key(key_file) if key_file is not None else secrets.token_bytes(32)

    @property
    def open(self) -> bool:
        """No password: anyone who reaches the server may use the console."""
        return self.password is None

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()

    # --- login
    def check_password(self, given: str) -> bool:
        """Constant-time comparison with the configured password (False when the console is open)."""
        if self.password is None:
            return False
        return secrets.compare_digest(given.encode(), self.password.encode())

    def new_session(self, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + self.session_s)
        nonce = secrets.token_hex(8)
        return f"{expires}.{nonce}.{self._sign('session', f'{expires}.{nonce}')}"

    def valid_session(self, token: str | None, now: float | None = None) -> bool:
        """True for an open console, or a session token this key signed that has not expired."""
        if self.open:
            return True
        # Non-ASCII text is never a signature, and compare_digest raises TypeError on it (was a 500).
        if not token or token.count(".") != 2 or not token.isascii():
            return False
        expires, nonce, signature = token.split(".")
        if not expires.isdigit() or not secrets.compare_digest(
            signature, self._sign("session", f"{expires}.{nonce}")
        ):
            return False
        return int(expires) > (time.time() if now is None else now)

    # --- CSRF
    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(18)

    def csrf_token(self, nonce: str) -> str:
        """The token a form carries for the nonce in the browser's cookie."""
        return self._sign("csrf", nonce)

    def valid_csrf(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token or not token.isascii():
            return False
        return secrets.compare_digest(token, self.csrf_token(nonce))


def shared_key(path: Path) -> bytes:
    """The random key in ``path``, created (0600, exclusively: one process of several wins) if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    for _ in range(50):  # another process may be between creating and writing it
        text = path.read_text().strip()
        if len(text) == 64:
            return bytes.fromhex(text)
        time.sleep(0.01)
    raise RuntimeError(f"{path} does not hold a console key; delete it and restart")
