"""Running the proxy: the CLI, config errors, health, metrics, shutdown, hostile input."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgwarden.api.config import ProxyConfig
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden_proxy.wire import messages as m
from tests.integration.conftest import Database, RunningProxy, base_config
from tests.integration.rawpg import RawClient, error_fields

PGWARDEN = [sys.executable, "-m", "pgwarden.cli"]


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_config_errors_name_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "connection": "x",
                "upstream": {
                    "host": "db",
                    "database": "d",
                    "username": "u",
                    "sslmode": "sometimes",
                },
                "auth": {"oidc": {"issuer": "https://idp.example.com"}},
                "policies": [
                    {"name": "p", "spec": {"access": "everything", "guardrails": {"maxRows": 0}}}
                ],
                "peers": {"addresses": ["10.0.0.5"]},
            }
        )
    )
    out = subprocess.run(
        [*PGWARDEN, "proxy", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "upstream.sslmode" in out.stderr
    assert "policies.0.spec.access" in out.stderr
    assert "policies.0.spec.guardrails.maxRows" in out.stderr
    assert "peers.addresses" in out.stderr
    assert "not host:port" in out.stderr
    cfg.write_text("connection: [unclosed")
    out = subprocess.run(
        [*PGWARDEN, "proxy", "--config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    assert "not valid YAML" in out.stderr
    out = subprocess.run(
        [*PGWARDEN, "proxy", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "cannot read" in out.stderr


def test_health_ready_and_metrics(proxy: RunningProxy) -> None:
    port = proxy.thread.server.health_port
    assert port
    assert http_get(port, "/healthz") == (200, "ok\n")
    assert http_get(port, "/readyz") == (200, "ready\n")
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("SELECT 1")
        status, text = http_get(port, "/metrics")
        assert "pgwarden_client_connections 1.0" in text
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.dsn(proxy.token(lifetime=-300))).close()
    status, text = http_get(port, "/metrics")
    assert status == 200
    assert 'pgwarden_statements_total{class_="read",decision="allow"}' in text
    assert 'pgwarden_auth_failures_total{reason="expired"} 1.0' in text
    assert "pgwarden_statement_duration_seconds_bucket" in text
    assert "pgwarden_bytes_to_client_total" in text
    assert http_get(port, "/nope")[0] == 404


def test_hostile_input_after_login_closes_only_that_session(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as bystander:
        for garbage in [
            b"\x00\x00\x00\x00\x00",
            b"Q\xff\xff\xff\xff",
            b"Z\x00\x00\x00\x04",
            b"S" + (50_000).to_bytes(4, "big"),
            b"p\x00\x00\x00\x08abcd",
        ]:
            c = RawClient(proxy.port)
            assert c.startup(proxy.token())[-1][0] == b"Z"
            c.send(garbage)
            t, body = c.recv()
            assert t == b"E"
            assert error_fields(body)["C"] == "08P01"
            assert c.closed()
            assert bystander.execute("SELECT 1").fetchone() == (1,)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(min_size=1, max_size=300))
def test_random_bytes_never_take_the_proxy_down(proxy: RunningProxy, data: bytes) -> None:
    c = RawClient(proxy.port, timeout=5)
    try:
        c.send(data)
        c.sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError, ConnectionError):
            c.sock.recv(4096)
    finally:
        c.close()
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def run_cli_proxy(
    tmp_path: Path, db: Database, issuer: LocalIssuer, **overrides
) -> tuple[subprocess.Popen[str], int, Path]:
    cfg = base_config(db.pg, db.password, issuer, **overrides)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = tmp_path / "proxy.log"
    proc = subprocess.Popen(
        [*PGWARDEN, "proxy", "--config", str(path)],
        stderr=log.open("w"),
        stdout=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + 20
    port: int | None = None
    while time.monotonic() < deadline and port is None:
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("msg") == "listening":
                port = rec["port"]
        time.sleep(0.05)
    assert port, log.read_text()
    return proc, port, log


def test_cli_proxy_logs_json_and_drains_on_sigterm(
    tmp_path: Path, db: Database, issuer: LocalIssuer
) -> None:
    proc, port, log = run_cli_proxy(tmp_path, db, issuer, metrics={"port": None})
    token = issuer.mint()
    dsn = f"host=127.0.0.1 port={port} dbname=app user=a password={token} sslmode=disable"
    try:
        idle = psycopg.connect(dsn, autocommit=True)
        busy = psycopg.connect(dsn, autocommit=True)
        results: list[object] = []

        def long_query() -> None:
            try:
                results.append(busy.execute("SELECT pg_sleep(1.5), 'done'").fetchone())
            except BaseException as e:
                results.append(e)

        t = threading.Thread(target=long_query)
        t.start()
        time.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        t.join(10)
        assert results == [("", "done")]  # the in-flight statement finished
        with pytest.raises(psycopg.OperationalError) as e:
            idle.execute("SELECT 1")
        assert "administrator command" in str(e.value) or "closed" in str(e.value)
        assert proc.wait(15) == 0
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn).close()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert token not in text
    assert db.password not in text
    records = [json.loads(line) for line in text.splitlines()]
    stmts = [r for r in records if r.get("msg") == "statement"]
    assert any(r["event"]["statement"] == "SELECT pg_sleep(1.5), 'done'" for r in stmts)
    assert records[-1]["msg"] == "stopped"


def test_sigterm_closes_idle_sessions_with_57p01(
    tmp_path: Path, db: Database, issuer: LocalIssuer
) -> None:
    proc, port, _ = run_cli_proxy(tmp_path, db, issuer, metrics={"port": None})
    try:
        c = RawClient(port)
        assert c.startup(issuer.mint())[-1][0] == b"Z"
        os.kill(proc.pid, signal.SIGTERM)
        t, body = c.recv()
        assert t == b"E"
        assert error_fields(body)["C"] == "57P01"
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_message_framing_of_server_messages_is_kept_under_tiny_writes(proxy: RunningProxy) -> None:
    # The client dribbles a query one byte at a time; the proxy must reassemble it.
    c = RawClient(proxy.port)
    assert c.startup(proxy.token())[-1][0] == b"Z"
    q = m.frame(b"Q", b"SELECT 'dribble'\x00")
    for b in q:
        c.send(bytes([b]))
    msgs = c.until(b"Z")
    assert [t for t, _ in msgs] == [b"T", b"D", b"C", b"Z"]


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_a_1gb_result_streams_with_bounded_memory(
    tmp_path: Path, db: Database, issuer: LocalIssuer
) -> None:
    """A slow reader of a 1 GiB result: the proxy applies backpressure instead of buffering."""
    proc, port, _ = run_cli_proxy(tmp_path, db, issuer, metrics={"port": None})
    try:
        c = RawClient(port, timeout=60)
        assert c.startup(issuer.mint())[-1][0] == b"Z"
        before = _rss_kib(proc.pid, "VmRSS")
        c.send(m.frame(b"Q", m.cstr("SELECT repeat('x', 1048576) FROM generate_series(1, 1024)")))
        first = c.sock.recv(1 << 16)
        assert first[:1] == b"T"
        time.sleep(2)  # the client stalls: the server keeps producing, the proxy must not hoard
        stalled = _rss_kib(proc.pid, "VmRSS")
        total, tail = len(first), first[-6:]
        buf = bytearray(1 << 20)
        while tail != b"Z\x00\x00\x00\x05I":
            n = c.sock.recv_into(buf)
            assert n, "the proxy closed the connection mid-result"
            total += n
            tail = (tail + bytes(buf[max(0, n - 6) : n]))[-6:]
        c.close()
        peak = _rss_kib(proc.pid, "VmHWM")
    finally:
        proc.kill()
        proc.wait(10)
    assert total > 1 << 30
    # Bounded: a few socket buffers and read chunks, not the result (1 GiB)
    assert stalled - before < 64 * 1024, (before, stalled)
    assert peak - before < 128 * 1024, (before, peak)


def test_a_failing_shutdown_step_still_stops_the_proxy(
    proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Otherwise the process would wait forever for a stop that never comes (a hung pod)."""
    server = proxy.thread.server

    def broken() -> None:
        raise RuntimeError("injected")

    monkeypatch.setattr(server.catalog, "close", broken)
    with caplog.at_level(logging.INFO, logger="pgwarden.proxy"):
        proxy.thread.stop(grace=1)
    assert server._stopped is not None
    assert server._stopped.is_set()  # serve_forever returns: the process exits
    messages = [r.getMessage() for r in caplog.records if r.name == "pgwarden.proxy"]
    assert messages[-2:] == ["shutdown: a step failed; stopping anyway", "stopped"]


@pytest.mark.parametrize("statements", [None, True])
def test_with_recording_on_statements_are_logged_only_when_asked(
    tmp_path: Path, db: Database, issuer: LocalIssuer, statements: bool | None
) -> None:
    """The recording keeps every statement: by default the log then keeps sessions only."""
    recording = {"spoolDir": str(tmp_path / "spool"), "sink": {"file": {"dir": str(tmp_path)}}}
    logging_ = {} if statements is None else {"statements": statements}
    proc, port, log = run_cli_proxy(
        tmp_path, db, issuer, metrics={"port": None}, recording=recording, logging=logging_
    )
    dsn = f"host=127.0.0.1 port={port} dbname=app user=a password={issuer.mint()} sslmode=disable"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT 'logged?'")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    messages = [json.loads(line)["msg"] for line in log.read_text().splitlines()]
    assert "session_start" in messages
    assert "session_end" in messages
    assert ("statement" in messages) is bool(statements)
    recorded = [p.read_text() for p in (tmp_path / "sessions").rglob("*.jsonl")]
    assert any("SELECT 'logged?'" in text for text in recorded)


def test_the_statement_log_is_on_by_default_without_recording(
    tmp_path: Path, db: Database, issuer: LocalIssuer
) -> None:
    cfg = ProxyConfig.model_validate(base_config(db.pg, db.password, issuer))
    assert cfg.statement_log
    off = base_config(db.pg, db.password, issuer, logging={"statements": False})
    assert not ProxyConfig.model_validate(off).statement_log
