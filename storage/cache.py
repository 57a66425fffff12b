"""The response cache: entries, lookups for the admin's statistics, run-time settings."""

from __future__ import annotations

import datetime as dt
from typing import Any, Sequence

from storage.db import Database

_ENTRY_COLUMNS = ("id, scope, department_id, question, normalized, embedding, answer, sources, source_message_id,"
                  " generation_ms, completion_tokens, live_tools, hits, created_at, expires_at")
_LIVE = "evicted_at IS NULL AND expires_at > ?"


def settings(db: Database, defaults: dict[str, Any]) -> dict[str, Any]:
    row = db.query_one("SELECT enabled, semantic, threshold FROM cache_settings WHERE id = 1")
    return row if row is not None else dict(defaults)


def save_settings(db: Database, enabled: bool, semantic: bool, threshold: float) -> None:
    db.write("INSERT INTO cache_settings VALUES (1, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
             " enabled = excluded.enabled, semantic = excluded.semantic, threshold = excluded.threshold",
             [enabled, semantic, threshold])


def add_entry(db: Database, *, scope: str, department_id: str, question: str, normalized: str,
              embedding: bytes | None, answer: str, sources: str | None, source_message_id: int,
              generation_ms: float | None, completion_tokens: int | None, live_tools: bool,
              expires_at: dt.datetime) -> int:
    return db.write(
        "INSERT INTO cache_entries (scope, department_id, question, normalized, embedding, answer, sources,"
        " source_message_id, generation_ms, completion_tokens, live_tools, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        [scope, department_id, question, normalized, embedding, answer, sources, source_message_id, generation_ms,
         completion_tokens, live_tools, expires_at])


def live_entries(db: Database, scope: str, now: dt.datetime) -> list[dict[str, Any]]:
    return db.query(f"SELECT {_ENTRY_COLUMNS} FROM cache_entries WHERE scope = ? AND {_LIVE} ORDER BY id",
                    [scope, now])


def exact_entry(db: Database, scope: str, normalized: str, now: dt.datetime) -> dict[str, Any] | None:
    return db.query_one(f"SELECT {_ENTRY_COLUMNS} FROM cache_entries WHERE scope = ? AND normalized = ? AND {_LIVE}"
                        " ORDER BY id DESC LIMIT 1", [scope, normalized, now])


def get_entry(db: Database, entry_id: int) -> dict[str, Any] | None:
    return db.query_one(f"SELECT {_ENTRY_COLUMNS}, evicted_at FROM cache_entries WHERE id = ?", [entry_id])


def record_hit(db: Database, entry_id: int) -> None:
    db.write("UPDATE cache_entries SET hits = hits + 1, last_hit_at = current_timestamp WHERE id = ?", [entry_id])


def record_lookup(db: Database, department_id: str, outcome: str, entry_id: int | None, similarity: float | None,
                  lookup_ms: float) -> None:
    db.write("INSERT INTO cache_lookups (department_id, outcome, entry_id, similarity, lookup_ms)"
             " VALUES (?, ?, ?, ?, ?)", [department_id, outcome, entry_id, similarity, lookup_ms])


def prune_lookups(db: Database, before: dt.datetime) -> int:
    """Folds the lookups made before `before` into daily totals (cache_lookup_days) and deletes
    them, in one transaction; returns how many were folded. What stats, the monitoring and the
    /metrics counters report does not change."""
    with db.transaction() as cur:
        cur.execute(
            "INSERT INTO cache_lookup_days"
            " SELECT CAST(l.created_at AS DATE), l.department_id, l.outcome, count(*), sum(l.lookup_ms),"
            "  coalesce(sum(e.generation_ms) FILTER (WHERE l.outcome IN ('exact', 'semantic')), 0),"
            "  coalesce(sum(e.completion_tokens) FILTER (WHERE l.outcome IN ('exact', 'semantic')), 0)"
            " FROM cache_lookups l LEFT JOIN cache_entries e ON e.id = l.entry_id"
            " WHERE l.created_at < ? GROUP BY ALL"
            " ON CONFLICT (day, department_id, outcome) DO UPDATE SET lookups = lookups + excluded.lookups,"
            "  lookup_ms_sum = lookup_ms_sum + excluded.lookup_ms_sum, saved_ms = saved_ms + excluded.saved_ms,"
            "  saved_tokens = saved_tokens + excluded.saved_tokens", [before])
        cur.execute("DELETE FROM cache_lookups WHERE created_at < ?", [before])
        return cur.fetchone()[0]


def evict(db: Database, reason: str, *, entry_ids: Sequence[int] = (), source_message_id: int | None = None,
          department_id: str | None = None, everything: bool = False) -> list[int]:
    """Evict entries by id, by the answer they replay, by department, or all; returns their ids."""
    clauses, params = [], []
    if entry_ids:
        clauses.append(f"id IN ({', '.join('?' * len(entry_ids))})")
        params.extend(int(i) for i in entry_ids)
    if source_message_id is not None:
        clauses.append("source_message_id = ?")
        params.append(source_message_id)
    if department_id is not None:
        clauses.append("department_id = ?")
        params.append(department_id)
    if not clauses and not everything:
        return []
    where = " OR ".join(clauses) if clauses else "TRUE"
    with db.transaction() as cur:
        cur.execute(f"UPDATE cache_entries SET evicted_at = current_timestamp, evicted_reason = ?"
                    f" WHERE evicted_at IS NULL AND ({where}) RETURNING id", [reason, *params])
        return [r[0] for r in cur.fetchall()]


def evict_beyond(db: Database, scope: str, keep: int) -> list[int]:
    """Keep the `keep` most recently used entries of a scope; evict the rest."""
    with db.transaction() as cur:
        cur.execute(
            "UPDATE cache_entries SET evicted_at = current_timestamp, evicted_reason = 'size' WHERE id IN ("
            " SELECT id FROM cache_entries WHERE scope = ? AND evicted_at IS NULL"
            " ORDER BY coalesce(last_hit_at, created_at) DESC, id DESC OFFSET ?) RETURNING id", [scope, keep])
        return [r[0] for r in cur.fetchall()]


def stats(db: Database, now: dt.datetime) -> list[dict[str, Any]]:
    """Per department: live entries, lookups, hits by layer, hit rate, generation time saved."""
    return db.query(
        # the lookups one by one, and those folded into daily totals by prune_lookups
        "WITH every AS (SELECT department_id, outcome, count(*) AS lookups, sum(lookup_ms) AS lookup_ms_sum"
        "  FROM cache_lookups GROUP BY ALL UNION ALL"
        "  SELECT department_id, outcome, lookups, lookup_ms_sum FROM cache_lookup_days),"
        " l AS (SELECT department_id, sum(lookups) AS lookups,"
        "  coalesce(sum(lookups) FILTER (WHERE outcome = 'exact'), 0) AS exact_hits,"
        "  coalesce(sum(lookups) FILTER (WHERE outcome = 'semantic'), 0) AS semantic_hits,"
        "  coalesce(sum(lookups) FILTER (WHERE outcome = 'guarded'), 0) AS guarded,"
        "  sum(lookup_ms_sum) / sum(lookups) AS avg_lookup_ms FROM every GROUP BY ALL),"
        " s AS (SELECT department_id, sum(saved_ms) / 1000 AS saved_s, sum(saved_tokens) AS saved_tokens FROM ("
        "  SELECT l.department_id, e.generation_ms AS saved_ms, e.completion_tokens AS saved_tokens"
        "  FROM cache_lookups l JOIN cache_entries e ON e.id = l.entry_id WHERE l.outcome IN ('exact', 'semantic')"
        "  UNION ALL SELECT department_id, saved_ms, saved_tokens FROM cache_lookup_days) GROUP BY ALL),"
        " e AS (SELECT department_id, count(*) AS entries FROM cache_entries WHERE evicted_at IS NULL"
        "  AND expires_at > ? GROUP BY ALL)"
        " SELECT coalesce(l.department_id, e.department_id) AS department_id, coalesce(e.entries, 0) AS entries,"
        "  coalesce(l.lookups, 0) AS lookups, coalesce(l.exact_hits, 0) AS exact_hits,"
        "  coalesce(l.semantic_hits, 0) AS semantic_hits, coalesce(l.guarded, 0) AS guarded,"
        "  round((coalesce(l.exact_hits, 0) + coalesce(l.semantic_hits, 0)) / greatest(l.lookups, 1), 3) AS hit_rate,"
        "  round(coalesce(s.saved_s, 0), 1) AS saved_s, coalesce(s.saved_tokens, 0) AS saved_tokens,"
        "  round(l.avg_lookup_ms, 2) AS avg_lookup_ms"
        " FROM l FULL JOIN e ON e.department_id = l.department_id LEFT JOIN s ON s.department_id = l.department_id"
        " ORDER BY 1", [now])
