"""The audit trail of tool calls: one row per attempt, plus pending/declined decisions."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import Any

from storage.db import Database

STATUSES = ("ok", "error", "denied", "invalid", "timeout", "declined", "pending")


@dataclass(frozen=True)
class ToolCallRow:
    id: int
    call_id: str
    message_id: int | None
    conversation_id: int | None
    user_id: int
    department_id: str
    tool: str
    arguments: str
    status: str
    attempt: int
    side_effect: bool
    latency_ms: float | None
    result: str | None
    error: str | None
    created_at: dt.datetime
    acted_by: int | None = None  # who ran it on user_id's behalf (a reviewer); None: the user
    overruled: str | None = None  # JSON {parameter: the model's value} the user's words replaced

    @property
    def replaced(self) -> dict:
        """The overruled column decoded: {parameter: the value the model wrote}."""
        return json.loads(self.overruled) if self.overruled else {}


_COLUMNS = (
    "id, call_id, message_id, conversation_id, user_id, department_id, tool, arguments, status,"
    " attempt, side_effect, latency_ms, result, error, created_at, acted_by, overruled"
)


def record_attempt(db: Database, **fields: Any) -> int:
    if fields.get("status") not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}")
    names = list(fields)
    return db.write(
        f"INSERT INTO tool_calls ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)}) RETURNING id",
        list(fields.values()),
    )


def attempts_of(db: Database, call_id: str) -> list[ToolCallRow]:
    rows = db.query(f"SELECT {_COLUMNS} FROM tool_calls WHERE call_id = ? ORDER BY id", [call_id])
    return [ToolCallRow(**r) for r in rows]


def latest_of_conversation(db: Database, conversation_id: int) -> list[ToolCallRow]:
    """The last row of each call in a conversation, in call order (what the chat shows)."""
    rows = db.query(
        f"""
        SELECT {_COLUMNS} FROM tool_calls t
        WHERE conversation_id = ? AND id = (SELECT max(id) FROM tool_calls u WHERE u.call_id = t.call_id)
        ORDER BY (SELECT min(id) FROM tool_calls v WHERE v.call_id = t.call_id)
        """,
        [conversation_id],
    )
    return [ToolCallRow(**r) for r in rows]


def pending_of_conversation(db: Database, conversation_id: int) -> list[ToolCallRow]:
    return [r for r in latest_of_conversation(db, conversation_id) if r.status == "pending"]
