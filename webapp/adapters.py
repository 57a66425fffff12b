"""Which adapter version serves each department: the registry in DuckDB, applied to the
loaded model. A promotion or rollback is seen by the next message, without a restart."""

from __future__ import annotations

import logging
from pathlib import Path

from storage import adapters as registry
from storage.db import Database, StorageError
from webapp.models import ModelService, discover_adapters

log = logging.getLogger(__name__)
CANARY_SLOT = "{}__canary"
BASE_VERSION = "base"  # promoting it rolls a department back to the base model


class AdapterError(ValueError):
    pass


class AdapterManager:
    def __init__(self, db: Database, model: ModelService, adapters_dir: Path, base_model: str):
        self.db = db
        self.model = model
        self.adapters_dir = adapters_dir
        self.base_model = base_model

    def load_active(self) -> None:
        """At start: the registry's active versions (and canaries); adapters placed by hand
        in ADAPTERS_DIR serve departments the registry does not know yet."""
        known = set()
        for row in registry.active_versions(self.db):
            known.add(row["department_id"])
            try:
                self._load(row)
            except RuntimeError as exc:  # e.g. the remote engine refused it: serve the base, say why
                log.error("adapter %s %s could not be loaded; serving the base model: %s", row["department_id"],
                          row["version"], exc)
        for info in discover_adapters(self.adapters_dir):
            if info.name not in known and info.name not in {r["department_id"] for r in registry.versions(self.db)}:
                self.model.load_adapter(info.name, info.path, info.version)
                log.info("adapter %s %s loaded from %s (not in the registry)", info.name, info.version, info.path)
        for row in registry.versions(self.db):
            if row["status"] == "candidate" and row["canary_share"] > 0:
                self._load_canary(row)

    def _load(self, row: dict) -> None:
        path = Path(row["path"])
        if not (path / "adapter_config.json").is_file():
            log.error("active adapter %s %s is missing at %s; serving the base model", row["department_id"],
                      row["version"], path)
            return
        self.model.load_adapter(row["department_id"], path, row["version"])
        log.info("adapter %s %s active", row["department_id"], row["version"])

    def _load_canary(self, row: dict) -> None:
        slot = CANARY_SLOT.format(row["department_id"])
        info = self.model.load_adapter(row["department_id"], Path(row["path"]), row["version"], slot=slot)
        self.model.canaries[row["department_id"]] = (info, float(row["canary_share"]))

    def activate(self, department_id: str, version: str) -> None:
        """Promote (or roll back to) a version: its files must be complete; one transaction
        switches the pointer; then the loaded model follows. A crash in between leaves the
        registry right, and the next start loads what it says. BASE_VERSION serves the base model."""
        if version == BASE_VERSION:
            registry.retire_active(self.db, department_id)
            self.set_canary(department_id, None, 0.0)
            # the next message goes to the base; the weights stay loaded (peft would keep the
            # deleted adapter active) until a promotion loads a version in their place
            self.model.adapters.pop(department_id, None)
            log.info("%s rolled back to the base model", department_id)
            return
        row = registry.get_version(self.db, department_id, version)
        if row is None:
            raise AdapterError(f"{department_id} has no adapter version {version!r}.")
        if not (Path(row["path"]) / "adapter_config.json").is_file():
            raise AdapterError(f"The files of {department_id} {version} are missing at {row['path']}.")
        try:
            registry.activate(self.db, department_id, version)
        except StorageError as exc:
            raise AdapterError(str(exc)) from exc
        self.set_canary(department_id, None, 0.0)
        try:
            self._load(row)
        except RuntimeError as exc:
            raise AdapterError(f"{department_id} {version} is active in the registry, but loading it failed: {exc}"
                               " Fix the cause and promote it again (or restart).") from exc

    def set_canary(self, department_id: str, version: str | None, share: float) -> None:
        """Send `share` (0..0.5) of the department's conversations to a candidate; 0 stops."""
        if not 0 <= share <= 0.5:
            raise AdapterError("A canary share is between 0 and 0.5 (50%).")
        previous = self.model.canaries.pop(department_id, None)
        if previous:
            self.model.unload_adapter(previous[0].loaded_as)
        if version is None or share == 0:
            for row in registry.versions(self.db, department_id):
                if row["canary_share"] > 0 and row["status"] == "candidate":
                    registry.set_canary(self.db, department_id, row["version"], 0.0)
            return
        row = registry.get_version(self.db, department_id, version)
        if row is None or row["status"] != "candidate":
            raise AdapterError(f"Only a candidate can be a canary; {department_id} {version} is not one.")
        registry.set_canary(self.db, department_id, version, share)
        self._load_canary({**row, "canary_share": share})
