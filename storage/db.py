"""The Database class: owns one DuckDB file, serializes writes, hands out reads."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import duckdb


class StorageError(RuntimeError):
    """A storage operation failed in a way the caller should report."""


class DatabaseLockedError(StorageError):
    """Another process holds the DuckDB file (DuckDB allows one writing process)."""


class DatabaseWriteError(StorageError):
    """A write could not reach the disk (disk full, I/O error). It was rolled back: the
    database stays as it was, reads go on, and writes work again once the cause is gone."""


log = logging.getLogger(__name__)


def _write_failure(db_path, exc: Exception) -> DatabaseWriteError | None:
    """DuckDB's errors for a write the disk refused, as one clear error (others pass through:
    constraint errors, for one, are handled by the callers)."""
    text = str(exc)
    if isinstance(exc, duckdb.IOException) or (isinstance(exc, duckdb.TransactionException)
                                               and "Failed to commit" in text):
        log.error("database %s: a write failed and was rolled back: %s", db_path, text)
        reason = "the disk is full" if "No space left" in text else text
        return DatabaseWriteError(f"Could not save to the database ({reason}). Nothing was saved; the data "
                                  "already there is intact. Free disk space on the server, then try again.")
    return None


class Where:
    """SQL conditions and their parameters, built filter by filter."""

    def __init__(self, *always: str):
        self.clauses, self.params = list(always), []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def sql(self) -> str:
        return " AND ".join(self.clauses) or "TRUE"


class Database:
    """One DuckDB file. Reads run on per-thread cursors; writes are serialized by a lock.

    DuckDB supports several threads in one process but resolves write conflicts by
    aborting one transaction; serializing writes here means callers never see that.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path) if str(path) != ":memory:" else path
        if isinstance(self.path, Path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise DatabaseLockedError(
                    f"The database {self.path} is already in use by another process. DuckDB allows "
                    "one writing process: stop the other hangjia app using this data dir, or start "
                    f"this one with another --data-dir. ({exc})"
                ) from exc
            raise StorageError(f"Could not open the database {self.path}: {exc}") from exc
        self._write_lock = threading.RLock()
        self._local = threading.local()
        self._closed = False

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        if self._closed:
            raise StorageError(f"The database {self.path} is closed.")
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            cursor = self._conn.cursor()
            self._local.cursor = cursor
        return cursor

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts; for reads."""
        cursor = self._cursor()
        cursor.execute(sql, list(params))
        names = [d[0] for d in cursor.description] if cursor.description else []
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self._cursor().execute(sql, list(params)).fetchone()
        return row[0] if row else None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Serialized write transaction; commits on success, rolls back on any error."""
        with self._write_lock:
            cursor = self._cursor()
            cursor.execute("BEGIN TRANSACTION")
            try:
                yield cursor
            except BaseException as exc:
                with contextlib.suppress(duckdb.Error):  # a failed commit has ended it already
                    cursor.execute("ROLLBACK")
                failure = _write_failure(self.path, exc) if isinstance(exc, duckdb.Error) else None
                if failure is not None:
                    raise failure from exc
                raise
            else:
                try:
                    cursor.execute("COMMIT")
                except duckdb.Error as exc:
                    with contextlib.suppress(duckdb.Error):
                        cursor.execute("ROLLBACK")
                    failure = _write_failure(self.path, exc)
                    if failure is None:
                        raise
                    raise failure from exc

    def write(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """One write statement, atomic on its own (DuckDB autocommits it: no BEGIN/COMMIT
        round trips, which cost more than the insert); returns the first column of a
        RETURNING row when the statement has one."""
        with self._write_lock:
            cursor = self._cursor()
            try:
                cursor.execute(sql, list(params))
            except duckdb.Error as exc:
                failure = _write_failure(self.path, exc)
                if failure is None:
                    raise
                raise failure from exc
            if cursor.description:
                row = cursor.fetchone()
                return row[0] if row else None
            return None

    def close(self) -> None:
        if self._closed:
            return
        with self._write_lock:
            self._closed = True
            self._conn.close()
