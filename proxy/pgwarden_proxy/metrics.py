"""Prometheus metrics of one proxy (its own registry, so several proxies can share a process)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


class ProxyMetrics:
    def __init__(self, connection: str) -> None:
        self.registry = CollectorRegistry()
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
        self.latency = Histogram(
            "pgwarden_statement_duration_seconds",
            "Statement latency seen by the proxy",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
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
        # Cache labelled children: .labels() costs a dict lookup plus locking on every call.
        self._stmt_children: dict[tuple[str, str], Counter] = {}

    def statement(self, classes: tuple[str, ...], decision: str, seconds: float) -> None:
        for c in classes:
            child = self._stmt_children.get((c, decision))
            if child is None:
                child = self._stmt_children[(c, decision)] = self.statements.labels(c, decision)
            child.inc()
        self.latency.observe(seconds)

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
