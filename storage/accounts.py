"""Departments and users."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from storage.db import Database, StorageError

ROLES = ("employee", "reviewer", "admin")


class DuplicateUserError(StorageError):
    pass


@dataclass(frozen=True)
class User:
    id: int
    username: str
    display_name: str
    role: str
    department_id: str
    disabled: bool
    owner: bool = False  # granted the company-wide owner role by configuration (webapp.auth)


@dataclass(frozen=True)
class Department:
    id: str
    name: str


USER_COLUMNS = "id, username, display_name, role, department_id, disabled"


def add_department(db: Database, department_id: str, name: str) -> Department:
    db.write(
        "INSERT INTO departments (id, name) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET name = excluded.name",
        [department_id, name],
    )
    return Department(department_id, name)


def list_departments(db: Database) -> list[Department]:
    return [Department(**r) for r in db.query("SELECT id, name FROM departments ORDER BY id")]


def add_user(
    db: Database,
    username: str,
    password_hash: str,
    role: str,
    department_id: str,
    display_name: str | None = None,
) -> User:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not db.scalar("SELECT count(*) FROM departments WHERE id = ?", [department_id]):
        raise StorageError(f"Department {department_id!r} does not exist; add it first.")
    try:
        user_id = db.write(
            "INSERT INTO users (username, display_name, password_hash, role, department_id)"
            " VALUES (?, ?, ?, ?, ?) RETURNING id",
            [username, display_name or username, password_hash, role, department_id],
        )
    except duckdb.ConstraintException as exc:
        if "duplicate key" in str(exc).lower():
            raise DuplicateUserError(f"A user named {username!r} already exists.") from exc
        raise StorageError(f"Could not add user {username!r}: {exc}") from exc
    return get_user(db, user_id)


def get_user(db: Database, user_id: int) -> User | None:
    row = db.query_one(f"SELECT {USER_COLUMNS} FROM users WHERE id = ?", [user_id])
    return User(**row) if row else None


def find_user(db: Database, username: str) -> User | None:
    row = db.query_one(f"SELECT {USER_COLUMNS} FROM users WHERE username = ?", [username])
    return User(**row) if row else None


def password_hash_of(db: Database, username: str) -> str | None:
    return db.scalar("SELECT password_hash FROM users WHERE username = ? AND NOT disabled", [username])


def count_users(db: Database) -> int:
    return db.scalar("SELECT count(*) FROM users")


def move_user(db: Database, user_id: int, department_id: str) -> None:
    if not db.scalar("SELECT count(*) FROM departments WHERE id = ?", [department_id]):
        raise StorageError(f"Department {department_id!r} does not exist; add it first.")
    db.write("UPDATE users SET department_id = ? WHERE id = ?", [department_id, user_id])
