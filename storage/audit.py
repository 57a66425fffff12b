"""The audit trail: searching logged conversations, exporting them, and the log of who
looked (audit_events)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.db import Database, Where


def record(db: Database, user_id: int | None, department_id: str | None, action: str, **detail: Any) -> int:
    return db.write("INSERT INTO audit_events (user_id, department_id, action, detail) VALUES (?, ?, ?, ?)"
                    " RETURNING id", [user_id, department_id, action, json.dumps(detail, default=str,
                                                                                ensure_ascii=False)])


def events(db: Database, action_prefix: str = "", limit: int = 200) -> list[dict[str, Any]]:
    return db.query(
        "SELECT e.id, e.created_at, u.username, e.department_id, e.action, e.detail FROM audit_events e"
        " LEFT JOIN users u ON u.id = e.user_id WHERE e.action LIKE ? ORDER BY e.id DESC LIMIT ?",
        [action_prefix + "%", limit])


@dataclass(frozen=True)
class ConversationFilter:
    """Every field narrows the search; None leaves it open."""

    username: str | None = None
    department_id: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None  # inclusive
    text: str | None = None  # in any message of the conversation, case-insensitive
    tool: str | None = None  # a tool the conversation called
    rating: int | None = None  # 1 / -1: a message of the conversation was rated so

    def where(self) -> tuple[str, list[Any]]:
        where = Where()
        if self.username:
            where.add("u.username = ?", self.username)
        if self.department_id:
            where.add("c.department_id = ?", self.department_id)
        if self.since:
            where.add("c.created_at >= ?", self.since)
        if self.until:
            where.add("c.created_at < ?", self.until + dt.timedelta(days=1))
        if self.text:
            # contains(lower(...)) instead of LIKE: a % or _ the user types is matched literally.
            where.add("EXISTS (SELECT 1 FROM messages x WHERE x.conversation_id = c.id"
                      " AND contains(lower(x.content), lower(?)))", self.text)
        if self.tool:
            where.add("EXISTS (SELECT 1 FROM tool_calls t WHERE t.conversation_id = c.id AND t.tool = ?)", self.tool)
        if self.rating:
            where.add("EXISTS (SELECT 1 FROM feedback f JOIN messages x ON x.id = f.message_id"
                      " WHERE x.conversation_id = c.id AND f.rating = ?)", int(self.rating))
        return where.sql(), where.params


_SEARCH_SQL = """
SELECT c.id AS conversation_id, c.created_at, u.username, c.department_id, c.title,
       (SELECT count(*) FROM messages x WHERE x.conversation_id = c.id) AS messages,
       (SELECT count(DISTINCT t.call_id) FROM tool_calls t WHERE t.conversation_id = c.id) AS tool_calls,
       (SELECT count(*) FROM feedback f JOIN messages x ON x.id = f.message_id
        WHERE x.conversation_id = c.id AND f.rating = -1) AS thumbs_down
FROM conversations c JOIN users u ON u.id = c.user_id
WHERE {where}
ORDER BY c.id DESC
"""


def search(db: Database, flt: ConversationFilter, limit: int = 500) -> list[dict[str, Any]]:
    where, params = flt.where()
    return db.query(_SEARCH_SQL.format(where=where) + " LIMIT ?", [*params, limit])


def conversation_record(db: Database, conversation_id: int) -> dict[str, Any] | None:
    """Everything logged about one conversation: messages with their model, adapter and
    timing, every tool attempt, every retrieved passage and the feedback."""
    header = db.query_one(
        "SELECT c.id, c.title, c.created_at, u.username, c.department_id FROM conversations c"
        " JOIN users u ON u.id = c.user_id WHERE c.id = ?", [conversation_id])
    if header is None:
        return None
    header["messages"] = db.query(
        "SELECT m.id, m.created_at, m.role, m.content, m.model, m.adapter, m.adapter_version, m.latency_ms,"
        " m.prompt_tokens, m.completion_tokens, m.finish_reason, m.error, m.cache_entry_id, f.rating, f.comment"
        " FROM messages m LEFT JOIN feedback f ON f.message_id = m.id WHERE m.conversation_id = ? ORDER BY m.id",
        [conversation_id])
    header["tool_calls"] = db.query(
        "SELECT created_at, message_id, call_id, tool, arguments, status, attempt, side_effect, latency_ms,"
        " result, error FROM tool_calls WHERE conversation_id = ? ORDER BY id", [conversation_id])
    header["retrievals"] = db.query(
        "SELECT r.message_id, r.via, r.rank, r.score, r.title, r.location, r.passage FROM retrievals r"
        " JOIN messages m ON m.id = r.message_id WHERE m.conversation_id = ? ORDER BY r.message_id, r.via, r.rank",
        [conversation_id])
    return header


_EXPORT_SQL = """
SELECT c.id AS conversation_id, u.username, c.department_id, m.id AS message_id, m.created_at, m.role,
       m.content, m.model, m.adapter, m.adapter_version, m.latency_ms, m.prompt_tokens, m.completion_tokens,
       m.finish_reason, m.error, f.rating, f.comment
FROM conversations c JOIN users u ON u.id = c.user_id JOIN messages m ON m.conversation_id = c.id
LEFT JOIN feedback f ON f.message_id = m.id
WHERE {where}
ORDER BY c.id, m.id
"""


def export(db: Database, flt: ConversationFilter, target: Path, fmt: str) -> int:
    """Write every message of the matching conversations to `target` (csv or parquet)
    with DuckDB's COPY; returns the number of rows written."""
    if fmt not in ("csv", "parquet"):
        raise ValueError("export as csv or parquet")
    where, params = flt.where()
    sql = _EXPORT_SQL.format(where=where)
    rows = db.scalar(f"SELECT count(*) FROM ({sql})", params)
    options = "FORMAT csv, HEADER true" if fmt == "csv" else "FORMAT parquet"
    # COPY takes no parameter for its target: the path is ours (a temp file), quoted for SQL.
    quoted = str(target).replace("'", "''")
    db.query(f"COPY ({sql}) TO '{quoted}' ({options})", params)
    return int(rows)
