"""Adapter versions per department and the training runs that made them.

The active version is the row with status 'active'; promotion and rollback switch it in
one transaction, after the adapter's files are complete on disk."""

from __future__ import annotations

import json
from typing import Any

from storage.db import Database, StorageError

_VERSION_COLUMNS = ("department_id, version, status, path, base_model, run_id, metrics, gate, canary_share,"
                    " created_at, promoted_at")


def next_version(db: Database, department_id: str) -> str:
    """v1, v2, ...: one past the highest number used (gaps stay gaps)."""
    highest = db.scalar("SELECT max(TRY_CAST(substr(version, 2) AS INTEGER)) FROM adapter_versions"
                        " WHERE department_id = ? AND version LIKE 'v%'", [department_id])
    return f"v{(highest or 0) + 1}"


def add_version(db: Database, department_id: str, version: str, path: str, base_model: str,
                run_id: int | None, status: str = "candidate") -> None:
    db.write("INSERT INTO adapter_versions (department_id, version, status, path, base_model, run_id)"
             " VALUES (?, ?, ?, ?, ?, ?)", [department_id, version, status, path, base_model, run_id])


def versions(db: Database, department_id: str | None = None) -> list[dict[str, Any]]:
    return db.query(
        f"SELECT {_VERSION_COLUMNS} FROM adapter_versions WHERE (? IS NULL OR department_id = ?)"
        " ORDER BY department_id, created_at, version", [department_id, department_id])


def get_version(db: Database, department_id: str, version: str) -> dict[str, Any] | None:
    return db.query_one(f"SELECT {_VERSION_COLUMNS} FROM adapter_versions WHERE department_id = ? AND version = ?",
                        [department_id, version])


def active_versions(db: Database) -> list[dict[str, Any]]:
    return db.query(f"SELECT {_VERSION_COLUMNS} FROM adapter_versions WHERE status = 'active' ORDER BY department_id")


def active_version(db: Database, department_id: str) -> dict[str, Any] | None:
    return db.query_one(f"SELECT {_VERSION_COLUMNS} FROM adapter_versions WHERE department_id = ? AND status = 'active'",
                        [department_id])


def activate(db: Database, department_id: str, version: str) -> None:
    """Make `version` the active one (promotion or rollback): one transaction."""
    with db.transaction() as cur:
        if not cur.execute("SELECT 1 FROM adapter_versions WHERE department_id = ? AND version = ?",
                           [department_id, version]).fetchone():
            raise StorageError(f"{department_id} has no adapter version {version!r}.")
        cur.execute("UPDATE adapter_versions SET status = 'retired', canary_share = 0"
                    " WHERE department_id = ? AND status = 'active'", [department_id])
        cur.execute("UPDATE adapter_versions SET status = 'active', canary_share = 0, promoted_at = now()"
                    " WHERE department_id = ? AND version = ?", [department_id, version])


def retire_active(db: Database, department_id: str) -> None:
    """No version active: the department is served by the base model (a rollback past the first)."""
    db.write("UPDATE adapter_versions SET status = 'retired', canary_share = 0"
             " WHERE department_id = ? AND status = 'active'", [department_id])


def set_status(db: Database, department_id: str, version: str, status: str) -> None:
    db.write("UPDATE adapter_versions SET status = ? WHERE department_id = ? AND version = ?",
             [status, department_id, version])


def set_canary(db: Database, department_id: str, version: str, share: float) -> None:
    with db.transaction() as cur:
        cur.execute("UPDATE adapter_versions SET canary_share = 0 WHERE department_id = ? AND status = 'candidate'",
                    [department_id])
        cur.execute("UPDATE adapter_versions SET canary_share = ? WHERE department_id = ? AND version = ?"
                    " AND status = 'candidate'", [share, department_id, version])


def record_evaluation(db: Database, department_id: str, version: str, metrics: dict, gate: dict) -> None:
    db.write("UPDATE adapter_versions SET metrics = ?, gate = ? WHERE department_id = ? AND version = ?",
             [json.dumps(metrics), json.dumps(gate), department_id, version])


# --- training runs -------------------------------------------------------------------------

def start_run(db: Database, department_id: str, trigger: str, status: str = "running", **fields: Any) -> int:
    columns = ["department_id", "trigger", "status", *fields]
    return db.write(
        f"INSERT INTO training_runs ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)}) RETURNING id",
        [department_id, trigger, status, *fields.values()])


def finish_run(db: Database, run_id: int, status: str, **fields: Any) -> None:
    sets = ", ".join(f"{name} = ?" for name in fields)
    db.write(f"UPDATE training_runs SET status = ?, finished_at = now(){', ' + sets if sets else ''} WHERE id = ?",
             [status, *fields.values(), run_id])


def runs(db: Database, department_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    return db.query(
        "SELECT * FROM training_runs WHERE (? IS NULL OR department_id = ?) ORDER BY id DESC LIMIT ?",
        [department_id, department_id, limit])


def last_successful_run(db: Database, department_id: str) -> dict[str, Any] | None:
    return db.query_one("SELECT * FROM training_runs WHERE department_id = ? AND status = 'succeeded'"
                        " ORDER BY id DESC LIMIT 1", [department_id])


def fail_running_runs(db: Database, reason: str) -> int:
    """At start: runs left 'running' by a killed app did not finish."""
    count = db.scalar("SELECT count(*) FROM training_runs WHERE status = 'running'")
    db.write("UPDATE training_runs SET status = 'failed', reason = ?, finished_at = now() WHERE status = 'running'",
             [reason])
    return count


def count_train_samples(db: Database, department_id: str, after_id: int = 0) -> tuple[int, int]:
    """(approved train samples with id > after_id, largest sample id) of a department."""
    row = db.query_one("SELECT count(*) FILTER (WHERE id > ?) AS new, max(id) AS last FROM training_samples"
                       " WHERE department_id = ? AND split = 'train'", [after_id, department_id])
    return row["new"], row["last"] or 0


def thumbs_down_by_version(db: Database, department_id: str | None = None) -> list[dict[str, Any]]:
    """Thumbs-down rate of the answers each adapter version gave, side by side."""
    return db.query(
        """
        SELECT c.department_id, coalesce(m.adapter_version, 'base') AS version,
               count(*) AS rated, count(*) FILTER (WHERE f.rating = -1) AS thumbs_down,
               round(avg(CASE WHEN f.rating = -1 THEN 1.0 ELSE 0.0 END), 3) AS thumbs_down_rate
        FROM feedback f JOIN messages m ON m.id = f.message_id JOIN conversations c ON c.id = m.conversation_id
        WHERE (? IS NULL OR c.department_id = ?)
        GROUP BY ALL ORDER BY ALL
        """, [department_id, department_id])


