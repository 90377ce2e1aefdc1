"""The operator's part of ApprovalRequests, with the real kopf operator against kmock.

Expiry at `expiresAt` (at once when created past it, or when it comes), a decision that is not
overridden, the events, and the deletion of decided requests after the retention period
(PGWARDEN_APPROVAL_RETENTION, set to seconds here). Reuses test_operator's operator thread and
cluster helpers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import kmock
import pytest

from pgwarden.api.approvals import ApprovalRequestStatus
from pgwarden.api.resources import API_VERSION
from pgwarden_operator.approvals import (
    EXPIRED_COMMENT,
    RETENTION_ENV,
    ApprovalKeeper,
    parse_retention,
)
from pgwarden_operator.handlers import FINALIZER, Operator
from pgwarden_operator.k8s import Api
from tests.integration.test_operator import NS, Cluster, _events, running_cluster
from tests.kmockapi import ApiServer, declare_crds

APPROVALS = f"{API_VERSION}/approvalrequests"

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def request(name: str, expires_in: float, **over: Any) -> dict[str, Any]:
    expires = datetime.now(UTC) + timedelta(seconds=expires_in)
    return {
        "apiVersion": API_VERSION,
        "kind": "ApprovalRequest",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "connection": "orders",
            "requester": {"username": "alice", "groups": ["analysts"]},
            "sessionId": "s-1",
            "statement": "DELETE FROM orders WHERE id = $1",
            "fingerprint": "f00d",
            "classes": ["write"],
            "policy": "analysts",
            "expiresAt": rfc3339(expires),
            "parameters": ["42"],
            **over,
        },
    }


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.delenv(RETENTION_ENV, raising=False)  # the default: 7 days
    async with running_cluster() as c:
        yield c


@pytest.fixture
async def short_retention(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setenv(RETENTION_ENV, "1.5")
    async with running_cluster() as c:
        yield c


def state(cluster: Cluster, name: str) -> str | None:
    return cluster.status(APPROVALS, name).get("state")


def reasons(cluster: Cluster, name: str) -> list[str]:
    return [e["reason"] for e in _events(cluster) if e["involvedObject"]["name"] == name]


def event(cluster: Cluster, name: str, reason: str) -> dict[str, Any] | None:
    return next(
        (
            e
            for e in _events(cluster)
            if e["involvedObject"]["name"] == name and e["reason"] == reason
        ),
        None,
    )


async def decide(cluster: Cluster, name: str, state_: str, by: str) -> None:
    await cluster.client.patch_status(
        API_VERSION,
        "approvalrequests",
        NS,
        name,
        {"state": state_, "decidedBy": by, "decidedAt": rfc3339(datetime.now(UTC))},
    )


def test_retention_parses_seconds_and_units() -> None:
    assert parse_retention(None) == timedelta(days=7)
    assert parse_retention("") == timedelta(days=7)
    assert parse_retention("2.5") == timedelta(seconds=2.5)
    assert parse_retention("45s") == timedelta(seconds=45)
    assert parse_retention("30m") == timedelta(minutes=30)
    assert parse_retention("12h") == timedelta(hours=12)
    assert parse_retention("7d") == timedelta(days=7)
    with pytest.raises(ValueError, match=RETENTION_ENV):
        parse_retention("a week")


async def test_a_request_created_past_its_deadline_is_expired(cluster: Cluster) -> None:
    created = request("late", expires_in=-60)
    await cluster.create(created)
    await cluster.eventually(lambda: state(cluster, "late") == "Expired", "Expired")
    status = ApprovalRequestStatus.model_validate(cluster.status(APPROVALS, "late"))
    assert status.comment == EXPIRED_COMMENT
    assert status.decided_by is None
    assert status.decided_at == datetime.fromisoformat(created["spec"]["expiresAt"])
    await cluster.eventually(lambda: event(cluster, "late", "Expired"), "an Expired event")
    pending = event(cluster, "late", "Pending")
    assert pending is not None
    assert pending["type"] == "Normal"
    assert pending["message"] == (
        "Pending: alice asks to run DELETE FROM orders WHERE id = $1 (write) on orders"
    )
    # no finalizer: nothing stops anyone deleting a request while the operator is away
    obj = cluster.get(APPROVALS, "late")
    assert obj is not None
    assert FINALIZER not in (obj["metadata"].get("finalizers") or [])
    # with the default retention (7 days) nothing is deleted
    await cluster.settle()
    assert cluster.get(APPROVALS, "late") is not None


async def test_a_pending_request_expires_at_its_deadline(cluster: Cluster) -> None:
    await cluster.create(request("soon", expires_in=1.0))
    await cluster.eventually(lambda: event(cluster, "soon", "Pending"), "a Pending event")
    assert state(cluster, "soon") is None  # not yet: still Pending (no status written)
    await cluster.eventually(lambda: state(cluster, "soon") == "Expired", "Expired", within=5)
    await cluster.eventually(lambda: event(cluster, "soon", "Expired"), "an Expired event")
    obj = cluster.get(APPROVALS, "soon")
    assert obj is not None
    assert FINALIZER not in (obj["metadata"].get("finalizers") or [])


async def test_a_decision_is_never_overridden_by_the_deadline(cluster: Cluster) -> None:
    await cluster.create(request("approved", expires_in=1.0))
    await decide(cluster, "approved", "Approved", "bob@example.com")
    await cluster.eventually(lambda: event(cluster, "approved", "Approved"), "an Approved event")
    approved = event(cluster, "approved", "Approved")
    assert approved is not None
    assert approved["message"] == "Approved by bob@example.com"
    await asyncio.sleep(1.5)  # past expiresAt
    await cluster.settle()
    assert state(cluster, "approved") == "Approved"
    assert "Expired" not in reasons(cluster, "approved")
    # then the proxy runs it
    await decide(cluster, "approved", "Executed", "proxy")
    await cluster.eventually(lambda: event(cluster, "approved", "Executed"), "Executed event")
    assert state(cluster, "approved") == "Executed"


async def test_an_invalid_request_is_reported_and_left_alone(cluster: Cluster) -> None:
    await cluster.create(request("broken", expires_in=-60, classes=[]))
    warning = await cluster.eventually(
        lambda: event(cluster, "broken", "InvalidSpec"), "an InvalidSpec event"
    )
    assert warning["type"] == "Warning"
    assert "spec.classes" in warning["message"]
    await cluster.settle()
    assert state(cluster, "broken") is None
    # the operator still serves
    await cluster.create(request("valid", expires_in=-1))
    await cluster.eventually(lambda: state(cluster, "valid") == "Expired", "Expired")


async def test_decided_requests_are_deleted_after_the_retention(
    short_retention: Cluster,
) -> None:
    cluster = short_retention
    loop = asyncio.get_running_loop()
    await cluster.create(request("denied", expires_in=60))
    await cluster.create(request("approved", expires_in=60))
    await cluster.eventually(lambda: event(cluster, "denied", "Pending"), "a Pending event")
    await decide(cluster, "denied", "Denied", "carol@example.com")
    await decide(cluster, "approved", "Approved", "carol@example.com")
    decided = loop.time()
    denied = await cluster.eventually(lambda: event(cluster, "denied", "Denied"), "Denied event")
    assert denied["message"] == "Denied by carol@example.com"
    await cluster.eventually(
        lambda: cluster.get(APPROVALS, "denied") is None, "the Denied request deleted", within=6
    )
    assert loop.time() - decided >= 1.0  # not before the retention (1.5 s)
    # a request expired at once (its deadline long past) goes as soon as deadline + retention
    await cluster.create(request("expired", expires_in=-60))
    await cluster.eventually(
        lambda: cluster.get(APPROVALS, "expired") is None and event(cluster, "expired", "Expired"),
        "the Expired request deleted",
    )
    # an Approved request waits for the proxy: it stays
    assert state(cluster, "approved") == "Approved"
    assert cluster.get(APPROVALS, "approved") is not None


async def test_expiry_is_a_compare_and_set_and_deletion_checks_the_uid() -> None:
    """Without the operator thread: the keeper's writes against kmock. A decision that lands
    between the keeper's read and its write wins (the stale resourceVersion is a 409, the
    request is read again, no longer Pending); a delete names the uid it means."""
    async with ApiServer() as server, kmock.Server(server):
        declare_crds(server)
        url = str(server.url)
        async with Api(url) as client:
            op = Operator(server=url)
            op.login()
            keeper = ApprovalKeeper(op, retention=timedelta(seconds=1))
            try:
                created = await client.create(request("raced", expires_in=-1))
                stale = await client.get(API_VERSION, "approvalrequests", NS, "raced")
                await client.patch_status(
                    API_VERSION, "approvalrequests", NS, "raced", {"state": "Approved"}
                )
                api = await op.api()
                real_get = api.get
                reads: list[dict[str, Any] | None] = [stale]

                async def get_stale_first(*args: Any) -> dict[str, Any] | None:
                    return reads.pop() if reads else await real_get(*args)

                with mock.patch.object(api, "get", get_stale_first):
                    assert await keeper.expire(NS, "raced", created["metadata"]["uid"]) is False
                live = await client.get(API_VERSION, "approvalrequests", NS, "raced")
                assert live is not None
                assert live["status"] == {"state": "Approved"}
                conflicts = [
                    r
                    for r in list(server)
                    if r.method == "PATCH" and r.url.path.endswith("/raced/status")
                ]
                assert len(conflicts) == 2  # the decision, and the expiry refused with 409

                # a delete for another uid (a newer request of that name) deletes nothing
                assert await keeper.delete(NS, "raced", "not-its-uid") is False
                assert await client.get(API_VERSION, "approvalrequests", NS, "raced")
                assert await keeper.delete(NS, "raced", created["metadata"]["uid"]) is True
                assert await client.get(API_VERSION, "approvalrequests", NS, "raced") is None
                assert await keeper.delete(NS, "raced", created["metadata"]["uid"]) is False
            finally:
                await keeper.stop()
                await op.close()
