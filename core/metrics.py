"""Prometheus metrics, one registry per app (so tests can build many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from core.store import STATES


class _JobStateCollector:
    def __init__(self, store):
        self.store = store

    def collect(self):
        counts = self.store.counts_by_status()
        jobs = GaugeMetricFamily("dpo_jobs", "Jobs in the store by state", labels=["state"])
        for state in STATES:
            jobs.add_metric([state], counts.get(state, 0))
        yield jobs
        yield GaugeMetricFamily("dpo_queue_depth", "Jobs waiting to run", value=counts.get("queued", 0))


class Metrics:
    def __init__(self, store):
        self.registry = CollectorRegistry()
        self.registry.register(_JobStateCollector(store))
        self.job_duration = Histogram(
            "dpo_job_duration_seconds",
            "Wall time of finished jobs",
            ["status"],
            registry=self.registry,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
        )
        self.jobs_finished = Counter(
            "dpo_jobs_finished", "Jobs that reached a final state", ["status"], registry=self.registry
        )
        self.request_latency = Histogram(
            "dpo_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.tokens_per_s = Gauge(
            "dpo_training_tokens_per_second", "Training throughput of the latest step", registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
