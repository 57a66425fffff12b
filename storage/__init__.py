"""DuckDB storage: the one place that holds SQL.

The app process owns the database file (DuckDB allows one writing process); everything
else reads and writes through the functions of this package.
"""

from storage.db import Database, DatabaseLockedError, DatabaseWriteError, StorageError
from storage.migrations import MIGRATIONS, migrate

__all__ = ["Database", "DatabaseLockedError", "DatabaseWriteError", "StorageError", "MIGRATIONS", "migrate"]
