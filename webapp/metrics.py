"""Prometheus metrics: request and generation figures observed in this process, and
totals read from DuckDB at scrape time (they survive restarts and include what the
training subprocess did). Each Services owns its own registry: nothing global."""

from __future__ import annotations

import datetime as dt
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from storage import monitoring
from storage.db import Database

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


def route_of(path: str) -> str:
    """A bounded label for a request path: /v1/... routes as they are, Gradio's by their
    first two segments (its paths carry session and file ids)."""
    if path.startswith("/v1/"):
        return "/v1/actions" if path.startswith("/v1/actions/") else path
    parts = [p for p in path.split("/") if p]
    return "/" + "/".join(parts[:2]) if parts else "/"


class _StoredTotals:
    """Counters and gauges computed from the database when Prometheus scrapes, each labelled
    with its department (an admin's scrape keeps only their own: Metrics.exposition)."""

    FAMILIES = {  # family: (metric name, help, label)
        "answers": ("hangjia_answers", "Assistant answers logged", "outcome"),
        "feedback": ("hangjia_feedback", "Thumbs given to answers", "rating"),
        "cache_lookups": ("hangjia_cache_lookups", "Response cache lookups", "outcome"),
        "training_runs": ("hangjia_training_runs", "Adapter refresh runs", "status"),
        "tool_calls": ("hangjia_tool_call_attempts", "Tool call attempts", "status"),
    }

    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        families = {key: CounterMetricFamily(name, documentation, labels=["department", label])
                    for key, (name, documentation, label) in self.FAMILIES.items()}
        for row in monitoring.totals(self.db):
            families[row["family"]].add_metric([row["department_id"], row["label"]], int(row["n"]))
        yield from families.values()
        backlog = GaugeMetricFamily("hangjia_review_queue_cases", "Open thumbs-down cases", labels=["department"])
        oldest = GaugeMetricFamily("hangjia_review_queue_oldest_hours", "Age of the oldest open case",
                                   labels=["department"])
        for row in monitoring.review_backlog(self.db, dt.datetime.now()):
            backlog.add_metric([row["department_id"]], row["open_cases"])
            oldest.add_metric([row["department_id"]], row["oldest_hours"] or 0)
        yield backlog
        yield oldest


class _OneDepartment:
    """A registry's view for one department: series of other departments left out; series
    without a department (the server's HTTP figures) kept."""

    def __init__(self, registry: CollectorRegistry, department_id: str):
        self.registry, self.department_id = registry, department_id

    def collect(self):
        for family in self.registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if s.labels.get("department", self.department_id)
                            == self.department_id]
            yield kept


class Metrics:
    def __init__(self, db: Database):
        self.registry = CollectorRegistry()
        self.requests = Counter("hangjia_http_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("hangjia_http_request_duration_seconds", "HTTP request duration",
                                         ["route"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.generation_seconds = Histogram("hangjia_generation_duration_seconds", "One generation, whole",
                                            ["department"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.first_token_seconds = Histogram("hangjia_time_to_first_token_seconds", "Time to the first token",
                                             ["department"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("hangjia_tokens", "Tokens read and generated", ["department", "kind"],
                              registry=self.registry)
        self.generation_errors = Counter("hangjia_generation_errors", "Generations that failed", ["department"],
                                         registry=self.registry)
        self.registry.register(_StoredTotals(db))

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_generation(self, department: str, seconds: float, ttft_seconds: float | None,
                           prompt_tokens: int, completion_tokens: int, failed: bool) -> None:
        self.generation_seconds.labels(department).observe(seconds)
        if ttft_seconds is not None:
            self.first_token_seconds.labels(department).observe(ttft_seconds)
        self.tokens.labels(department, "prompt").inc(prompt_tokens or 0)
        self.tokens.labels(department, "completion").inc(completion_tokens or 0)
        if failed:
            self.generation_errors.labels(department).inc()

    def exposition(self, department_id: str | None = None) -> bytes:
        """The text Prometheus scrapes: every series, or (department_id) one department's."""
        return generate_latest(self.registry if department_id is None else _OneDepartment(self.registry, department_id))

    def middleware(self):
        """An ASGI-level timing of every HTTP request (streams are timed to their end)."""
        metrics = self

        async def timed(request, call_next):
            started = time.perf_counter()
            status = 500
            try:
                response = await call_next(request)
                status = response.status_code
                return response
            finally:
                metrics.observe_request(route_of(request.url.path), request.method, status,
                                        time.perf_counter() - started)

        return timed
