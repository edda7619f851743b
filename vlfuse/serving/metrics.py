"""The service's Prometheus metrics, kept by ``prometheus_client`` in a registry of the app's own (several apps
may live in one process, as in the tests, and each counts only its own requests)."""
from __future__ import annotations

from typing import Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServiceMetrics:
    """Every metric the service exports, in ``registry``."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("vlfuse_http_requests_total", "HTTP requests by endpoint, method and status.",
                                ("endpoint", "method", "status"), registry=self.registry)
        self.latency = Histogram("vlfuse_http_request_duration_seconds", "HTTP request latency by endpoint.",
                                 ("endpoint",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("vlfuse_http_requests_in_flight", "Requests being handled now.",
                               registry=self.registry)
        self.batch_size = Histogram("vlfuse_batch_size", "Requests per model batch.", ("model",),
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_latency = Histogram("vlfuse_batch_duration_seconds", "Model time per batch.", ("model",),
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.model_loaded = Gauge("vlfuse_model_loaded", "1 if the model is loaded.", ("model",),
                                  registry=self.registry)

    def render(self, accept: str = "") -> Tuple[bytes, str]:
        """The exposition for a scraper's ``Accept`` header: (body, content type). Prometheus' text format
        (version 0.0.4) unless OpenMetrics is asked for."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
