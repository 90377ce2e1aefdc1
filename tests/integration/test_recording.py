"""Session recordings through a real proxy: complete, chained, masked, shipped, crash-safe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from pgwarden.recording.format import event_hash, genesis, session_index_key
from pgwarden.recording.s3 import S3Store
from pgwarden.recording.store import FileStore, Store
from tests.integration.conftest import (
    APP_DB,
    APP_USER,
    Database,
    MakeProxy,
    RunningProxy,
    base_config,
)
from tests.integration.test_operations import PGWARDEN, http_get
from tests.s3server import MotoServer

EMAIL = "jane.roe@example.org"
SSN = "123-45-6789"


# ---------------------------------------------------------------------------------- helpers
def owner_dsn(db: Database) -> str:
    return (
        f"host=127.0.0.1 port={db.pg.port} dbname={APP_DB} user={APP_USER} password={db.password}"
    )


@pytest.fixture(scope="module")
def customers(db: Database) -> None:
    with psycopg.connect(owner_dsn(db), autocommit=True) as conn:
        conn.execute(
            "DROP TABLE IF EXISTS rec_customers;"
            "CREATE TABLE rec_customers (id int PRIMARY KEY, email text, note text);"
            f"INSERT INTO rec_customers VALUES (1, '{EMAIL}', 'ssn {SSN} on file'),"
            "(2, 'x@example.com', 'nothing'), (3, 'y@example.com', 'nothing');"
            "DROP TABLE IF EXISTS rec_log; CREATE TABLE rec_log (n int)"
        )


def session_lines(store: Store, session_id: str) -> list[bytes]:
    index = json.loads(store.get(session_index_key(session_id)))
    lines: list[bytes] = []
    for key in store.list(index["prefix"] + "events/"):
        lines.extend(store.get(key).splitlines())
    return lines


def chained(session_id: str, lines: list[bytes]) -> list[dict[str, Any]]:
    """The events, after checking seq and chain (what `sessions verify` checks, done here
    independently so a bug in one cannot hide a bug in the other)."""
    events = [json.loads(line) for line in lines]
    prev = genesis(session_id)
    for i, (line, ev) in enumerate(zip(lines, events, strict=True), start=1):
        assert ev["seq"] == i, (i, ev)
        assert ev["prev"] == prev, f"chain broken at seq {i}"
        assert ev["sessionId"] == session_id
        prev = event_hash(line)
    return events


def manifest(store: Store, session_id: str) -> dict[str, Any]:
    index = json.loads(store.get(session_index_key(session_id)))
    result: dict[str, Any] = json.loads(store.get(index["prefix"] + "manifest.json"))
    return result


def complete(store: Store, session_id: str) -> list[dict[str, Any]]:
    lines = session_lines(store, session_id)
    events = chained(session_id, lines)
    m = manifest(store, session_id)
    assert m["events"] == len(events) == m["lastSeq"]
    assert m["finalHash"] == event_hash(lines[-1])
    return events


def statements(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Statement events by seq, each with its outcome joined in (`outcome` key)."""
    out = {e["seq"]: dict(e) for e in events if e["type"] == "statement"}
    for e in events:
        if e["type"] == "outcome":
            out[e["ref"]]["outcome"] = e
    return out


def session_ids(proxy: RunningProxy) -> list[str]:
    return [e.session_id for e in proxy.sink.sessions if e.type == "session_start"]


def recording(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "spoolDir": str(tmp_path / "spool"),
        "sink": {"file": {"dir": str(tmp_path / "recordings")}},
        "shipInterval": "200ms",
        **extra,
    }


def wait_for(check: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def metric(port: int, name: str) -> float:
    _, text = http_get(port, "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------------------------- file sink
def test_a_session_is_recorded_whole_masked_and_without_secrets(
    make_proxy: MakeProxy, tmp_path: Path, db: Database, customers: None
) -> None:
    spec = {
        "subjects": {"groups": ["ai-agents"]},
        "access": "read-only",
        "guardrails": {"deny": ["drop", "ddl"]},
        "masking": [
            {"columns": ["public.rec_customers.email"], "strategy": "redact"},
            {"detectors": ["us-ssn"], "strategy": "redact"},
        ],
        "recording": {"level": "results"},
    }
    proxy = make_proxy(
        policies=[{"name": "agents-ro", "spec": spec}], recording=recording(tmp_path)
    )
    token = proxy.token()
    with psycopg.connect(proxy.dsn(token), autocommit=True) as conn:
        rows = conn.execute("SELECT id, email, note FROM rec_customers ORDER BY id").fetchall()
        assert EMAIL not in str(rows)
        assert conn.execute("SELECT upper(email) FROM rec_customers WHERE id = %s", (1,)).fetchone()
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pgwarden:"):
            conn.execute("DROP TABLE rec_customers")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # read-only: refused
            conn.execute(f"ALTER ROLE {APP_USER} PASSWORD 'sekrit-pw-123'")
    proxy.thread.stop(grace=2)
    store = FileStore(tmp_path / "recordings")
    (sid,) = session_ids(proxy)
    events = complete(store, sid)
    start = events[0]
    assert start["type"] == "session_start"
    assert start["identity"] == "agent@example.com"
    assert start["groups"] == ["ai-agents"]
    assert start["policies"] == ["agents-ro"]
    assert start["level"] == "results"
    assert start["effectivePolicy"]["access"] == "read-only"
    assert events[-1]["type"] == "session_end"
    by_seq = statements(events)
    texts = [s["statement"] for s in by_seq.values()]
    assert texts[0] == "SELECT id, email, note FROM rec_customers ORDER BY id"
    first = next(iter(by_seq.values()))
    assert first["decision"] == "allow"
    result = first["outcome"]["result"]
    assert result["columns"] == ["id", "email", "note"]
    assert result["totalRows"] == 3
    assert result["capturedRows"] == 3
    assert result["rows"][0][0] == "1"
    assert result["rows"][0][1] != EMAIL
    assert result["digest"].startswith("sha256:")
    param = next(s for s in by_seq.values() if s["protocol"] == "extended")
    assert param["parameters"] == ["1"]
    drop = next(s for s in by_seq.values() if s["statement"] == "DROP TABLE rec_customers")
    assert drop["decision"] == "refuse"
    assert drop["policy"] == "agents-ro"
    assert drop["outcome"]["error"]["sqlstate"] == "42501"
    div = next(s for s in by_seq.values() if s["statement"] == "SELECT 1/0")
    assert div["outcome"]["error"]["sqlstate"] == "22012"
    # secrets and unmasked values never reach the store
    everything = b"".join(
        p.read_bytes() for p in (tmp_path / "recordings").rglob("*") if p.is_file()
    )
    for secret in (token, db.password, EMAIL, SSN, EMAIL.upper(), "sekrit-pw-123"):
        assert secret.encode() not in everything, secret
    assert any("PASSWORD '[redacted]'" in s["statement"] for s in by_seq.values())
    assert list((tmp_path / "spool").glob("*.seg")) == []  # all shipped


def test_approvals_are_recorded_with_the_approver(
    make_proxy: MakeProxy, tmp_path: Path, customers: None
) -> None:
    from pgwarden.cli import main as cli

    spec = {
        "subjects": {"groups": ["ai-agents"]},
        "access": "read-write",
        "approvals": {"require": ["write"]},
    }
    approvals = tmp_path / "approvals"
    proxy = make_proxy(
        policies=[{"name": "careful", "spec": spec}],
        approvals={"backend": "file", "dir": str(approvals), "holdTimeout": "30s"},
        recording=recording(tmp_path),
    )
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    done: list[Any] = []
    t = threading.Thread(
        target=lambda: done.append(conn.execute("INSERT INTO rec_log VALUES (7)").rowcount)
    )
    t.start()
    req = wait_for(lambda: sorted(approvals.glob("*.json")), what="an approval request")[0]
    name = req.stem
    assert (
        cli(["approvals", "approve", name, "--dir", str(approvals), "--by", "bob@example.com"]) == 0
    )
    t.join(15)
    assert done == [1]
    conn.close()
    proxy.thread.stop(grace=2)
    store = FileStore(tmp_path / "recordings")
    events = complete(store, session_ids(proxy)[0])
    held = next(e for e in events if e["type"] == "statement")
    assert held["decision"] == "hold"
    approval = next(e for e in events if e["type"] == "approval")
    assert approval["ref"] == held["seq"]
    assert approval["request"] == name
    assert approval["decidedBy"] == "bob@example.com"
    assert approval["decision"] == "approved"
    outcome = next(e for e in events if e["type"] == "outcome")
    assert outcome["ref"] == held["seq"]
    assert outcome["rows"] == 1
    # the approval is recorded before the statement ran: its seq comes first
    assert approval["seq"] < outcome["seq"]


# ---------------------------------------------------------------------------------- S3
@pytest.fixture
def bucket(s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    name = f"rec-{uuid.uuid4().hex[:12]}"
    s3.make_bucket(name)
    yield name
    s3.up()


def s3_recording(tmp_path: Path, s3: MotoServer, bucket: str, **extra: Any) -> dict[str, Any]:
    return {
        "spoolDir": str(tmp_path / "spool"),
        "sink": {"s3": {"bucket": bucket, "prefix": "audit/", "endpointUrl": s3.endpoint_url}},
        "shipInterval": "200ms",
        **extra,
    }


def test_hundreds_of_statements_arrive_complete_in_s3(
    make_proxy: MakeProxy, tmp_path: Path, s3: MotoServer, bucket: str, customers: None
) -> None:
    proxy = make_proxy(recording=s3_recording(tmp_path, s3, bucket, segmentBytes=8192))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(150):
            conn.execute("SELECT %s::int + 1", (i,))
            conn.execute(f"SELECT {i} AS n")
    proxy.thread.stop(grace=2)
    store = S3Store(bucket, "audit/", endpoint_url=s3.endpoint_url)
    (sid,) = session_ids(proxy)
    events = complete(store, sid)
    stmts = statements(events)
    assert len(stmts) == 300
    assert all("outcome" in s for s in stmts.values())
    assert len(list(store.list(json.loads(store.get(session_index_key(sid)))["prefix"]))) > 3


def test_s3_down_for_a_while_loses_nothing(
    make_proxy: MakeProxy, tmp_path: Path, s3: MotoServer, bucket: str, customers: None
) -> None:
    proxy = make_proxy(recording=s3_recording(tmp_path, s3, bucket, segmentBytes=4096))
    spool = tmp_path / "spool"
    s3.down()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(60):
            conn.execute("SELECT %s::int", (i,))
        wait_for(lambda: len(list(spool.glob("*.seg"))) >= 2, what="sealed segments")
        port = proxy.thread.server.health_port
        assert port is not None
        wait_for(lambda: metric(port, "pgwarden_recording_ship_failures") > 0, what="failures")
        assert metric(port, "pgwarden_recording_spool_bytes") > 0
        assert metric(port, "pgwarden_recording_segments_pending") >= 2
        s3.up()
        wait_for(lambda: not list(spool.glob("*.seg")), what="the spool to drain")
        conn.execute("SELECT 'after'")
    proxy.thread.stop(grace=2)
    store = S3Store(bucket, "audit/", endpoint_url=s3.endpoint_url)
    stmts = statements(complete(store, session_ids(proxy)[0]))
    assert len(stmts) == 61


FULL_SPOOL = 65536


def spool_that_fills(
    make_proxy: MakeProxy, tmp_path: Path, s3: MotoServer, bucket: str
) -> RunningProxy:
    """A proxy whose small spool fills within a few dozen statements: S3 is down."""
    proxy = make_proxy(
        recording=s3_recording(tmp_path, s3, bucket, segmentBytes=4096, maxSpoolBytes=FULL_SPOOL)
    )
    s3.down()
    return proxy


def shipping_resumes(proxy: RunningProxy, tmp_path: Path, s3: MotoServer) -> None:
    """S3 comes back: until the spool has drained and the proxy has counted it."""
    s3.up()
    wait_for(lambda: not list((tmp_path / "spool").glob("*.seg")), what="the spool to drain")
    # the shipper's process reports each removed segment; the proxy counts it then
    port = proxy.thread.server.health_port
    assert port is not None
    wait_for(lambda: metric(port, "pgwarden_recording_spool_bytes") < FULL_SPOOL, what="the count")


def test_a_full_spool_refuses_statements_until_shipping_resumes(
    make_proxy: MakeProxy, tmp_path: Path, s3: MotoServer, bucket: str, customers: None
) -> None:
    proxy = spool_that_fills(make_proxy, tmp_path, s3, bucket)
    filler = "x" * 2000
    refused: psycopg.Error | None = None
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for _ in range(200):
            try:
                conn.execute(f"SELECT '{filler}' AS pad")
            except psycopg.Error as e:
                refused = e
                break
        assert refused is not None, "the spool never filled"
        assert refused.sqlstate == "53100"
        assert "recording spool is full" in str(refused)
        assert "nothing may run unrecorded" in str(refused)
        with pytest.raises(psycopg.OperationalError, match="recording spool is full"):
            psycopg.connect(proxy.dsn())  # no new session either
        shipping_resumes(proxy, tmp_path, s3)
        assert conn.execute("SELECT 'back'").fetchone() == ("back",)
    proxy.thread.stop(grace=2)
    store = S3Store(bucket, "audit/", endpoint_url=s3.endpoint_url)
    stmts = statements(complete(store, session_ids(proxy)[0]))
    refusals = [s for s in stmts.values() if s["decision"] == "refuse"]
    assert len(refusals) == 1  # recorded too: the spool takes small events beyond its bound


# ---------------------------------------------------------------------------------- kill -9
def start_cli_proxy(
    config: dict[str, Any], path: Path, log: Path
) -> tuple[subprocess.Popen[str], int]:
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [*PGWARDEN, "proxy", "--config", str(path)],
        stderr=log.open("w"),
        stdout=subprocess.DEVNULL,
        text=True,
    )

    def port() -> int | None:
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("msg") == "listening":
                return int(rec["port"])
        return None

    return proc, wait_for(port, what=f"the proxy to listen: {log}")


def test_kill_9_loses_no_statement_a_client_saw(
    tmp_path: Path, db: Database, issuer: Any, customers: None
) -> None:
    config = base_config(db.pg, db.password, issuer, recording=recording(tmp_path))
    proc, port = start_cli_proxy(config, tmp_path / "proxy.yaml", tmp_path / "proxy.log")
    token = issuer.mint()
    acked: list[int] = []
    stop = threading.Event()

    def busy() -> None:
        dsn = (
            f"host=127.0.0.1 port={port} dbname={APP_DB} user=agent password={token} "
            "sslmode=disable"
        )
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                i = 0
                while not stop.is_set():
                    if i % 2:
                        conn.execute(f"INSERT INTO rec_log VALUES ({i})")
                    else:  # in a transaction block: the INSERT does not wait, the COMMIT does
                        with conn.transaction():
                            conn.execute(f"INSERT INTO rec_log VALUES ({i})")
                    acked.append(i)  # the client saw the result
                    i += 1
        except psycopg.Error:
            pass  # the proxy died under us

    t = threading.Thread(target=busy)
    t.start()
    wait_for(lambda: len(acked) > 200, what="a busy session")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    stop.set()
    t.join(10)
    assert acked
    # a restart with the same spool ships what the dead process left, and closes its session
    proc2, _ = start_cli_proxy(config, tmp_path / "proxy.yaml", tmp_path / "proxy2.log")
    wait_for(lambda: not list((tmp_path / "spool").glob("*.seg")), what="the spool to drain")
    proc2.send_signal(signal.SIGTERM)
    proc2.wait(20)
    store = FileStore(tmp_path / "recordings")
    (key,) = list(store.list("index/sessions/"))
    sid = json.loads(store.get(key))["sessionId"]
    events = complete(store, sid)
    recorded = {s["statement"] for s in statements(events).values()}
    missing = [i for i in acked if f"INSERT INTO rec_log VALUES ({i})" not in recorded]
    assert missing == []
    end = events[-1]
    assert end["type"] == "session_end"
    assert end["recovered"] is True
    assert manifest(store, sid)["recovered"] is True
    assert "closed sessions left open by a crash" in (tmp_path / "proxy2.log").read_text()


# ---------------------------------------------------------------------------------- fast path
def _prepared_workload(dsn: str) -> None:
    """Executions of prepared statements (fast path material): reads, writes outside and inside
    a transaction block, and a failure."""
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=0) as conn:
        for i in range(20):
            conn.execute("SELECT %s::int + 1, %s::text", (i, f"p{i}"))
        for i in range(3):
            conn.execute("INSERT INTO rec_log VALUES (%s)", (i,))
        with conn.transaction():
            conn.execute("INSERT INTO rec_log VALUES (%s)", (10,))
            conn.execute("SELECT %s::int + 1, %s::text", (99, "in block"))
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / %s::int", (0,))
        conn.execute("SELECT %s::int + 1, %s::text", (-1, "after"))


def _comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drop = {"seq", "prev", "time", "sessionId", "durationMs", "ref"}
    return [{k: v for k, v in e.items() if k not in drop} for e in events]


def test_the_fast_path_records_what_the_python_path_records(
    make_proxy: MakeProxy, tmp_path: Path, customers: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgwarden_proxy import fastpath
    from pgwarden_proxy.session import Session

    if fastpath.FastPath is None:
        pytest.skip("the C fast path is not built (no C compiler at install)")
    fast_done = Session._fast_done
    calls: list[int] = []

    def counted(self: Session, done: Any) -> None:
        calls.append(len(done))
        fast_done(self, done)

    monkeypatch.setattr(Session, "_fast_done", counted)
    recorded: dict[bool, list[dict[str, Any]]] = {}
    for enabled in (True, False):
        monkeypatch.setattr(fastpath, "ENABLED", enabled)
        calls.clear()
        proxy = make_proxy(recording=recording(tmp_path / str(enabled)))
        _prepared_workload(proxy.dsn())
        proxy.thread.stop(grace=2)
        store = FileStore(tmp_path / str(enabled) / "recordings")
        (sid,) = session_ids(proxy)
        recorded[enabled] = complete(store, sid)  # chained, counted, manifest
        # most executions took the fast path when it was on, none when off
        assert (sum(calls) >= 20) if enabled else not calls
    on, off = recorded[True], recorded[False]
    assert [e["type"] for e in on] == [e["type"] for e in off]
    assert _comparable(on[1:-1]) == _comparable(off[1:-1])  # (start/end: times, ids)
    stmts = statements(on)
    assert sum(1 for s in stmts.values() if s["statement"].startswith("INSERT")) == 4
    assert all("outcome" in s for s in stmts.values())


def test_a_full_spool_refuses_prepared_executions_too(
    make_proxy: MakeProxy, tmp_path: Path, s3: MotoServer, bucket: str, customers: None
) -> None:
    """The fast path asks the recorder before every read, as the decision point does."""
    proxy = spool_that_fills(make_proxy, tmp_path, s3, bucket)
    filler = "x" * 2000
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        with pytest.raises(psycopg.Error) as refused:  # noqa: PT012 - until the spool fills
            for _ in range(200):
                conn.execute("SELECT %s::text AS pad", (filler,))
        assert refused.value.sqlstate == "53100"
        assert "recording spool is full" in str(refused.value)
        shipping_resumes(proxy, tmp_path, s3)
        assert conn.execute("SELECT %s::text", ("back",)).fetchone() == ("back",)
    proxy.thread.stop(grace=2)
    store = S3Store(bucket, "audit/", endpoint_url=s3.endpoint_url)
    stmts = statements(complete(store, session_ids(proxy)[0]))
    assert [s["decision"] for s in stmts.values()].count("refuse") == 1
    assert all("outcome" in s for s in stmts.values())
