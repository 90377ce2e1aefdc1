"""Held statements through a real proxy whose approval backend is a Kubernetes API (a small
in-test API server on loopback, reached through PGWARDEN_KUBE_API_URL)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgwarden_proxy.approvals.kubernetes import API_URL_ENV
from tests.integration.conftest import MakeProxy, RunningProxy
from tests.integration.test_approvals_flow import amount, ledger, run_in_thread
from tests.unit.test_k8s_approvals import FakeKubeApi

__all__ = ["ledger"]  # a fixture, used by name

NS = "x"


@pytest.fixture
def kube(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeApi]:
    api = FakeKubeApi().start_thread()
    monkeypatch.setenv(API_URL_ENV, api.url)
    yield api
    api.stop_thread()


def held_proxy(make_proxy: MakeProxy, hold: str = "30s") -> RunningProxy:
    spec = {
        "subjects": {"groups": ["ai-agents"]},
        "access": "read-write",
        "approvals": {"require": ["write"]},
    }
    return make_proxy(
        policies=[{"name": "careful", "spec": spec}],
        approvals={"backend": "kubernetes", "namespace": NS, "holdTimeout": hold},
    )


def pending(kube: FakeKubeApi, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for obj in list(kube.objects.values()):
            if (obj.get("status") or {}).get("state", "Pending") == "Pending":
                return obj
        time.sleep(0.05)
    raise AssertionError("no approval request appeared")


def test_approved_statement_runs_once_and_is_marked_executed(
    make_proxy: MakeProxy, kube: FakeKubeApi, ledger: str
) -> None:
    proxy = held_proxy(make_proxy)
    notices: list[str] = []
    conn = psycopg.connect(proxy.dsn(), autocommit=True)
    conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} | {d.message_hint}"))
    t, result = run_in_thread(
        lambda: conn.execute("UPDATE ledger SET amount = amount + %s WHERE id = 1", (5,)).rowcount
    )
    obj = pending(kube)
    name = obj["metadata"]["name"]
    assert obj["spec"]["parameters"] == ["5"]
    assert obj["metadata"]["labels"]["pgwarden.io/requester"] == "agent_example.com"
    assert amount(ledger, 1) == 100  # held
    kube.decide(name, "Approved", "bob@example.com", ns=NS)
    t.join(15)
    assert result == [1]
    assert amount(ledger, 1) == 105
    conn.close()
    assert any(f"kubectl patch approvalrequest {name} -n {NS}" in n for n in notices), notices
    assert kube.objects[(NS, name)]["status"]["state"] == "Executed"
    ev = next(e for e in proxy.sink.statements if e.command == "UPDATE")
    assert ev.decision == "approved"


def test_unanswered_request_expires(make_proxy: MakeProxy, kube: FakeKubeApi, ledger: str) -> None:
    proxy = held_proxy(make_proxy, hold="1s")
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="expired"),
    ):
        conn.execute("UPDATE ledger SET amount = 0 WHERE id = 1")
    assert amount(ledger, 1) == 100
    assert kube.only()["status"]["state"] == "Expired"


def test_a_proxy_without_rbac_runs_nothing_and_says_why(
    make_proxy: MakeProxy, kube: FakeKubeApi, ledger: str, caplog: pytest.LogCaptureFixture
) -> None:
    kube.forbidden.add(("create", "approvalrequests"))
    proxy = held_proxy(make_proxy)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute("UPDATE ledger SET amount = 0 WHERE id = 1")
        assert "the approval request could not be created" in str(refused.value)
        assert f"may not create approvalrequests in {NS}" in str(refused.value)
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    assert amount(ledger, 1) == 100
    assert any(
        f"may not create approvalrequests in {NS}" in str(getattr(r, "error", ""))
        for r in caplog.records
    )
