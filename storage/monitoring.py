"""Operational figures per day and department, all computed from the logged rows."""

from __future__ import annotations

import datetime as dt
from typing import Any

from storage.db import Database

# One row per (day, department) that saw any activity. The answers' latency excludes cache
# hits: they are counted in the cache's own figures, and would hide a slow model.
_DAILY_SQL = """
WITH convs AS (
    SELECT CAST(created_at AS DATE) AS day, department_id, count(*) AS conversations
    FROM conversations WHERE created_at >= ? GROUP BY ALL
), asks AS (
    SELECT CAST(m.created_at AS DATE) AS day, c.department_id, count(*) AS user_messages,
           count(DISTINCT c.user_id) AS active_users
    FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE m.role = 'user' AND m.created_at >= ? GROUP BY ALL
), answers AS (
    SELECT CAST(m.created_at AS DATE) AS day, c.department_id, count(*) AS answers,
           quantile_cont(m.latency_ms, 0.5) FILTER (WHERE m.cache_entry_id IS NULL) AS latency_p50_ms,
           quantile_cont(m.latency_ms, 0.95) FILTER (WHERE m.cache_entry_id IS NULL) AS latency_p95_ms,
           sum(coalesce(m.prompt_tokens, 0)) AS prompt_tokens,
           sum(coalesce(m.completion_tokens, 0)) AS completion_tokens,
           count(*) FILTER (WHERE m.finish_reason = 'error') AS errors
    FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE m.role = 'assistant' AND m.created_at >= ? GROUP BY ALL
), votes AS (
    SELECT CAST(f.created_at AS DATE) AS day, c.department_id,
           count(*) FILTER (WHERE f.rating = 1) AS thumbs_up, count(*) FILTER (WHERE f.rating = -1) AS thumbs_down
    FROM feedback f JOIN messages m ON m.id = f.message_id JOIN conversations c ON c.id = m.conversation_id
    WHERE f.created_at >= ? GROUP BY ALL
), lookups AS (  -- one by one, and the days storage.cache.prune_lookups folded into totals
    SELECT day, department_id, sum(n) AS cache_lookups,
           coalesce(sum(n) FILTER (WHERE outcome IN ('exact', 'semantic')), 0) AS cache_hits
    FROM (SELECT CAST(created_at AS DATE) AS day, department_id, outcome, count(*) AS n
          FROM cache_lookups WHERE created_at >= ? GROUP BY ALL
          UNION ALL
          SELECT day, department_id, outcome, lookups FROM cache_lookup_days WHERE day >= CAST(? AS DATE))
    GROUP BY ALL
), keys AS (
    SELECT day, department_id FROM convs UNION SELECT day, department_id FROM asks
    UNION SELECT day, department_id FROM answers UNION SELECT day, department_id FROM votes
    UNION SELECT day, department_id FROM lookups
)
SELECT k.day, k.department_id,
       coalesce(convs.conversations, 0) AS conversations, coalesce(asks.user_messages, 0) AS user_messages,
       coalesce(asks.active_users, 0) AS active_users, coalesce(answers.answers, 0) AS answers,
       answers.latency_p50_ms, answers.latency_p95_ms,
       coalesce(answers.prompt_tokens, 0) AS prompt_tokens,
       coalesce(answers.completion_tokens, 0) AS completion_tokens, coalesce(answers.errors, 0) AS errors,
       coalesce(votes.thumbs_up, 0) AS thumbs_up, coalesce(votes.thumbs_down, 0) AS thumbs_down,
       coalesce(lookups.cache_lookups, 0) AS cache_lookups, coalesce(lookups.cache_hits, 0) AS cache_hits,
       CASE WHEN lookups.cache_lookups > 0 THEN lookups.cache_hits / lookups.cache_lookups END AS cache_hit_rate
FROM keys k
LEFT JOIN convs USING (day, department_id) LEFT JOIN asks USING (day, department_id)
LEFT JOIN answers USING (day, department_id) LEFT JOIN votes USING (day, department_id)
LEFT JOIN lookups USING (day, department_id)
WHERE (? IS NULL OR k.department_id = ?)
ORDER BY k.day, k.department_id
"""


def daily(db: Database, since: dt.date, department_id: str | None = None) -> list[dict[str, Any]]:
    """Conversations, messages, active users, latency p50/p95, tokens, errors, votes and
    cache hit rate per day and department."""
    return db.query(_DAILY_SQL, [since] * 6 + [department_id, department_id])


def daily_by_version(db: Database, since: dt.date, department_id: str | None = None) -> list[dict[str, Any]]:
    """Rated answers and thumbs-down rate per day and adapter version, with the version's
    registry status (active, candidate = canary, retired), for canary-vs-active plots."""
    return db.query(
        """
        SELECT CAST(f.created_at AS DATE) AS day, c.department_id, coalesce(m.adapter_version, 'base') AS version,
               coalesce(v.status, 'base') AS status, count(*) AS rated,
               count(*) FILTER (WHERE f.rating = -1) AS thumbs_down,
               count(*) FILTER (WHERE f.rating = -1) / count(*) AS thumbs_down_rate
        FROM feedback f JOIN messages m ON m.id = f.message_id JOIN conversations c ON c.id = m.conversation_id
        LEFT JOIN adapter_versions v ON v.department_id = c.department_id AND v.version = m.adapter_version
        WHERE f.created_at >= ? AND (? IS NULL OR c.department_id = ?)
        GROUP BY ALL ORDER BY ALL
        """, [since, department_id, department_id])


def daily_tool_calls(db: Database, since: dt.date, department_id: str | None = None) -> list[dict[str, Any]]:
    """Tool calls per day, department, tool and final status (a retried call counts once,
    with the status of its last attempt)."""
    return db.query(
        """
        WITH calls AS (
            SELECT call_id, min(created_at) AS created_at, any_value(department_id) AS department_id,
                   any_value(tool) AS tool, arg_max(status, id) AS status
            FROM tool_calls WHERE created_at >= ? GROUP BY call_id
        )
        SELECT CAST(created_at AS DATE) AS day, department_id, tool, status, count(*) AS calls
        FROM calls WHERE (? IS NULL OR department_id = ?) GROUP BY ALL ORDER BY ALL
        """, [since, department_id, department_id])


def review_backlog(db: Database, now: dt.datetime, department_id: str | None = None) -> list[dict[str, Any]]:
    """Open thumbs-down cases per department, and the age of the oldest in hours."""
    return db.query(
        """
        SELECT c.department_id, count(*) AS open_cases,
               round(date_diff('second', min(f.created_at), ?) / 3600.0, 1) AS oldest_hours
        FROM feedback f JOIN messages m ON m.id = f.message_id JOIN conversations c ON c.id = m.conversation_id
        WHERE f.rating = -1 AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.message_id = m.id
                                            AND r.decision IN ('approved', 'rejected'))
          AND (? IS NULL OR c.department_id = ?)
        GROUP BY ALL ORDER BY ALL
        """, [now, department_id, department_id])


def daily_runs(db: Database, since: dt.date, department_id: str | None = None) -> list[dict[str, Any]]:
    """Training runs per day, department and outcome, with their wall time."""
    return db.query(
        """
        SELECT CAST(started_at AS DATE) AS day, department_id, status, count(*) AS runs,
               sum(date_diff('millisecond', started_at, finished_at)) / 1000.0 AS seconds
        FROM training_runs WHERE started_at >= ? AND (? IS NULL OR department_id = ?) GROUP BY ALL ORDER BY ALL
        """, [since, department_id, department_id])


def totals(db: Database) -> list[dict[str, Any]]:
    """Monotonic totals per department for the Prometheus endpoint (counters survive restarts
    this way): rows of (family, department_id, label, n)."""
    return db.query(
        """
        SELECT 'answers' AS family, c.department_id,
               CASE WHEN m.finish_reason = 'error' THEN 'error' ELSE 'ok' END AS label, count(*) AS n
        FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.role = 'assistant' GROUP BY ALL
        UNION ALL
        SELECT 'feedback', c.department_id, CASE WHEN f.rating = 1 THEN 'up' ELSE 'down' END, count(*)
        FROM feedback f JOIN messages m ON m.id = f.message_id JOIN conversations c ON c.id = m.conversation_id
        GROUP BY ALL
        UNION ALL
        SELECT 'cache_lookups', department_id, outcome, sum(n) FROM (
            SELECT department_id, outcome, count(*) AS n FROM cache_lookups GROUP BY ALL
            UNION ALL SELECT department_id, outcome, lookups FROM cache_lookup_days) GROUP BY ALL
        UNION ALL
        SELECT 'training_runs', department_id, status, count(*) FROM training_runs GROUP BY ALL
        UNION ALL
        SELECT 'tool_calls', department_id, status, count(*) FROM tool_calls GROUP BY ALL
        ORDER BY 1, 2, 3
        """)
