"""The Argo CD health checks in examples/argocd/, run in Lua 5.1 (the language of Argo CD's
gopher-lua) on objects shaped as the operator and the proxy write them: conditions from the
operator's own `condition()`, approval statuses from the proxy's own `transition()`.

`python -m tests.unit.test_argocd_health --write` regenerates examples/argocd/argocd-cm.yaml
from the .lua files (the source).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from lupa import lua51  # type: ignore[import-untyped]

from pgwarden.api.approvals import (
    ApprovalRequest,
    ApprovalRequestSpec,
    ApprovalState,
    Requester,
)
from pgwarden.api.resources import API_VERSION, GROUP
from pgwarden.api.statements import StatementClass
from pgwarden_operator.approvals import EXPIRED_COMMENT
from pgwarden_operator.handlers import (
    INVALID_SPEC,
    READY,
    RECONCILED,
    RESOLVED,
    VALID,
    condition,
)
from pgwarden_proxy.approvals.backend import transition
from tests.manifests import Obj, crd_errors, load, validate

ARGOCD = Path(__file__).resolve().parents[2] / "examples" / "argocd"
CONFIGMAP = ARGOCD / "argocd-cm.yaml"
SCRIPTS = {
    "DatabaseConnection": "databaseconnection.lua",
    "AccessPolicy": "accesspolicy.lua",
    "ApprovalRequest": "approvalrequest.lua",
}


def key(kind: str) -> str:
    return f"resource.customizations.health.{GROUP}_{kind}"


def render_configmap() -> str:
    """argocd-cm.yaml: the .lua files as Argo CD's health customizations."""
    lines = [
        "# Generated from examples/argocd/*.lua (edit those, then run",
        "# `.venv/bin/python -m tests.unit.test_argocd_health --write`). Merge into Argo CD's",
        "# argocd-cm: kubectl -n argocd patch configmap argocd-cm --patch-file argocd-cm.yaml",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        "  name: argocd-cm",
        "  namespace: argocd",
        "  labels:",
        "    app.kubernetes.io/name: argocd-cm",
        "    app.kubernetes.io/part-of: argocd",
        "data:",
    ]
    for kind, script in SCRIPTS.items():
        lines.append(f"  {key(kind)}: |")
        lines += [
            f"    {line}" if line else "" for line in (ARGOCD / script).read_text().splitlines()
        ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- running
def to_lua(runtime: Any, value: Any) -> Any:
    """JSON-like Python data as Lua values (nulls vanish, as in Argo CD's conversion)."""
    if isinstance(value, dict):
        table = runtime.table()
        for k, v in value.items():
            if v is not None:
                table[k] = to_lua(runtime, v)
        return table
    if isinstance(value, list):
        return runtime.table(*(to_lua(runtime, v) for v in value))
    return value


def health(kind: str, obj: Obj) -> tuple[str, str]:
    """(status, message) that Argo CD would show for `obj`."""
    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals()["obj"] = to_lua(runtime, obj)
    result = runtime.execute((ARGOCD / SCRIPTS[kind]).read_text())
    return str(result["status"]), str(result["message"])


def resource(kind: str, spec: Obj, status: Obj | None, generation: int = 1) -> Obj:
    obj: Obj = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": "orders", "namespace": "data", "generation": generation},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
        # the shapes fed to the scripts are ones the CRD admits (so the operator can write them)
        assert crd_errors(obj) == []
    return obj


# ---------------------------------------------------------------------------------- connection
CONN_SPEC: Obj = {
    "host": "orders-db.data.svc",
    "database": "orders",
    "credentialsSecretRef": {"name": "orders-db-login"},
    "tls": {"sslmode": "require"},
    "proxy": {"replicas": 2},
    "auth": {"oidc": {"issuer": "https://idp.example.com"}},
}


def conn_status(ok: bool, observed: int, ready: int = 2, reason: str = RECONCILED) -> Obj:
    """As reconcile_connection writes it (Ready=True: the objects were applied)."""
    message = "proxy objects applied with 2 AccessPolicies" if ok else "spec.port: too big"
    status: Obj = {
        "observedGeneration": observed,
        "conditions": [condition(READY, ok, reason, message, observed, None)],
    }
    if ok:
        status |= {
            "endpoint": "orders-proxy.data.svc:5432",
            "policies": ["agents-readonly"],
            "readyReplicas": ready,
            "specHash": "0123456789abcdef",
        }
    return status


@pytest.mark.parametrize(
    ("status", "generation", "expected", "message"),
    [
        (None, 1, "Progressing", "Waiting for the operator to reconcile the connection"),
        (conn_status(True, 1), 2, "Progressing", "Waiting for the operator to reconcile gen"),
        (conn_status(True, 3, ready=0), 3, "Progressing", "Proxies ready: 0 of 2"),
        (conn_status(True, 3, ready=1), 3, "Progressing", "Proxies ready: 1 of 2"),
        (
            conn_status(True, 3),
            3,
            "Healthy",
            "Proxies ready: 2 of 2, endpoint orders-proxy.data.svc:5432",
        ),
        (
            conn_status(False, 3, reason=INVALID_SPEC),
            3,
            "Degraded",
            "InvalidSpec: spec.port: too big",
        ),
    ],
)
def test_database_connection(
    status: Obj | None, generation: int, expected: str, message: str
) -> None:
    got = health(
        "DatabaseConnection", resource("DatabaseConnection", CONN_SPEC, status, generation)
    )
    assert got[0] == expected
    assert got[1].startswith(message), got[1]


def test_database_connection_default_replicas_and_zero() -> None:
    spec = {k: v for k, v in CONN_SPEC.items() if k != "proxy"}  # replicas default to 2
    assert (
        health("DatabaseConnection", resource("DatabaseConnection", spec, conn_status(True, 1, 1)))[
            0
        ]
        == "Progressing"
    )
    scaled_down = CONN_SPEC | {"proxy": {"replicas": 0}}
    status = conn_status(True, 1, ready=0)
    got = health("DatabaseConnection", resource("DatabaseConnection", scaled_down, status))
    assert got == ("Healthy", "Proxies ready: 0 of 0, endpoint orders-proxy.data.svc:5432")


# ---------------------------------------------------------------------------------- policy
def policy_status(
    generation: int, *, valid: str | None = None, resolved: tuple[bool, str, str] | None = None
) -> Obj:
    """As _write_policy_status writes it: Valid (False with the error) and ConnectionsResolved."""
    if valid is not None:
        conditions = [
            condition(VALID, False, INVALID_SPEC, valid, generation, None),
            condition(
                RESOLVED, False, INVALID_SPEC, "an invalid policy selects nothing", generation, None
            ),
        ]
        return {"observedGeneration": generation, "connections": [], "conditions": conditions}
    assert resolved is not None
    ok, reason, message = resolved
    return {
        "observedGeneration": generation,
        "connections": ["orders"] if ok else [],
        "conditions": [
            condition(VALID, True, "Valid", "", generation, None),
            condition(RESOLVED, ok, reason, message, generation, None),
        ],
    }


@pytest.mark.parametrize(
    ("status", "generation", "expected", "message"),
    [
        (None, 1, "Progressing", "Waiting for the operator to validate the policy"),
        (
            policy_status(1, resolved=(True, "Resolved", "selects orders")),
            2,
            "Progressing",
            "Waiting for the operator to validate the policy",
        ),
        (
            policy_status(2, resolved=(True, "Resolved", "selects orders")),
            2,
            "Healthy",
            "selects orders",
        ),
        (
            policy_status(2, valid="spec.access: Input should be 'read-only' or 'read-write'"),
            2,
            "Degraded",
            "Invalid: spec.access: Input should be 'read-only' or 'read-write'",
        ),
        (
            policy_status(
                2,
                resolved=(
                    False,
                    "MissingConnection",
                    "no DatabaseConnection named billing in namespace data",
                ),
            ),
            2,
            "Degraded",
            "MissingConnection: no DatabaseConnection named billing in namespace data",
        ),
        (
            policy_status(2, resolved=(False, "NoConnection", "selects no DatabaseConnection")),
            2,
            "Progressing",
            "NoConnection: selects no DatabaseConnection",
        ),
    ],
)
def test_access_policy(status: Obj | None, generation: int, expected: str, message: str) -> None:
    obj = resource("AccessPolicy", {"connections": ["orders"]}, status, generation)
    assert health("AccessPolicy", obj) == (expected, message)


# ---------------------------------------------------------------------------------- approval
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
REQUEST = ApprovalRequest(
    name="orders-1a2b3c4d",
    created_at=NOW,
    spec=ApprovalRequestSpec(
        connection="orders",
        requester=Requester(username="bot@example.com", groups=["ai-agents"]),
        session_id="7f3c",
        statement="UPDATE orders SET state = 'shipped' WHERE id = 7",
        fingerprint="a1b2c3",
        classes=[StatementClass.WRITE],
        policy="orders-team-approved-writes",
        expires_at=NOW + timedelta(minutes=5),
    ),
)


def approval(state: ApprovalState | None) -> Obj:
    """The custom resource with the status the proxy's transition() (or the operator's expiry)
    gives; None: a new request, no status yet."""
    request = REQUEST
    later = NOW + timedelta(minutes=1)
    if state is ApprovalState.EXPIRED:  # the operator's expiry patch
        status: Obj | None = {
            "state": "Expired",
            "decidedAt": "2030-01-01T12:05:00Z",
            "decidedBy": None,
            "comment": EXPIRED_COMMENT,
        }
    elif state is not None:
        if state in (ApprovalState.APPROVED, ApprovalState.EXECUTED):
            request = transition(request, ApprovalState.APPROVED, by="me@example.com", now=later)
        if state is ApprovalState.EXECUTED:
            request = transition(request, ApprovalState.EXECUTED, now=later)
        if state is ApprovalState.DENIED:
            request = transition(
                request,
                ApprovalState.DENIED,
                by="me@example.com",
                comment="use a ticket",
                now=later,
            )
        status = request.status.model_dump(mode="json", by_alias=True)
    else:
        status = None
    spec = request.spec.model_dump(mode="json", by_alias=True)
    return resource("ApprovalRequest", spec, status)


@pytest.mark.parametrize(
    ("state", "expected", "message"),
    [
        (
            None,
            "Suspended",
            "Waiting for a decision: bot@example.com asks to run a statement on orders "
            "(expires 2030-01-01T12:05:00Z)",
        ),
        (ApprovalState.APPROVED, "Healthy", "Approved by me@example.com"),
        (ApprovalState.EXECUTED, "Healthy", "Executed; approved by me@example.com"),
        (ApprovalState.DENIED, "Healthy", "Denied by me@example.com: use a ticket"),
        (ApprovalState.EXPIRED, "Healthy", f"Expired: {EXPIRED_COMMENT}"),
    ],
)
def test_approval_request(state: ApprovalState | None, expected: str, message: str) -> None:
    assert health("ApprovalRequest", approval(state)) == (expected, message)


def test_pending_status_written_explicitly_is_suspended_too() -> None:
    obj = approval(None) | {"status": {"state": "Pending"}}
    assert health("ApprovalRequest", obj)[0] == "Suspended"


# ---------------------------------------------------------------------------------- shipping
def test_configmap_is_generated_from_the_lua_files() -> None:
    assert CONFIGMAP.read_text() == render_configmap(), (
        "examples/argocd/argocd-cm.yaml is stale: "
        "run .venv/bin/python -m tests.unit.test_argocd_health --write"
    )
    (cm,) = load(CONFIGMAP)
    validate(cm)
    assert cm["data"] == {key(k): (ARGOCD / s).read_text() for k, s in SCRIPTS.items()}
    assert set(yaml.safe_load(CONFIGMAP.read_text())["data"]) == {key(k) for k in SCRIPTS}


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.unit.test_argocd_health --write")
    CONFIGMAP.write_text(render_configmap())
