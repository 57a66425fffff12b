"""Named schema migrations, applied in order at start (never at import).

Add a migration by appending to MIGRATIONS; never edit one that has shipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        "0001_accounts_and_chats",
        """
        CREATE TABLE departments (
            id          VARCHAR PRIMARY KEY,          -- short slug: finance, hr
            name        VARCHAR NOT NULL,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE SEQUENCE users_id_seq;
        CREATE TABLE users (
            id             BIGINT PRIMARY KEY DEFAULT nextval('users_id_seq'),
            username       VARCHAR NOT NULL UNIQUE,
            display_name   VARCHAR NOT NULL,
            password_hash  VARCHAR NOT NULL,          -- scrypt, salted; see webapp/auth.py
            role           VARCHAR NOT NULL CHECK (role IN ('employee', 'reviewer', 'admin')),
            department_id  VARCHAR NOT NULL REFERENCES departments(id),
            disabled       BOOLEAN NOT NULL DEFAULT false,
            created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE SEQUENCE conversations_id_seq;
        CREATE TABLE conversations (
            id             BIGINT PRIMARY KEY DEFAULT nextval('conversations_id_seq'),
            user_id        BIGINT NOT NULL REFERENCES users(id),
            department_id  VARCHAR NOT NULL REFERENCES departments(id),
            title          VARCHAR NOT NULL,
            created_at     TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at     TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX conversations_user_idx ON conversations(user_id);
        CREATE SEQUENCE messages_id_seq;
        CREATE TABLE messages (
            id                 BIGINT PRIMARY KEY DEFAULT nextval('messages_id_seq'),
            conversation_id    BIGINT NOT NULL REFERENCES conversations(id),
            role               VARCHAR NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            content            VARCHAR NOT NULL,
            thinking           VARCHAR,               -- Qwen3 <think> text: logged, never shown
            model              VARCHAR,               -- base model that answered
            adapter            VARCHAR,               -- LoRA adapter name (department), NULL = base
            adapter_version    VARCHAR,
            latency_ms         DOUBLE,                -- whole answer
            ttft_ms            DOUBLE,                -- time to first token
            prompt_tokens      INTEGER,
            completion_tokens  INTEGER,
            finish_reason      VARCHAR,               -- stop, length, cancelled, error
            error              VARCHAR,
            created_at         TIMESTAMP NOT NULL DEFAULT current_timestamp
        );
        CREATE INDEX messages_conversation_idx ON messages(conversation_id);
        CREATE SEQUENCE feedback_id_seq;
        CREATE TABLE feedback (
            id          BIGINT PRIMARY KEY DEFAULT nextval('feedback_id_seq'),
            message_id  BIGINT NOT NULL REFERENCES messages(id),
            user_id     BIGINT NOT NULL REFERENCES users(id),
            rating      SMALLINT NOT NULL CHECK (rating IN (-1, 1)),   -- -1 thumbs down, 1 up
            comment     VARCHAR,
            created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            updated_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
            UNIQUE (message_id, user_id)
        );
        """,
    ),
)


def migrate(db: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied now."""
    with db.transaction() as cur:
        cur.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
        )
    done = {row["name"] for row in db.query("SELECT name FROM schema_migrations")}
    applied = []
    for migration in migrations:
        if migration.name in done:
            continue
        with db.transaction() as cur:
            cur.execute(migration.sql)
            cur.execute("INSERT INTO schema_migrations (name) VALUES (?)", [migration.name])
        log.info("applied migration %s", migration.name)
        applied.append(migration.name)
    return applied


def applied_migrations(db: Database) -> list[str]:
    return [r["name"] for r in db.query("SELECT name FROM schema_migrations ORDER BY name")]
