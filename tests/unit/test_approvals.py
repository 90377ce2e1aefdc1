"""Approvals, file backend: requests on disk, compare-and-set decisions, expiry, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pgwarden.api.approvals import (
    ApprovalRequest,
    ApprovalRequestSpec,
    ApprovalState,
    Requester,
    is_valid_name,
    new_request_name,
    utcnow,
)
from pgwarden.api.statements import StatementClass
from pgwarden.cli import main
from pgwarden_proxy.approvals.backend import (
    ApprovalBackend,
    ApprovalError,
    UnknownApproval,
    same_person,
)
from pgwarden_proxy.approvals.files import FileApprovals

K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
AGENT = "agent@example.com"
Approved, Denied, Expired, Executed, Pending = (
    ApprovalState.APPROVED,
    ApprovalState.DENIED,
    ApprovalState.EXPIRED,
    ApprovalState.EXECUTED,
    ApprovalState.PENDING,
)


def make_spec(
    *,
    expires_in: float = 300.0,
    statement: str = "UPDATE orders SET status = 'paid' WHERE id = $1",
    parameters: list[str | None] | None = None,
    connection: str = "orders-db",
    username: str = AGENT,
) -> ApprovalRequestSpec:
    return ApprovalRequestSpec(
        connection=connection,
        requester=Requester(username=username, groups=["ai-agents"]),
        session_id="s-123",
        statement=statement,
        fingerprint="0123456789abcdef",
        classes=[StatementClass.WRITE],
        policy="ai-agents-approve-writes",
        expires_at=utcnow() + timedelta(seconds=expires_in),
        parameters=["42"] if parameters is None else parameters,
    )


@pytest.fixture
def store(tmp_path: Path) -> FileApprovals:
    return FileApprovals(tmp_path / "approvals", poll_interval=0.02)


def on_disk(store: FileApprovals, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((store.directory / f"{name}.json").read_text())
    return data


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["approvals", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# -- names and models ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "connection",
    ["orders-db", "Orders_DB.prod", "", "---", "x" * 100, "a-" * 40, "数据库", "9lives"],
)
def test_names_are_kubernetes_names(connection: str) -> None:
    name = new_request_name(connection)
    assert K8S_NAME.match(name), name
    assert len(name) <= 63, name
    assert is_valid_name(name)
    assert re.search(r"-[0-9a-f]{8}$", name)


def test_names_are_unique_and_keep_the_connection() -> None:
    names = {new_request_name("orders-db") for _ in range(2000)}
    assert len(names) == 2000
    assert all(n.startswith("orders-db-") for n in names)


@pytest.mark.parametrize("bad", ["", "../etc/passwd", "A-b", "-a", "a-", "a.b", "a" * 64, "a/b"])
def test_bad_names_are_refused(bad: str) -> None:
    assert not is_valid_name(bad)


def test_spec_uses_the_contract_names_and_utc() -> None:
    spec = make_spec()
    dumped = spec.model_dump(mode="json", by_alias=True)
    assert set(dumped) == {
        "connection",
        "requester",
        "sessionId",
        "statement",
        "fingerprint",
        "classes",
        "policy",
        "expiresAt",
        "parameters",
    }
    assert dumped["expiresAt"].endswith("Z")
    assert ApprovalRequestSpec.model_validate(dumped) == spec
    plus2 = datetime(2030, 1, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    moved: dict[str, Any] = {**dumped, "expiresAt": plus2}
    assert ApprovalRequestSpec.model_validate(moved).expires_at == datetime(
        2030, 1, 1, 12, 0, tzinfo=UTC
    )
    assert ApprovalRequestSpec.model_validate(moved).expires_at.tzinfo is UTC
    moved["expiresAt"] = "2030-01-01T12:00:00"  # no timezone
    with pytest.raises(ValidationError, match="timezone"):
        ApprovalRequestSpec.model_validate(moved)
    moved["expiresAt"] = "2030-01-01T12:00:00Z"
    moved["surprise"] = 1
    with pytest.raises(ValidationError):
        ApprovalRequestSpec.model_validate(moved)


def test_four_eyes_identity_matching() -> None:
    assert same_person("alice@example.com", "Alice@Example.com ")
    assert same_person("alice", "alice@example.com")
    assert same_person("alice@example.com", "alice")
    assert not same_person("bob", "alice@example.com")
    assert not same_person("alice@a.example", "alice@b.example")


# -- the file backend ---------------------------------------------------------------------------


def test_file_backend_satisfies_the_interface(store: FileApprovals) -> None:
    backend: ApprovalBackend = store
    line = backend.how_to_decide("orders-db-0123abcd")
    assert "\n" not in line
    assert f"pgwarden approvals approve orders-db-0123abcd --dir {store.directory}" in line
    assert "pgwarden approvals deny orders-db-0123abcd" in line


async def test_submit_writes_a_private_loadable_file(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "approvals"
    store = FileApprovals(directory)
    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) & 0o027 == 0  # at most rwxr-x---
    name = await store.submit(make_spec())
    path = directory / f"{name}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    req = ApprovalRequest.model_validate_json(path.read_text())
    assert req.name == name
    assert req.status.state is Pending
    assert req.spec == make_spec().model_copy(update={"expires_at": req.spec.expires_at})
    raw = json.loads(path.read_text())
    assert raw["spec"]["sessionId"] == "s-123"
    assert raw["spec"]["parameters"] == ["42"]
    assert raw["status"] == {
        "state": "Pending",
        "decidedBy": None,
        "decidedAt": None,
        "comment": None,
    }
    assert [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []
    assert [r.name for r in store.list_requests()] == [name]


async def test_wait_returns_the_approval(store: FileApprovals) -> None:
    name = await store.submit(make_spec())
    waiting = asyncio.create_task(store.wait(name, timeout=10))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await asyncio.to_thread(store.decide, name, Approved, by="bob", comment="ok once")
    status = await asyncio.wait_for(waiting, 2)
    assert status.state is Approved
    assert status.decided_by == "bob"
    assert status.comment == "ok once"
    assert status.decided_at is not None
    assert status.decided_at.tzinfo is UTC
    await store.finish(name, Executed, "ran in 3 ms")
    done = store.get(name).status
    assert done.state is Executed
    assert done.decided_by == "bob"
    assert done.comment == "ok once; ran in 3 ms"
    with pytest.raises(ApprovalError, match="already been executed; an approval covers one"):
        await store.finish(name, Executed)
    assert store.list_requests() == []
    assert [r.status.state for r in store.list_requests(include_all=True)] == [Executed]


async def test_wait_returns_the_denial(store: FileApprovals) -> None:
    name = await store.submit(make_spec())
    waiting = asyncio.create_task(store.wait(name, timeout=10))
    store.decide(name, Denied, by="bob", comment="not on Fridays")
    status = await asyncio.wait_for(waiting, 2)
    assert (status.state, status.decided_by, status.comment) == (Denied, "bob", "not on Fridays")
    with pytest.raises(ApprovalError, match=rf"request {name} was already denied by bob at 20"):
        store.decide(name, Approved, by="carol")
    with pytest.raises(ApprovalError, match="already denied by bob"):
        await store.finish(name, Executed)


async def test_wait_times_out_and_records_expired(store: FileApprovals) -> None:
    name = await store.submit(make_spec())
    status = await store.wait(name, timeout=0.1)
    assert status.state is Expired
    assert status.decided_by is None
    assert status.comment == "no decision within 0.1s"
    assert on_disk(store, name)["status"]["state"] == "Expired"
    with pytest.raises(ApprovalError, match=f"request {name} expired at .* without a decision"):
        store.decide(name, Approved, by="bob")
    await store.finish(name, Expired)  # withdrawing what already expired is a no-op


async def test_past_its_deadline_a_request_is_expired_for_everyone(
    store: FileApprovals, capsys: pytest.CaptureFixture[str]
) -> None:
    name = await store.submit(make_spec(expires_in=-1))
    assert on_disk(store, name)["status"]["state"] == "Pending"  # nobody wrote it yet
    assert store.get(name).status.state is Expired
    assert store.list_requests() == []
    rc, out, _ = cli(capsys, "list", "--all", "--dir", str(store.directory))
    assert rc == 0
    assert name in out
    assert "Expired" in out
    rc, _, err = cli(capsys, "approve", name, "--dir", str(store.directory), "--by", "bob")
    assert rc == 1
    assert "without a decision" in err
    assert on_disk(store, name)["status"]["state"] == "Expired"  # the refusal recorded it


async def test_wait_honours_the_deadline_before_the_timeout(store: FileApprovals) -> None:
    name = await store.submit(make_spec(expires_in=0.15))
    status = await asyncio.wait_for(store.wait(name, timeout=60), 2)
    assert status.state is Expired
    assert status.comment == "no decision before the deadline"


async def test_finish_rules(store: FileApprovals) -> None:
    name = await store.submit(make_spec())
    with pytest.raises(ApprovalError, match="still pending; only an approved request can be"):
        await store.finish(name, Executed)
    with pytest.raises(ValueError, match="Executed or Expired"):
        await store.finish(name, Approved)
    with pytest.raises(ValueError, match="Approved or Denied"):
        store.decide(name, Executed, by="bob")
    await store.finish(name, Expired)  # e.g. the client went away while waiting
    assert store.get(name).status.comment == "withdrawn by the proxy"
    with pytest.raises(UnknownApproval, match="no approval request orders-db-00000000"):
        await store.wait("orders-db-00000000", 1)
    with pytest.raises(ApprovalError, match="is not a request name"):
        store.get("../../etc/passwd")


def test_four_eyes(store: FileApprovals) -> None:
    name = store.create(make_spec(username="alice@example.com")).name
    for me in ("alice@example.com", "ALICE@example.com", "alice"):
        with pytest.raises(ApprovalError, match="needs a second person"):
            store.decide(name, Approved, by=me)
    assert store.get(name).status.state is Pending
    store.decide(name, Denied, by="alice", comment="withdrawn")  # denying one's own is fine


def test_concurrent_decisions_only_one_wins(store: FileApprovals) -> None:
    name = store.create(make_spec()).name
    won: list[ApprovalState] = []
    lost: list[str] = []
    barrier = threading.Barrier(8)

    def decide(state: ApprovalState) -> None:
        barrier.wait()
        try:
            store.decide(name, state, by=f"approver-{threading.get_ident()}")
            won.append(state)
        except ApprovalError as e:
            lost.append(str(e))

    threads = [threading.Thread(target=decide, args=(s,)) for s in [Approved, Denied] * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert len(lost) == 7
    assert store.get(name).status.state is won[0]
    assert all("was already" in m for m in lost)


async def test_approve_racing_the_timeout_exactly_one_wins(store: FileApprovals) -> None:
    outcomes: set[tuple[ApprovalState, bool]] = set()
    for i in range(20):
        name = await store.submit(make_spec())
        timeout = 0.05

        def approve_late(name: str = name, delay: float = timeout + (i % 6 - 3) * 0.004) -> bool:
            threading.Event().wait(max(delay, 0))
            try:
                store.decide(name, Approved, by="bob")
            except ApprovalError:
                return False
            return True

        approving = asyncio.create_task(asyncio.to_thread(approve_late))
        status = await store.wait(name, timeout)
        approved = await approving
        recorded = store.get(name).status.state
        # exactly one side wins, and everyone sees the same winner
        assert recorded is status.state
        assert (status.state is Approved) == approved
        assert status.state in (Approved, Expired)
        outcomes.add((status.state, approved))
    assert outcomes  # (both outcomes usually occur; either is correct)


def test_corrupted_and_foreign_files_are_skipped(
    store: FileApprovals, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    good = store.create(make_spec()).name
    d = store.directory
    (d / "garbage.json").write_text("{not json")
    (d / "empty.json").write_text("")
    (d / "other.json").write_text(json.dumps({"kind": "something else"}))
    foreign = json.loads((d / f"{good}.json").read_text())
    (d / "renamed-0000.json").write_text(json.dumps(foreign))  # name does not match the file
    (d / "notes.txt").write_text("hello")
    (d / "subdir.json").mkdir()
    with caplog.at_level(logging.WARNING):
        assert [r.name for r in store.list_requests(include_all=True)] == [good]
    skipped = {Path(str(r.args[0])).name for r in caplog.records if isinstance(r.args, tuple)}
    assert skipped == {
        "garbage.json",
        "empty.json",
        "other.json",
        "renamed-0000.json",
        "subdir.json",
    }
    rc, out, _ = cli(capsys, "list", "--dir", str(d))
    assert rc == 0
    assert good in out
    (d / f"{good}.json").write_text("[]")
    rc, _, err = cli(capsys, "approve", good, "--dir", str(d), "--by", "bob")
    assert rc == 1
    assert "is not an approval request" in err


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_list_approve_deny(
    store: FileApprovals, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGWARDEN_APPROVALS_DIR", str(store.directory))
    rc, out, err = cli(capsys, "list")
    assert (rc, out) == (0, "")
    assert "no pending approval requests" in err

    long = "UPDATE orders\n   SET status = 'paid'\n WHERE id IN (" + ", ".join(["1"] * 60) + ")"
    first = store.create(make_spec(statement=long)).name
    second = store.create(make_spec(statement="DELETE FROM carts WHERE id = $1")).name
    rc, out, _ = cli(capsys, "list")
    assert rc == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "NAME",
        "AGE",
        "STATE",
        "REQUESTER",
        "CONNECTION",
        "CLASSES",
        "STATEMENT",
    ]
    assert [r.split()[0] for r in rows] == [first, second]
    assert rows[0].split()[1:6] == ["0s", "Pending", AGENT, "orders-db", "write"]
    assert "UPDATE orders SET status = 'paid' WHERE id IN (1, 1" in rows[0]
    assert rows[0].endswith("...")
    assert len(rows[0]) < 200

    monkeypatch.setattr("getpass.getuser", lambda: "bob")
    rc, out, err = cli(capsys, "approve", first, "--comment", "looks right")
    assert rc == 0
    assert err == ""
    assert out == f"approved {first}: write on orders-db, requested by {AGENT}\n"
    status = on_disk(store, first)["status"]
    assert (status["state"], status["decidedBy"], status["comment"]) == (
        "Approved",
        "bob",
        "looks right",
    )
    rc, out, _ = cli(capsys, "deny", second, "--by", "carol@example.com", "--comment", "no")
    assert rc == 0
    assert out.startswith(f"denied {second}")
    assert on_disk(store, second)["status"]["decidedBy"] == "carol@example.com"

    rc, out, err = cli(capsys, "list")
    assert rc == 0
    assert out == ""
    rc, out, _ = cli(capsys, "list", "--all", "--json")
    listed = json.loads(out)
    assert [(r["name"], r["status"]["state"]) for r in listed] == [
        (first, "Approved"),
        (second, "Denied"),
    ]
    assert ApprovalRequest.model_validate(listed[0]).spec.statement == long

    rc, _, err = cli(capsys, "approve", second, "--by", "dave")
    assert rc == 1
    assert f"request {second} was already denied by carol@example.com at " in err


def test_cli_show_and_terminal_safety(
    store: FileApprovals, capsys: pytest.CaptureFixture[str]
) -> None:
    sneaky = "DELETE FROM users;\r-- \x1b[2K SELECT 1 \u202e"
    name = store.create(make_spec(statement=sneaky, parameters=["x\x1b", None])).name
    d = str(store.directory)
    rc, out, _ = cli(capsys, "show", name, "--dir", d)
    assert rc == 0
    assert "\x1b" not in out
    assert "\r" not in out
    assert "\u202e" not in out
    assert "DELETE FROM users;\\r-- \\x1b[2K SELECT 1 \\u202e" in out
    assert "parameters:  $1='x\\\\x1b', $2=NULL" in out
    assert f"name:        {name}" in out
    assert "state:       Pending" in out
    rc, out, _ = cli(capsys, "list", "--dir", d)
    assert "\x1b" not in out
    assert "\r" not in out
    rc, out, _ = cli(capsys, "show", name, "--dir", d, "--json")
    assert ApprovalRequest.model_validate_json(out).spec.statement == sneaky


def test_cli_four_eyes_and_errors(
    store: FileApprovals, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    d = str(store.directory)
    name = store.create(make_spec()).name
    monkeypatch.setattr("getpass.getuser", lambda: "agent")  # the requester's own OS account
    rc, out, err = cli(capsys, "approve", name, "--dir", d)
    assert rc == 1
    assert out == ""
    assert f"agent cannot approve request {name}" in err
    assert "four eyes" in err
    assert store.get(name).status.state is Pending

    rc, _, err = cli(capsys, "approve", "orders-db-00000000", "--dir", d, "--by", "bob")
    assert rc == 1
    assert "no approval request orders-db-00000000" in err
    rc, _, err = cli(capsys, "approve", "../../etc/passwd", "--dir", d, "--by", "bob")
    assert rc == 2
    assert "is not a request name" in err
    rc, _, err = cli(capsys, "approve", name, "--dir", d, "--by", " ")
    assert rc == 2
    assert "--by" in err

    monkeypatch.delenv("PGWARDEN_APPROVALS_DIR", raising=False)
    rc, _, err = cli(capsys, "list")
    assert rc == 2
    assert "PGWARDEN_APPROVALS_DIR" in err
    missing = str(store.directory / "nope")
    rc, _, err = cli(capsys, "list", "--dir", missing)
    assert rc == 2
    assert "is not a directory" in err
    assert not os.path.exists(missing)  # the CLI never creates a directory
    with pytest.raises(SystemExit) as e:
        main(["approvals", "approve"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["approvals", "bless", name])
    assert e.value.code == 2
    capsys.readouterr()
