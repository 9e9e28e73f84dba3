"""Prometheus metrics of a model server: requests by endpoint and status, latency, rows per model
call, and each version's state (scraped at ``tlkeras.serving.app.METRICS_PATH``).
"""

from __future__ import annotations

from tlkeras.serving.servables import ModelManager


class Metrics:
    """Prometheus metrics of one app, in its own registry (apps in one process stay apart)."""

    def __init__(self, model_name: str, max_batch_size: int = 1024) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.model = model_name
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tlkeras_serving_requests",
            "Requests answered, by endpoint and HTTP status code.",
            ["model", "endpoint", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tlkeras_serving_request_latency_seconds",
            "Time from request received to answer ready, by endpoint.",
            ["model", "endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        powers = [2**i for i in range(max(1, max_batch_size).bit_length() + 1)]
        self.batch_size = Histogram(
            "tlkeras_serving_batch_size",
            "Rows per model call (batching gathers concurrent requests into one call).",
            ["model", "version", "signature"],
            buckets=sorted(set(powers)),
            registry=self.registry,
        )

    def observe_batch(self, version: int, signature: str, rows: int) -> None:
        self.batch_size.labels(self.model, str(version), signature).observe(rows)

    def watch(self, manager: ModelManager) -> None:
        """Report ``manager``'s versions and their states at each scrape."""
        from prometheus_client.core import GaugeMetricFamily

        name = self.model

        class _Versions:
            def collect(self):
                family = GaugeMetricFamily(
                    "tlkeras_serving_model_version_state",
                    "1 for each version's current state (LOADING, AVAILABLE, END).",
                    labels=["model", "version", "state"],
                )
                for version, state in sorted(manager.statuses().items()):
                    family.add_metric([name, str(version), state.state], 1)
                yield family
                loaded = GaugeMetricFamily(
                    "tlkeras_serving_loaded_versions",
                    "Versions answering requests.",
                    labels=["model"],
                )
                loaded.add_metric([name], len(manager.available))
                yield loaded

        self.registry.register(_Versions())

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
