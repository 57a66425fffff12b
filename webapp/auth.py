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

from storage import accounts, api_keys, audit
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


API_KEY_PREFIX = "hj-"


def api_key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


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

    # -- API keys (the OpenAI-compatible API) ----------------------------------------------

    def create_api_key(self, user: User, name: str) -> tuple[int, str]:
        """A new key for `user`; the key itself is returned once and only its hash is kept."""
        name = " ".join(str(name or "").split())[:80] or "key"
        key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = api_keys.add_key(self.db, user.id, name, key[:len(API_KEY_PREFIX) + 6], api_key_hash(key))
        audit.record(self.db, user.id, user.department_id, "api_key.create", key_id=key_id, name=name)
        return key_id, key

    def user_for_api_key(self, key: str | None) -> User:
        """The owner of a live key; NotAuthorized for no key, an unknown or revoked key, or a
        disabled user (one message for all, so a probe learns nothing)."""
        if not key or not key.startswith(API_KEY_PREFIX) or len(key) > 200:
            raise NotAuthorized("A valid API key is needed (Authorization: Bearer hj-...).")
        user = api_keys.user_of_key(self.db, api_key_hash(key))
        if user is None:
            raise NotAuthorized("A valid API key is needed (Authorization: Bearer hj-...).")
        return user

    def revoke_api_key(self, actor: User, key_id: int) -> None:
        """Owners revoke their own keys; admins also those of their department's users."""
        owner_id = api_keys.key_owner(self.db, int(key_id))
        owner = accounts.get_user(self.db, owner_id) if owner_id is not None else None
        allowed = owner is not None and (owner.id == actor.id or (
            actor.role == "admin" and owner.department_id == actor.department_id))
        if not allowed:
            raise NotAuthorized(f"There is no key {key_id} you may revoke.")
        if api_keys.revoke(self.db, int(key_id)):
            audit.record(self.db, actor.id, actor.department_id, "api_key.revoke", key_id=int(key_id),
                         owner=owner.username)

    def keys_visible_to(self, actor: User) -> list[dict]:
        """Admins see their department's keys; everyone else their own."""
        if actor.role == "admin":
            return api_keys.keys_of(self.db, department_id=actor.department_id)
        return api_keys.keys_of(self.db, actor.id)
