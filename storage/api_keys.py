"""API keys for the OpenAI-compatible API: stored as SHA-256 hashes, revocable."""

from __future__ import annotations

from typing import Any

from storage.accounts import USER_COLUMNS, User
from storage.db import Database, Where


def add_key(db: Database, user_id: int, name: str, key_prefix: str, key_hash: str) -> int:
    return db.write("INSERT INTO api_keys (user_id, name, key_prefix, key_hash) VALUES (?, ?, ?, ?) RETURNING id",
                    [user_id, name, key_prefix, key_hash])


def user_of_key(db: Database, key_hash: str) -> User | None:
    """The owner of a live key (not revoked, user not disabled); marks the key used, at most
    once a minute (a client calling many times a second would otherwise write on every call)."""
    row = db.query_one(
        f"SELECT k.id AS key_id, k.last_used_at < current_timestamp - INTERVAL 1 MINUTE"
        f" OR k.last_used_at IS NULL AS stale, {', '.join('u.' + c for c in USER_COLUMNS.split(', '))}"
        " FROM api_keys k JOIN users u ON u.id = k.user_id"
        " WHERE k.key_hash = ? AND k.revoked_at IS NULL AND NOT u.disabled", [key_hash])
    if row is None:
        return None
    key_id, stale = row.pop("key_id"), row.pop("stale")
    if stale:
        db.write("UPDATE api_keys SET last_used_at = current_timestamp WHERE id = ?", [key_id])
    return User(**row)


def keys_of(db: Database, user_id: int | None = None, department_id: str | None = None) -> list[dict[str, Any]]:
    """Keys without their hashes, newest first: one user's, one department's, or all."""
    where = Where()
    if user_id is not None:
        where.add("k.user_id = ?", user_id)
    if department_id is not None:
        where.add("u.department_id = ?", department_id)
    return db.query(
        "SELECT k.id, u.username, u.department_id, k.name, k.key_prefix, k.created_at, k.last_used_at, k.revoked_at"
        f" FROM api_keys k JOIN users u ON u.id = k.user_id WHERE {where.sql()} ORDER BY k.id DESC", where.params)


def key_owner(db: Database, key_id: int) -> int | None:
    return db.scalar("SELECT user_id FROM api_keys WHERE id = ?", [key_id])


def revoke(db: Database, key_id: int) -> bool:
    """True when the key was live and is now revoked."""
    return db.write("UPDATE api_keys SET revoked_at = current_timestamp WHERE id = ? AND revoked_at IS NULL"
                    " RETURNING id", [key_id]) is not None
