"""API keys for the OpenAI-compatible API: stored as SHA-256 hashes, revocable."""

from __future__ import annotations

from typing import Any

from storage.accounts import USER_COLUMNS, User
from storage.db import Database


def add_key(db: Database, user_id: int, name: str, key_prefix: str, key_hash: str) -> int:
    return db.write("INSERT INTO api_keys (user_id, name, key_prefix, key_hash) VALUES (?, ?, ?, ?) RETURNING id",
                    [user_id, name, key_prefix, key_hash])


def user_of_key(db: Database, key_hash: str) -> User | None:
    """The owner of a live key (not revoked, user not disabled); marks the key used."""
    row = db.query_one(
        f"SELECT k.id AS key_id, {', '.join('u.' + c for c in USER_COLUMNS.split(', '))} FROM api_keys k"
        " JOIN users u ON u.id = k.user_id WHERE k.key_hash = ? AND k.revoked_at IS NULL AND NOT u.disabled",
        [key_hash])
    if row is None:
        return None
    db.write("UPDATE api_keys SET last_used_at = current_timestamp WHERE id = ?", [row.pop("key_id")])
    return User(**row)


def keys_of(db: Database, user_id: int | None = None) -> list[dict[str, Any]]:
    """Keys without their hashes, newest first; all users' when user_id is None."""
    where, params = ("WHERE k.user_id = ?", [user_id]) if user_id is not None else ("", [])
    return db.query(
        "SELECT k.id, u.username, u.department_id, k.name, k.key_prefix, k.created_at, k.last_used_at, k.revoked_at"
        f" FROM api_keys k JOIN users u ON u.id = k.user_id {where} ORDER BY k.id DESC", params)


def key_owner(db: Database, key_id: int) -> int | None:
    return db.scalar("SELECT user_id FROM api_keys WHERE id = ?", [key_id])


def revoke(db: Database, key_id: int) -> bool:
    """True when the key was live and is now revoked."""
    return db.write("UPDATE api_keys SET revoked_at = current_timestamp WHERE id = ? AND revoked_at IS NULL"
                    " RETURNING id", [key_id]) is not None
