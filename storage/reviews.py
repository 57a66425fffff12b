"""The review queue, review decisions and training samples."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Sequence

from storage.db import Database, StorageError, Where


class AlreadyReviewed(StorageError):
    """The case was approved or rejected already (maybe by another reviewer just now)."""


@dataclass(frozen=True)
class QueueFilter:
    departments: Sequence[str] | None  # None: every department (admins)
    rating: int = -1  # -1: thumbs-down cases; 1: thumbs-up answers to approve as good examples
    adapter_version: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None  # exclusive
    with_comment_only: bool = False


def reviewer_departments(db: Database, user_id: int) -> list[str]:
    return [r["department_id"] for r in db.query(
        "SELECT department_id FROM reviewer_departments WHERE user_id = ? ORDER BY department_id", [user_id])]


def assign_reviewer(db: Database, user_id: int, department_ids: Sequence[str]) -> None:
    with db.transaction() as cur:
        cur.execute("DELETE FROM reviewer_departments WHERE user_id = ?", [user_id])
        for department_id in department_ids:
            cur.execute("INSERT INTO reviewer_departments VALUES (?, ?)", [user_id, department_id])


def review_queue(db: Database, flt: QueueFilter, reviewer_id: int, limit: int = 200) -> list[dict[str, Any]]:
    """Open cases, oldest first; cases this reviewer skipped go to the end."""
    if flt.departments is not None and not flt.departments:
        return []
    where = Where("NOT EXISTS (SELECT 1 FROM reviews r WHERE r.message_id = m.id"
                  " AND r.decision IN ('approved', 'rejected'))")
    where.add("f.rating = ?", flt.rating)
    if flt.departments is not None:
        where.add(f"c.department_id IN ({', '.join('?' for _ in flt.departments)})", *flt.departments)
    if flt.adapter_version:
        where.add("coalesce(m.adapter_version, 'base') = ?", flt.adapter_version)
    if flt.since:
        where.add("f.created_at >= ?", flt.since)
    if flt.until:
        where.add("f.created_at < ?", flt.until)
    if flt.with_comment_only:
        where.add("f.comment IS NOT NULL")
    return db.query(
        f"""
        SELECT m.id AS message_id, c.id AS conversation_id, c.department_id, u.username,
               m.model, m.adapter, m.adapter_version, f.rating, f.comment, f.created_at AS rated_at,
               (SELECT q.content FROM messages q WHERE q.conversation_id = m.conversation_id
                  AND q.role = 'user' AND q.id < m.id ORDER BY q.id DESC LIMIT 1) AS question,
               EXISTS (SELECT 1 FROM reviews s WHERE s.message_id = m.id AND s.decision = 'skipped'
                  AND s.reviewer_id = ?) AS skipped_by_me
        FROM feedback f
        JOIN messages m ON m.id = f.message_id
        JOIN conversations c ON c.id = m.conversation_id
        JOIN users u ON u.id = c.user_id
        WHERE {where.sql()}
        ORDER BY skipped_by_me, f.created_at, m.id
        LIMIT ?
        """,
        [reviewer_id, *where.params, limit],
    )


def case_header(db: Database, message_id: int) -> dict[str, Any] | None:
    """The answer under review with its conversation, owner and the owner's feedback."""
    return db.query_one(
        """
        SELECT m.id AS message_id, m.conversation_id, m.content, m.model, m.adapter, m.adapter_version,
               m.created_at, c.department_id, c.user_id, u.username, f.rating, f.comment
        FROM messages m JOIN conversations c ON c.id = m.conversation_id JOIN users u ON u.id = c.user_id
        LEFT JOIN feedback f ON f.message_id = m.id AND f.user_id = c.user_id
        WHERE m.id = ? AND m.role = 'assistant'
        """,
        [message_id],
    )


def decisions_of(db: Database, message_id: int) -> list[dict[str, Any]]:
    return db.query(
        "SELECT r.id, r.decision, r.reason, r.note, r.created_at, u.username AS reviewer FROM reviews r"
        " JOIN users u ON u.id = r.reviewer_id WHERE r.message_id = ? ORDER BY r.id",
        [message_id],
    )


def record_decision(db: Database, message_id: int, reviewer_id: int, decision: str, reason: str | None,
                    note: str | None, sample: dict[str, Any] | None = None) -> tuple[int, int | None]:
    """Store a decision (and its training sample) atomically; refuse a case already decided."""
    with db.transaction() as cur:
        done = cur.execute(
            "SELECT decision FROM reviews WHERE message_id = ? AND decision IN ('approved', 'rejected') LIMIT 1",
            [message_id]).fetchone()
        if done:
            raise AlreadyReviewed(f"This case was already {done[0]}.")
        review_id = cur.execute(
            "INSERT INTO reviews (message_id, reviewer_id, decision, reason, note) VALUES (?, ?, ?, ?, ?) RETURNING id",
            [message_id, reviewer_id, decision, reason, note]).fetchone()[0]
        sample_id = None
        if sample is not None:
            sample_id = _insert_sample(cur, {**sample, "review_id": review_id, "reviewer_id": reviewer_id,
                                             "source_message_id": message_id})
    return review_id, sample_id


_SAMPLE_COLUMNS = ("department_id", "messages", "tools", "split", "origin", "reason", "source_message_id",
                   "review_id", "reviewer_id", "fingerprint", "near_duplicate_of")


def _insert_sample(cur, sample: dict[str, Any]) -> int:
    columns = [c for c in _SAMPLE_COLUMNS if c in sample]
    return cur.execute(
        f"INSERT INTO training_samples ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) RETURNING id",
        [sample[c] for c in columns]).fetchone()[0]


def add_samples(db: Database, samples: Sequence[dict[str, Any]]) -> list[int]:
    """Insert many samples in one transaction: all or none."""
    with db.transaction() as cur:
        return [_insert_sample(cur, s) for s in samples]


def list_samples(db: Database, department_id: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
    return db.query(
        "SELECT id, department_id, messages, tools, split, origin, reason, source_message_id, review_id,"
        " reviewer_id, fingerprint, near_duplicate_of, created_at FROM training_samples"
        " WHERE (? IS NULL OR department_id = ?) AND (? IS NULL OR split = ?) ORDER BY id",
        [department_id, department_id, split, split],
    )


def sample_fingerprints(db: Database, department_id: str) -> list[dict[str, Any]]:
    """What near-duplicate detection compares against: id, split, fingerprint, messages."""
    return db.query(
        "SELECT id, split, fingerprint, messages FROM training_samples WHERE department_id = ? ORDER BY id",
        [department_id])
