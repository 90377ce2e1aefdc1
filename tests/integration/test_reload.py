"""Policy changes reach running sessions: SIGHUP and a watched file, without dropping anyone."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import yaml

from pgwarden.embedded.issuer import LocalIssuer
from tests.integration.conftest import Database, base_config
from tests.integration.test_operations import run_cli_proxy


def _policies(access: str, **guardrails: object) -> list[dict[str, object]]:
    spec: dict[str, object] = {"subjects": {"groups": ["ai-agents"]}, "access": access}
    if guardrails:
        spec["guardrails"] = guardrails
    return [{"name": "agents", "spec": spec}]


def _rewrite(path: Path, db: Database, issuer: LocalIssuer, **overrides: object) -> None:
    cfg = base_config(db.pg, db.password, issuer, metrics={"port": None}, **overrides)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(cfg))
    tmp.replace(path)  # as a ConfigMap update does: the file is swapped, never half-written


def _until(check: Callable[[], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the proxy did not pick up the change"
        time.sleep(0.1)


def _refused(conn: psycopg.Connection[tuple[object, ...]], sql: str) -> str | None:
    """The refusal message, or None when the statement ran."""
    try:
        conn.execute(sql)
    except psycopg.errors.InsufficientPrivilege as e:
        return str(e)
    return None


def test_sighup_and_file_changes_apply_to_running_sessions(
    tmp_path: Path, db: Database, issuer: LocalIssuer
) -> None:
    proc, port, log = run_cli_proxy(
        tmp_path, db, issuer, metrics={"port": None}, policies=_policies("read-write")
    )
    path = tmp_path / "proxy.yaml"
    dsn = f"host=127.0.0.1 port={port} dbname=app user=a password={issuer.mint()} sslmode=disable"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert _refused(conn, "CREATE TEMP TABLE reload_a (x int)") is None

            # SIGHUP: the session, still open, is read-only from its next statement on
            _rewrite(path, db, issuer, policies=_policies("read-write", deny=["ddl"]))
            proc.send_signal(signal.SIGHUP)
            _until(lambda: _refused(conn, "CREATE TEMP TABLE reload_b (x int)") is not None)
            msg = _refused(conn, "CREATE TEMP TABLE reload_c (x int)")
            assert msg is not None
            assert 'class "ddl" are denied by policy "agents"' in msg
            assert conn.execute("SELECT 1").fetchone() == (1,)

            # a broken file changes nothing, and says why in the log
            _rewrite(path, db, issuer, policies=_policies("read-sometimes"))
            proc.send_signal(signal.SIGHUP)
            _until(lambda: "config reload failed" in log.read_text())
            assert _refused(conn, "CREATE TEMP TABLE reload_d (x int)") is not None
            assert conn.execute("SELECT 2").fetchone() == (2,)

            # the file watch alone (no signal) picks up a changed file
            _rewrite(path, db, issuer, policies=_policies("read-write"))
            _until(lambda: _refused(conn, "CREATE TEMP TABLE reload_e (x int)") is None)

            # an identity that no policy grants any more is refused statement by statement
            _rewrite(path, db, issuer, policies=[])
            _until(lambda: _refused(conn, "SELECT 3") is not None)
            msg = _refused(conn, "SELECT 4")
            assert msg is not None
            assert "no AccessPolicy grants this identity access" in msg
        _until(lambda: '"session ended"' in log.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    failed = [r for r in records if r.get("msg", "").startswith("config reload failed")]
    assert failed
    assert failed[0]["error"].endswith(
        "invalid config:\n  policies.0.spec.access: Input should be 'read-only' or 'read-write'"
    )
    assert sum(r.get("msg") == "config reloaded" for r in records) >= 3
    ends = [r for r in records if r.get("msg") == "session ended"]
    assert [r["reason"] for r in ends] == ["client terminated"]  # never dropped by a reload


@pytest.mark.parametrize("field", ["listen", "auth"])
def test_fields_that_need_a_restart_are_named_and_kept(
    tmp_path: Path, db: Database, issuer: LocalIssuer, field: str
) -> None:
    proc, port, log = run_cli_proxy(tmp_path, db, issuer, metrics={"port": None})
    path = tmp_path / "proxy.yaml"
    change: dict[str, object] = (
        {"listen": {"port": port + 1}}
        if field == "listen"
        else {"auth": {"oidc": {"issuer": "https://elsewhere.example", "audience": "x"}}}
    )
    try:
        _rewrite(path, db, issuer, **change)
        proc.send_signal(signal.SIGHUP)
        _until(lambda: "take effect only after a restart" in log.read_text())
        dsn = f"host=127.0.0.1 port={port} dbname=app user=a password={issuer.mint()} "
        with psycopg.connect(dsn + "sslmode=disable") as conn:  # same port, same issuer
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    warning = next(
        json.loads(line)
        for line in log.read_text().splitlines()
        if "take effect only after a restart" in line
    )
    assert warning["fields"] == [field]
