"""The nightly refresh inside the app: APScheduler with one cron job.

The schedule is configuration (--refresh-cron), rebuilt at every start; a night missed while
the app was down is run at start when it is less than MISFIRE_GRACE old. One app owns a
data dir (DuckDB refuses a second), so there is exactly one scheduler per data dir."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Callable, Sequence

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from finetune.refresh import RefreshBusy, RefreshRunner
from storage import accounts
from storage import adapters as registry
from storage.db import Database
from storage.migrations import created_at

log = logging.getLogger(__name__)
JOB_ID = "nightly-refresh"
MISFIRE_GRACE = dt.timedelta(hours=6)


class NightlyRefresh:
    def __init__(self, db: Database, runner: RefreshRunner, cron: str,
                 now: Callable[[], dt.datetime] = dt.datetime.now, housekeeping: Sequence[Callable[[], object]] = ()):
        self.db = db
        self.runner = runner
        self.housekeeping = list(housekeeping)  # nightly chores after the refreshes (pruning logs)
        self.trigger = CronTrigger.from_crontab(cron)
        self.now = now
        self.scheduler: BackgroundScheduler | None = None

    def run_nightly(self) -> list:
        """Refresh every department in turn; each one skips itself below the threshold."""
        outcomes = []
        for department in accounts.list_departments(self.db):
            try:
                outcomes.append(self.runner.refresh(department.id, "schedule"))
            except RefreshBusy as exc:  # an admin's "Retrain now" is on it
                log.info("nightly refresh of %s: %s", department.id, exc)
            except Exception:
                log.exception("nightly refresh of %s failed", department.id)
        for chore in self.housekeeping:
            try:
                chore()
            except Exception:  # a chore that fails must not stop the next night
                log.exception("nightly housekeeping %s failed", getattr(chore, "__name__", chore))
        return outcomes

    def previous_fire_time(self, now: dt.datetime) -> dt.datetime | None:
        """The last time the cron fired before `now` (looked for within two days)."""
        probe, last = now - dt.timedelta(days=2), None
        while True:
            fire = self.trigger.get_next_fire_time(None, probe)
            if fire is None or fire.replace(tzinfo=None) > now:
                return last
            last, probe = fire.replace(tzinfo=None), fire + dt.timedelta(seconds=1)

    def missed_night(self) -> bool:
        """Whether the last night fired while the app was down: it is recent, this data dir
        existed then (a first start has missed nothing), and no scheduled run began since."""
        now = self.now()
        fired = self.previous_fire_time(now)
        if fired is None or now - fired > MISFIRE_GRACE:
            return False
        created = created_at(self.db)
        if created is None or created >= fired:
            return False
        runs = [r for r in registry.runs(self.db, limit=200) if r["trigger"] == "schedule"]
        return not any(r["started_at"] >= fired for r in runs)

    def start(self) -> None:
        self.scheduler = BackgroundScheduler(daemon=True)
        # coalesce + one instance: a slow night never overlaps the next
        self.scheduler.add_job(self.run_nightly, self.trigger, id=JOB_ID, coalesce=True, max_instances=1,
                               misfire_grace_time=int(MISFIRE_GRACE.total_seconds()))
        if self.missed_night():
            log.info("the nightly refresh was missed while the app was down; running it now")
            self.scheduler.add_job(self.run_nightly, id=JOB_ID + "-missed")
        self.scheduler.start()

    def state(self) -> dict:
        job = self.scheduler.get_job(JOB_ID) if self.scheduler else None
        last = next((r for r in registry.runs(self.db, limit=200) if r["trigger"] == "schedule"), None)
        return {"running": bool(self.scheduler and self.scheduler.running),
                "next_run": job.next_run_time.isoformat(timespec="minutes") if job and job.next_run_time else None,
                "last_run": last["started_at"].isoformat(timespec="minutes") if last else None,
                "refreshing_now": sorted(self.runner.running())}

    def stop(self) -> None:
        if self.scheduler and self.scheduler.running:
            self.scheduler.shutdown(wait=False)
