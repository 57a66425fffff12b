"""Who is calling: password hashing, login checks and role checks, all on the server."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from storage import accounts
from storage.accounts import User
from storage.db import Database

# scrypt: memory-hard and in the standard library. N=2**14, r=8 takes ~40 ms here,
# slow enough to make guessing expensive, fast enough for a login.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    return "scrypt${}${}${}${}${}".format(
        _SCRYPT_N, _SCRYPT_R, _SCRYPT_P,
        base64.b64encode(salt).decode(), base64.b64encode(digest).decode(),
    )


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, digest_b64 = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest_b64)
        digest = hashlib.scrypt(
            password.encode(), salt=base64.b64decode(salt_b64), n=int(n), r=int(r), p=int(p), dklen=len(expected)
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(digest, expected)


class NotAuthorized(PermissionError):
    """The caller is not logged in, or their role may not do this."""


MAX_FAILED_LOGINS = 5  # within FAILED_LOGIN_WINDOW_S, then the name is refused for as long
FAILED_LOGIN_WINDOW_S = 300.0


@dataclass
class Auth:
    db: Database
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        # Compared against when the username is unknown, so that timing does not tell
        # an attacker which part of the login was wrong.
        self._dummy_hash = hash_password(secrets.token_hex(8))
        self._failures: dict[str, deque[float]] = {}
        self._failures_lock = threading.Lock()

    def _throttled(self, key: str, now: float) -> bool:
        with self._failures_lock:
            recent = self._failures.get(key)
            while recent and now - recent[0] > FAILED_LOGIN_WINDOW_S:
                recent.popleft()
            return bool(recent) and len(recent) >= MAX_FAILED_LOGINS

    def check_login(self, username: str, password: str) -> bool:
        """Gradio's auth callback: True only for an enabled user with that password.
        After MAX_FAILED_LOGINS wrong tries in the window, the name is refused for a while,
        even with the right password (password guessing gets 5 tries per 5 minutes)."""
        if not isinstance(username, str) or not isinstance(password, str):
            return False
        key, now = username.strip().casefold(), self.clock()
        throttled = self._throttled(key, now)
        stored = accounts.password_hash_of(self.db, username.strip())
        ok = verify_password(password, stored or self._dummy_hash) and stored is not None and not throttled
        with self._failures_lock:
            if ok:
                self._failures.pop(key, None)
            elif not throttled:
                self._failures.setdefault(key, deque()).append(now)
        return ok

    def current_user(self, username: str | None) -> User:
        """The logged-in user behind a request; raises NotAuthorized otherwise."""
        if not username:
            raise NotAuthorized("Please log in.")
        user = accounts.find_user(self.db, username)
        if user is None or user.disabled:
            raise NotAuthorized("Your account is not active. Ask an admin.")
        return user

    def require_role(self, username: str | None, *roles: str) -> User:
        user = self.current_user(username)
        if user.role not in roles:
            raise NotAuthorized(f"This needs the role {' or '.join(roles)}; you are {user.role}.")
        return user

    def create_user(self, username: str, password: str, role: str, department_id: str, display_name: str | None = None) -> User:
        if len(password) < 8:
            raise ValueError("Passwords need at least 8 characters.")
        return accounts.add_user(self.db, username, hash_password(password), role, department_id, display_name)
