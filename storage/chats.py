"""Conversations, messages and feedback."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Sequence

from storage.db import Database


@dataclass(frozen=True)
class Conversation:
    id: int
    user_id: int
    department_id: str
    title: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    role: str
    content: str
    model: str | None
    adapter: str | None
    adapter_version: str | None
    created_at: dt.datetime
    tool_call_id: str | None = None  # on role='tool': the call it answers
    rating: int | None = None  # the conversation owner's feedback on this message
    finish_reason: str | None = None  # on role='assistant': why generation ended ("degenerate": it was cut)


_CONVERSATION_COLUMNS = "id, user_id, department_id, title, created_at, updated_at"


def create_conversation(db: Database, user_id: int, department_id: str, title: str) -> Conversation:
    conversation_id = db.write(
        "INSERT INTO conversations (user_id, department_id, title) VALUES (?, ?, ?) RETURNING id",
        [user_id, department_id, title],
    )
    return get_conversation(db, conversation_id)


def get_conversation(db: Database, conversation_id: int) -> Conversation | None:
    row = db.query_one(f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE id = ?", [conversation_id])
    return Conversation(**row) if row else None


def list_conversations(db: Database, user_id: int, limit: int = 100) -> list[Conversation]:
    rows = db.query(
        f"SELECT {_CONVERSATION_COLUMNS} FROM conversations WHERE user_id = ?"
        " ORDER BY updated_at DESC, id DESC LIMIT ?",
        [user_id, limit],
    )
    return [Conversation(**r) for r in rows]


_MESSAGE_FIELDS = {
    "thinking", "model", "adapter", "adapter_version", "latency_ms", "ttft_ms",
    "prompt_tokens", "completion_tokens", "finish_reason", "error", "tool_call_id", "cache_entry_id",
}


def _insert_message(cur, conversation_id: int, role: str, content: str, fields: dict[str, Any]) -> int:
    unknown = set(fields) - _MESSAGE_FIELDS
    if unknown:
        raise ValueError(f"unknown message fields: {sorted(unknown)}")
    columns = ["conversation_id", "role", "content", *fields]
    cur.execute(
        f"INSERT INTO messages ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) RETURNING id",
        [conversation_id, role, content, *fields.values()],
    )
    return cur.fetchone()[0]


def add_message(db: Database, conversation_id: int, role: str, content: str, **fields: Any) -> int:
    """Insert a message and touch its conversation, atomically; returns the message id."""
    with db.transaction() as cur:
        message_id = _insert_message(cur, conversation_id, role, content, fields)
        cur.execute("UPDATE conversations SET updated_at = current_timestamp WHERE id = ?", [conversation_id])
    return message_id


def start_conversation(db: Database, user_id: int, department_id: str, title: str,
                       messages: Sequence[tuple[str, str, dict[str, Any]]]) -> tuple[int, list[int]]:
    """A new conversation with its first (role, content, fields) messages in one
    transaction: a write that fails leaves no empty conversation behind."""
    with db.transaction() as cur:
        cur.execute("INSERT INTO conversations (user_id, department_id, title) VALUES (?, ?, ?) RETURNING id",
                    [user_id, department_id, title])
        conversation_id = cur.fetchone()[0]
        ids = [_insert_message(cur, conversation_id, role, content, fields) for role, content, fields in messages]
    return conversation_id, ids


def list_messages(db: Database, conversation_id: int) -> list[Message]:
    rows = db.query(
        """
        SELECT m.id, m.conversation_id, m.role, m.content, m.model, m.adapter, m.adapter_version,
               m.created_at, m.tool_call_id, f.rating, m.finish_reason
        FROM messages m
        JOIN conversations c ON c.id = m.conversation_id
        LEFT JOIN feedback f ON f.message_id = m.id AND f.user_id = c.user_id
        WHERE m.conversation_id = ?
        ORDER BY m.id
        """,
        [conversation_id],
    )
    return [Message(**r) for r in rows]


def get_message_owner(db: Database, message_id: int) -> dict[str, Any] | None:
    """Who owns the conversation a message belongs to, and the message's role."""
    return db.query_one(
        "SELECT c.user_id, c.department_id, m.role, m.conversation_id, m.cache_entry_id FROM messages m"
        " JOIN conversations c ON c.id = m.conversation_id WHERE m.id = ?",
        [message_id],
    )


def record_feedback(db: Database, message_id: int, user_id: int, rating: int, comment: str | None) -> int:
    """Thumbs up (1) or down (-1); a second vote by the same user replaces the first.
    A vote without a comment keeps an earlier comment of the same rating."""
    if rating not in (-1, 1):
        raise ValueError("rating must be 1 (thumbs up) or -1 (thumbs down)")
    return db.write(
        """
        INSERT INTO feedback (message_id, user_id, rating, comment) VALUES (?, ?, ?, ?)
        ON CONFLICT (message_id, user_id) DO UPDATE SET
            comment = CASE WHEN excluded.comment IS NULL AND feedback.rating = excluded.rating
                           THEN feedback.comment ELSE excluded.comment END,
            rating = excluded.rating,
            updated_at = now()
        RETURNING id
        """,
        [message_id, user_id, rating, comment],
    )


def get_feedback(db: Database, message_id: int, user_id: int) -> dict[str, Any] | None:
    return db.query_one(
        "SELECT id, message_id, user_id, rating, comment FROM feedback WHERE message_id = ? AND user_id = ?",
        [message_id, user_id],
    )


def usage_summary(db: Database, department_id: str | None = None) -> dict[str, int]:
    """Counts for the admin overview: one department's, or (None) the company's."""
    return db.query_one(
        """
        SELECT (SELECT count(*) FROM users WHERE ? IS NULL OR department_id = ?) AS users,
               (SELECT count(*) FROM conversations WHERE ? IS NULL OR department_id = ?) AS conversations,
               (SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
                WHERE ? IS NULL OR c.department_id = ?) AS messages,
               (SELECT count(*) FILTER (WHERE f.rating = 1) FROM feedback f JOIN messages m ON m.id = f.message_id
                JOIN conversations c ON c.id = m.conversation_id WHERE ? IS NULL OR c.department_id = ?) AS thumbs_up,
               (SELECT count(*) FILTER (WHERE f.rating = -1) FROM feedback f JOIN messages m ON m.id = f.message_id
                JOIN conversations c ON c.id = m.conversation_id WHERE ? IS NULL OR c.department_id = ?) AS thumbs_down
        """,
        [department_id] * 10,
    )


def last_user_message_id(db: Database, conversation_id: int) -> int | None:
    return db.scalar("SELECT max(id) FROM messages WHERE conversation_id = ? AND role = 'user'", [conversation_id])


def message_outcome(db: Database, message_id: int) -> dict[str, Any] | None:
    """How an answer ended: finish reason, tokens, timing, and the cache entry it came from."""
    return db.query_one("SELECT finish_reason, prompt_tokens, completion_tokens, latency_ms, cache_entry_id"
                        " FROM messages WHERE id = ?", [message_id])
