"""Who is calling: password hashing, login checks and role checks, all on the server."""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import hashlib
import hmac
import secrets
import threading
import time
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


# Roles are per department: a department's employee, reviewer and admin reach that department
# only. The owner is the one company-wide grant: given by configuration (the `owners` setting),
# it passes every role check and reaches every department, and each look it takes into a
# department other than its own is an audit event. Its tools are those of its stored role.


def check_department(db: Database, user: User, department_id: str | None, action: str, **detail) -> None:
    """Refuse `action` on another department (NotAuthorized, nothing written), except for the
    owner, whose cross-department actions are audited (department_id None: all departments)."""
    if department_id is not None and department_id == user.department_id:
        return
    if not user.owner:
        raise NotAuthorized(f"{department_id or 'every department'} is not your department; "
                            f"you work for {user.department_id}.")
    audit.record(db, user.id, user.department_id, f"owner.{action}", department=department_id or "*", **detail)


API_KEY_PREFIX = "hj-"


def api_key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# Password guessing is slowed per (name, client address), with delays that grow, as OpenSSH's
# PerSourcePenalties and most identity providers do: after FREE_LOGIN_TRIES wrong passwords, a
# name can be tried again from that address only FIRST_DELAY_S, 2x, 4x ... (at most MAX_DELAY_S)
# after the last failure; tries in between are refused unchecked. Nobody locks a user out:
# another address (the user's own) is not slowed. Behind a reverse proxy the client address is
# the one it forwards (uvicorn's proxy headers, trusted from --forwarded-allow-ips).
FREE_LOGIN_TRIES = 5
FIRST_DELAY_S = 2.0
MAX_DELAY_S = 900.0
FORGET_FAILURES_S = 3600.0  # an hour without a failure starts afresh

# The client address of the login being checked (set by the server for each /login request):
# Gradio passes its auth callback the name and password only.
LOGIN_CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("login_client", default="")


@dataclass
class Auth:
    db: Database
    clock: Callable[[], float] = time.monotonic
    owners: frozenset[str] = frozenset()  # usernames granted the company-wide owner role

    def __post_init__(self) -> None:
        # Compared against when the username is unknown, so that timing does not tell
        # an attacker which part of the login was wrong.
        self._dummy_hash = hash_password(secrets.token_hex(8))
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}  # (name, address) -> (count, last)
        self._failures_lock = threading.Lock()

    def login_wait(self, username: str, client: str = "") -> float:
        """Seconds until `username` may be tried again from `client` (0: now)."""
        with self._failures_lock:
            return self._wait((username.strip().casefold(), client))

    def _wait(self, key: tuple[str, str]) -> float:
        now = self.clock()
        count, last = self._failures.get(key, (0, now))
        if count < FREE_LOGIN_TRIES or now - last > FORGET_FAILURES_S:
            return 0.0
        delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (count - FREE_LOGIN_TRIES))
        return max(0.0, last + delay - now)

    def check_login(self, username: str, password: str, client: str = "") -> bool:
        """Gradio's auth callback: True only for an enabled user with that password, tried
        from `client` (an address) while that name is not slowed down there (see FREE_LOGIN_TRIES)."""
        if not isinstance(username, str) or not isinstance(password, str):
            return False
        key = (username.strip().casefold(), client)
        with self._failures_lock:
            if self._wait(key) > 0:
                return False  # refused unchecked: a guess during the wait learns nothing
            # counted as a failure before the password is checked, so that tries sent in parallel
            # are slowed as those sent one after another; a right password takes it back
            count, last = self._failures.get(key, (0, 0.0))
            now = self.clock()
            self._failures[key] = (1 if now - last > FORGET_FAILURES_S else count + 1, now)
            if len(self._failures) > 100_000:  # a flood of names: keep the recent half
                recent = sorted(self._failures.items(), key=lambda item: item[1][1])[50_000:]
                self._failures = dict(recent)
        stored = accounts.password_hash_of(self.db, username.strip())
        ok = verify_password(password, stored or self._dummy_hash) and stored is not None
        if ok:
            with self._failures_lock:
                self._failures.pop(key, None)
        return ok

    def current_user(self, username: str | None) -> User:
        """The logged-in user behind a request; raises NotAuthorized otherwise."""
        if not username:
            raise NotAuthorized("Please log in.")
        user = accounts.find_user(self.db, username)
        if user is None or user.disabled:
            raise NotAuthorized("Your account is not active. Ask an admin.")
        return self._granted(user)

    def _granted(self, user: User) -> User:
        return dataclasses.replace(user, owner=True) if user.username in self.owners else user

    def require_role(self, username: str | None, *roles: str) -> User:
        """The user behind a request if their role is one of `roles` (the owner's always is)."""
        user = self.current_user(username)
        if user.role not in roles and not user.owner:
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
        return self._granted(user)

    def revoke_api_key(self, actor: User, key_id: int) -> None:
        """Owners revoke their own keys; admins also those of their department's users."""
        owner_id = api_keys.key_owner(self.db, int(key_id))
        owner = accounts.get_user(self.db, owner_id) if owner_id is not None else None
        allowed = owner is not None and (owner.id == actor.id or actor.owner or (
            actor.role == "admin" and owner.department_id == actor.department_id and owner.username not in self.owners))
        if not allowed:
            raise NotAuthorized(f"There is no key {key_id} you may revoke.")
        if api_keys.revoke(self.db, int(key_id)):
            audit.record(self.db, actor.id, actor.department_id, "api_key.revoke", key_id=int(key_id),
                         owner=owner.username)

    def keys_visible_to(self, actor: User) -> list[dict]:
        """Admins see their department's keys (the owner all); everyone else their own."""
        if actor.owner:
            check_department(self.db, actor, None, "read.api_keys")  # audited: every department's keys
            return api_keys.keys_of(self.db, department_id=None)
        if actor.role == "admin":  # the department's keys, not an owner's who sits in it
            return [k for k in api_keys.keys_of(self.db, department_id=actor.department_id)
                    if k["username"] not in self.owners or k["username"] == actor.username]
        return api_keys.keys_of(self.db, actor.id)
