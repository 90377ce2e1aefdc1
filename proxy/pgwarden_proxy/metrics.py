"""Prometheus metrics of one proxy (its own registry, so several proxies can share a process)."""

from __future__ import annotations

import itertools
import math
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pgwarden_proxy.recording.recorder import Recorder

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _Flush(Collector):
    """Registered first: before a collection reads the metrics, the counts kept in plain
    numbers on the hot path are added to them."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self._flush()
        return []


class _LatencyHistogram(Collector):
    """`pgwarden_statement_duration_seconds`, counted in plain numbers (a Histogram's observe()
    takes a lock and several calls, once per statement) and exported as a histogram family."""

    NAME = "pgwarden_statement_duration_seconds"
    DOC = "Statement latency seen by the proxy"

    def __init__(self) -> None:
        self.bounds = (*_LATENCY_BUCKETS, math.inf)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # the bucket of the first bound >= seconds, as Histogram.observe counts it
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self.NAME, self.DOC)]

    def collect(self) -> list[Metric]:
        cumulative = itertools.accumulate(self.counts)
        # `le` as prometheus_client writes it: 0.0005, 1.0, +Inf
        les = ["+Inf" if b == math.inf else repr(float(b)) for b in self.bounds]
        buckets = [(le, n) for le, n in zip(les, cumulative, strict=True)]
        return [HistogramMetricFamily(self.NAME, self.DOC, buckets=buckets, sum_value=self.sum)]


class ProxyMetrics:
    """The per-statement and per-chunk counts (statements, latency, bytes) are kept in plain
    numbers and added to their prometheus metrics when the registry is collected (a scrape,
    served on the event loop): an `inc` costs a lock and several calls, once per statement."""

    def __init__(self, connection: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Flush(self._flush))
        labels = {"connection": connection}
        r = self.registry
        self.connections = Gauge(
            "pgwarden_client_connections", "Open client connections", registry=r
        )
        self.sessions_total = Counter(
            "pgwarden_sessions", "Authenticated sessions started", registry=r
        )
        self.auth_failures = Counter(
            "pgwarden_auth_failures", "Refused logins by reason", ["reason"], registry=r
        )
        self.upstream_errors = Counter(
            "pgwarden_upstream_errors", "Failed upstream logins by reason", ["reason"], registry=r
        )
        self.statements = Counter(
            "pgwarden_statements",
            "Statements by class and decision (a statement counts once per class)",
            ["class_", "decision"],
            registry=r,
        )
        self.latency = _LatencyHistogram()
        r.register(self.latency)
        self.bytes_to_client = Counter(
            "pgwarden_bytes_to_client", "Bytes relayed from the database to clients", registry=r
        )
        self.bytes_to_server = Counter(
            "pgwarden_bytes_to_server", "Bytes relayed from clients to the database", registry=r
        )
        self.protocol_violations = Counter(
            "pgwarden_protocol_violations", "Connections closed for malformed input", registry=r
        )
        self.reloads = Counter(
            "pgwarden_config_reloads",
            "Config reloads by result (applied, invalid)",
            ["result"],
            registry=r,
        )
        self.info = Gauge("pgwarden_info", "Proxy identity", list(labels), registry=r)
        self.info.labels(**labels).set(1)
        # Labelled children, made at a label set's first statement (as `labels().inc()` would)
        self._stmt_children: dict[tuple[str, str], Counter] = {}
        # not yet added to the metrics (see _flush)
        self.to_client_bytes = 0
        self.to_server_bytes = 0
        self._stmt_counts: dict[str, dict[str, int]] = {}  # decision -> class -> count

    def statement(self, classes: tuple[str, ...], decision: str, seconds: float) -> None:
        counts = self._stmt_counts.get(decision)
        if counts is None:
            counts = self._stmt_counts[decision] = {}
        for c in classes:
            n = counts.get(c)
            if n is None:
                self._stmt_children[(c, decision)] = self.statements.labels(c, decision)
                n = 0
            counts[c] = n + 1
        self.latency.observe(seconds)

    def _flush(self) -> None:
        if self.to_client_bytes:
            n, self.to_client_bytes = self.to_client_bytes, 0
            self.bytes_to_client.inc(n)
        if self.to_server_bytes:
            n, self.to_server_bytes = self.to_server_bytes, 0
            self.bytes_to_server.inc(n)
        for decision, counts in self._stmt_counts.items():
            for c, n in counts.items():
                if n:
                    counts[c] = 0
                    self._stmt_children[(c, decision)].inc(n)

    def recording(self, recorder: Recorder) -> None:
        """Gauges read at scrape time: what is not shipped yet, and whether shipping works."""
        r = self.registry
        spool, shipper = recorder.spool, recorder.shipper
        Gauge(
            "pgwarden_recording_spool_bytes", "Recorded bytes not yet shipped", registry=r
        ).set_function(lambda: spool.stats.bytes)
        Gauge(
            "pgwarden_recording_spool_limit_bytes",
            "recording.maxSpoolBytes: beyond it statements are refused",
            registry=r,
        ).set_function(lambda: spool.max_bytes)
        Gauge(
            "pgwarden_recording_segments_pending", "Sealed spool segments not yet shipped",
            registry=r,
        ).set_function(lambda: spool.stats.segments)  # fmt: skip
        Gauge(
            "pgwarden_recording_shipped_objects", "Objects the sink confirmed", registry=r
        ).set_function(lambda: shipper.objects)
        Gauge(
            "pgwarden_recording_ship_failures", "Failed attempts to ship a segment", registry=r
        ).set_function(lambda: shipper.failures)
        Gauge(
            "pgwarden_recording_last_ship_timestamp_seconds",
            "When a segment was last shipped (0: not yet)",
            registry=r,
        ).set_function(lambda: shipper.last_success)
        Gauge(
            "pgwarden_recording_failed", "1 when the spool cannot be written", registry=r
        ).set_function(lambda: 1 if (recorder.failed or spool.failed) else 0)

    def reloads_by(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
