"""Statements held for a person: approved runs once, denied and expired are refused."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgwarden.cli import main as cli
from tests.integration.conftest import APP_DB, APP_USER, Database, MakeProxy, RunningProxy


@pytest.fixture
def ledger(db: Database) -> str:
    dsn = f"host=127.0.0.1 port={db.pg.port} dbname={APP_DB} user={APP_USER} password={db.password}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DROP TABLE IF EXISTS ledger; CREATE TABLE ledger (id int PRIMARY KEY, amount int);"
            "INSERT INTO ledger VALUES (1, 100), (2, 200)"
        )
    return dsn


def held_proxy(make_proxy: MakeProxy, tmp_path: Path, hold: str = "30s") -> RunningProxy:
    spec = {
        "subjects": {"groups": ["ai-agents"]},
        "access": "read-write",
        "approvals": {"require": ["write"]},
    }
    return make_proxy(
        policies=[{"name": "careful", "spec": spec}],
        approvals={"backend": "file", "dir": str(tmp_path / "approvals"), "holdTimeout": hold},
    )


def pending(tmp_path: Path, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in sorted((tmp_path / "approvals").glob("*.json")):
            req: dict[str, Any] = json.loads(f.read_text())
            if req["status"]["state"] == "Pending":
                return req
        time.sleep(0.05)
    raise AssertionError("no approval request appeared")


def run_in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=target)
    t.start()
    return t, result


def amount(dsn: str, id_: int) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT amount FROM ledger WHERE id = %s", (id_,)).fetchone()
    assert row is not None
    return int(row[0])


def test_approved_statement_runs_once(
    make_proxy: MakeProxy, tmp_path: Path, ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = held_proxy(make_proxy, tmp_path)
    notices: list[str] = []
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} | {d.message_hint}"))
    assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (2,)  # reads are not held
    t, result = run_in_thread(
        lambda: conn.execute("UPDATE ledger SET amount = amount + %s WHERE id = 1", (5,)).rowcount
    )
    req = pending(tmp_path)
    assert req["spec"]["statement"] == "UPDATE ledger SET amount = amount + $1 WHERE id = 1"
    assert req["spec"]["parameters"] == ["5"]
    assert req["spec"]["classes"] == ["read", "write"] or req["spec"]["classes"] == ["write"]
    assert req["spec"]["requester"]["username"] == "agent@example.com"
    assert req["spec"]["policy"] == "careful"
    assert amount(ledger, 1) == 100  # held: not run yet
    # four eyes: the requester cannot approve their own statement
    assert cli(["approvals", "approve", req["name"], "--dir", str(tmp_path / "approvals"),
                "--by", "agent@example.com"]) == 1  # fmt: skip
    assert cli(["approvals", "approve", req["name"], "--dir", str(tmp_path / "approvals"),
                "--by", "bob@example.com", "--comment", "ok"]) == 0  # fmt: skip
    t.join(15)
    assert result == [1]
    assert amount(ledger, 1) == 105
    assert any(req["name"] in n and "needs approval" in n for n in notices), notices
    assert any("pgwarden approvals approve" in n for n in notices)
    conn.close()
    done = json.loads((tmp_path / "approvals" / f"{req['name']}.json").read_text())
    assert done["status"]["state"] == "Executed"
    ev = next(e for e in proxy.sink.statements if e.command == "UPDATE")
    assert ev.decision == "approved"
    assert ev.approval is not None
    assert ev.approval["decidedBy"] == "bob@example.com"
    assert ev.rows == 1
    capsys.readouterr()


def test_denied_statement_is_refused_and_aborts_the_transaction(
    make_proxy: MakeProxy, tmp_path: Path, ledger: str, capsys: pytest.CaptureFixture[str]
) -> None:
    proxy = held_proxy(make_proxy, tmp_path)
    with psycopg.connect(proxy.dsn()) as conn:  # a transaction block
        conn.execute("SELECT 1")
        t, result = run_in_thread(lambda: conn.execute("DELETE FROM ledger WHERE id = 2"))
        req = pending(tmp_path)
        assert cli(["approvals", "deny", req["name"], "--dir", str(tmp_path / "approvals"),
                    "--by", "bob@example.com", "--comment", "not today"]) == 0  # fmt: skip
        t.join(15)
        err = result[0]
        assert isinstance(err, psycopg.errors.InsufficientPrivilege)
        assert str(err).startswith("pgwarden: DELETE was not run")
        assert "denied by bob@example.com: not today" in str(err)
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")  # the server aborted the transaction too
        conn.rollback()
    assert amount(ledger, 2) == 200
    capsys.readouterr()


def test_unanswered_request_expires(make_proxy: MakeProxy, tmp_path: Path, ledger: str) -> None:
    proxy = held_proxy(make_proxy, tmp_path, hold="1s")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="expired"),
    ):
        conn.execute("UPDATE ledger SET amount = 0 WHERE id = 1")
    assert amount(ledger, 1) == 100
    [f] = (tmp_path / "approvals").glob("*.json")
    assert json.loads(f.read_text())["status"]["state"] == "Expired"
    ev = proxy.sink.statements[-1]
    assert (ev.decision, ev.error and ev.error["sqlstate"]) == ("refuse", "42501")


def test_without_a_backend_a_held_class_is_refused(make_proxy: MakeProxy, ledger: str) -> None:
    spec = {
        "subjects": {"groups": ["ai-agents"]},
        "access": "read-write",
        "approvals": {"require": ["write"]},
    }
    proxy = make_proxy(policies=[{"name": "careful", "spec": spec}])
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="no approval backend"),
    ):
        conn.execute("UPDATE ledger SET amount = 0 WHERE id = 1")
    assert amount(ledger, 1) == 100


def test_a_held_query_string_shows_every_statement(
    make_proxy: MakeProxy, tmp_path: Path, ledger: str
) -> None:
    proxy = held_proxy(make_proxy, tmp_path, hold="1s")
    sql = "SELECT 1; UPDATE ledger SET amount = 1 WHERE id = 1; DELETE FROM ledger WHERE id = 2"
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="expired"),
    ):
        conn.execute(sql)
    [f] = (tmp_path / "approvals").glob("*.json")
    spec = json.loads(f.read_text())["spec"]
    # the approver sees all that would run, not only the first statement that needs approval
    assert spec["statement"] == (
        "SELECT 1;\nUPDATE ledger SET amount = 1 WHERE id = 1;\nDELETE FROM ledger WHERE id = 2"
    )
    assert "write" in spec["classes"]
    assert spec["fingerprint"] != "-"
    assert (amount(ledger, 1), amount(ledger, 2)) == (100, 200)


def test_cancel_withdraws_a_held_statement(
    make_proxy: MakeProxy, tmp_path: Path, ledger: str
) -> None:
    proxy = held_proxy(make_proxy, tmp_path)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        t, result = run_in_thread(lambda: conn.execute("DELETE FROM ledger WHERE id = 1"))
        req = pending(tmp_path)
        conn.cancel_safe()
        t.join(15)
        assert isinstance(result[0], psycopg.errors.QueryCanceled), result
        assert req["name"] in str(result[0])
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (2,)  # usable again
    state = json.loads((tmp_path / "approvals" / f"{req['name']}.json").read_text())["status"]
    assert state["state"] == "Expired"
    assert "withdrawn" in state["comment"]
    assert amount(ledger, 1) == 100


def test_an_approval_without_a_second_person_is_not_honoured(
    make_proxy: MakeProxy, tmp_path: Path, ledger: str
) -> None:
    proxy = held_proxy(make_proxy, tmp_path)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        t, result = run_in_thread(lambda: conn.execute("DELETE FROM ledger WHERE id = 1"))
        req = pending(tmp_path)
        # someone with write access to the store forges an approval by the requester
        path = tmp_path / "approvals" / f"{req['name']}.json"
        req["status"].update(state="Approved", decidedBy="agent@example.com")
        path.write_text(json.dumps(req))
        t.join(15)
        assert isinstance(result[0], psycopg.errors.InsufficientPrivilege), result
        assert "without a second person" in str(result[0])
    assert amount(ledger, 1) == 100


def test_sql_prepare_and_its_execute_are_both_held(
    make_proxy: MakeProxy, tmp_path: Path, ledger: str
) -> None:
    proxy = held_proxy(make_proxy, tmp_path)
    stop = threading.Event()
    seen: list[dict[str, Any]] = []

    def approver() -> None:
        while not stop.is_set():
            for f in sorted((tmp_path / "approvals").glob("*.json")):
                req = json.loads(f.read_text())
                if req["status"]["state"] == "Pending":
                    seen.append(req["spec"])
                    cli(["approvals", "approve", req["name"], "--dir", str(tmp_path / "approvals"),
                         "--by", "bob@example.com"])  # fmt: skip
            time.sleep(0.05)

    t = threading.Thread(target=approver)
    t.start()
    try:
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("PREPARE p AS DELETE FROM ledger WHERE id = 2")
            assert amount(ledger, 2) == 200  # prepared, not run
            conn.execute("EXECUTE p")  # a Parse of "EXECUTE p" (psycopg: extended protocol)
    finally:
        stop.set()
        t.join(10)
    assert [s["statement"] for s in seen] == [
        "PREPARE p AS DELETE FROM ledger WHERE id = 2",
        "EXECUTE p",
    ]
    assert "write" in seen[1]["classes"]  # EXECUTE takes the classes recorded at PREPARE
    with pytest.raises(AssertionError):
        amount(ledger, 2)  # the row is gone
