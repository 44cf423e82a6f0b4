"""The service's Prometheus metrics and the endpoint labels they use."""

from __future__ import annotations

import logging
import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServingMetrics:
    """vitrine_* metrics in a registry of their own (BentoML keeps its default one)."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created gauges: half the exposition, no information
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "vitrine_requests",
            "Requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "vitrine_request_errors",
            "4xx / 5xx answers by endpoint and class",
            ["endpoint", "kind"],
            registry=r,
        )
        self.latency = Histogram(
            "vitrine_request_latency_seconds",
            "Request latency",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vitrine_model_batch_size",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.cache = Counter(
            "vitrine_cache_lookups", "sha256 cache lookups by result", ["result"], registry=r
        )
        self.reloads = Counter(
            "vitrine_reloads", "Champion reload attempts by outcome", ["outcome"], registry=r
        )
        self.arm_requests = Counter(
            "vitrine_ab_requests",
            "A/B requests by arm, version, status",
            ["arm", "version", "status"],
            registry=r,
        )
        self.arm_latency = Histogram(
            "vitrine_ab_latency_seconds",
            "A/B latency by arm",
            ["arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "vitrine_model_info",
            "1 for the model version being served (by any worker)",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.refused = Gauge(
            "vitrine_champion_alias_refused",
            "1 for a version the champion alias names but vitrine did not promote (not served)",
            ["version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self._refused: str | None = None
        self._warned: set[str] = set()
        self.log_errors = Counter(
            "vitrine_log_write_errors",
            "Records dropped because a log could not be written (full disk, …), by log",
            ["log"],
            registry=r,
        )

    def log_write_failed(self, log: str, error: OSError) -> None:
        """A dropped log record: counted; the first of each log said in the service's log."""
        if log not in self._warned:
            self._warned.add(log)
            logging.getLogger("vitrine.service").warning("%s log not written: %s", log, error)
        self.log_errors.labels(log).inc()

    def set_refused(self, version: str | None) -> None:
        """1 for the version the champion alias names while it is refused (not audited)."""
        if self._refused is not None and self._refused != version:
            self.refused.labels(self._refused).set(0)
        if version is not None:
            self.refused.labels(version).set(1)
        self._refused = version

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, "client" if status < 500 else "server").inc()

    def observe_arm(self, arm: str, version: str, status: int, seconds: float) -> None:
        self.arm_requests.labels(arm, version, str(status)).inc()
        self.arm_latency.labels(arm).observe(seconds)

    def set_model_version(self, version: str, previous: str | None = None) -> None:
        if previous is not None:  # clear() is not supported in multi-process mode
            self.model_info.labels(previous).set(0)
        self.model_info.labels(version).set(1)

    def render(self) -> bytes:
        """The exposition. Under BentoML's workers (PROMETHEUS_MULTIPROC_DIR set) every
        worker's values are summed from the shared folder, so /metrics tells the same totals
        whichever worker answers; vitrine_* families only (the folder holds BentoML's too)."""
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder or not os.path.isdir(folder):
            return generate_latest(self.registry)
        merged = MultiProcessCollector(None, path=folder).collect()
        return generate_latest(_Families([f for f in merged if f.name.startswith("vitrine_")]))


class _Families:
    """Metric families already collected, in the shape generate_latest reads."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self) -> list:
        return self.families


ENDPOINTS = (
    "/",
    "/classify",
    "/tags",
    "/search",
    "/search_text",
    "/recommend",
    "/embed",
    "/explain",
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin/reload",
)


def endpoint_label(path: str) -> str:
    """A bounded metrics label for a request path (product ids are not labels)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/products/"):
        return "/products/{id}/image" if path.endswith("/image") else "/products/{id}"
    return "other"
