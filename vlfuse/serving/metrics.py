"""A small Prometheus text-format registry: counters, gauges and histograms with labels, thread-safe."""
from __future__ import annotations

import threading
from typing import Dict, List, Sequence, Tuple

LabelValues = Tuple[str, ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: LabelValues, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    return repr(float(x)) if x != int(x) else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = ()):
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Dict[str, str]) -> LabelValues:
        return tuple(str(labels[n]) for n in self.labelnames)

    def render(self) -> List[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} {self.kind}"] + self._samples()

    def _samples(self) -> List[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._values: Dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def _samples(self) -> List[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = float(value)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, doc: str, labelnames: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS):
        super().__init__(name, doc, labelnames)
        self.buckets = tuple(sorted(buckets))
        self._series: Dict[LabelValues, List[float]] = {}  # per label set: bucket counts..., +Inf count, sum

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    series[i] += 1
            series[-2] += 1
            series[-1] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return int(series[-2]) if series else 0

    def _samples(self) -> List[str]:
        out = []
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            uppers = [_num(u) for u in self.buckets] + ["+Inf"]
            for upper, n in zip(uppers, series):
                le = 'le="' + upper + '"'
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {_num(n)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {_num(series[-2])}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {series[-1]!r}")
        return out


class ServiceMetrics:
    """Every metric the service exports."""

    def __init__(self):
        self.requests = Counter("vlfuse_http_requests_total", "HTTP requests by endpoint, method and status.",
                                ("endpoint", "method", "status"))
        self.latency = Histogram("vlfuse_http_request_duration_seconds", "HTTP request latency by endpoint.",
                                 ("endpoint",))
        self.in_flight = Gauge("vlfuse_http_requests_in_flight", "Requests being handled now.")
        self.batch_size = Histogram("vlfuse_batch_size", "Requests per model batch.", ("model",), BATCH_BUCKETS)
        self.batch_latency = Histogram("vlfuse_batch_duration_seconds", "Model time per batch.", ("model",))
        self.model_loaded = Gauge("vlfuse_model_loaded", "1 if the model is loaded.", ("model",))

    def render(self) -> str:
        metrics = (self.requests, self.latency, self.in_flight, self.batch_size, self.batch_latency,
                   self.model_loaded)
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
