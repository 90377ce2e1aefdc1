"""RBAC builders: valid manifests, least privilege, no Secrets, owned by the connection."""

from __future__ import annotations

from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest

from pgwarden.api.resources import API_VERSION, DatabaseConnectionSpec
from pgwarden_operator import builders, rbac

K8S_VERSION = "1.31"
NAME, NS, UID = "orders-db", "data", "0f6a3c1e-1111-2222-3333-444455556666"
PROXY_SA = "orders-db-proxy"
CONN = DatabaseConnectionSpec.model_validate(
    {
        "host": "orders.data.svc",
        "database": "orders",
        "credentialsSecretRef": {"name": "orders-db-credentials"},
        "tls": {"sslmode": "require"},
        "auth": {"oidc": {"issuer": "https://idp.example.com"}},
        "inCluster": True,  # with a NetworkPolicy
        "databaseSelector": {"app": "orders-postgres"},
    }
)

PER_CONNECTION = {
    "ServiceAccount": rbac.proxy_service_account(NAME, NS, UID),
    "Role": rbac.proxy_role(NAME, NS, UID),
    "RoleBinding": rbac.proxy_role_binding(NAME, NS, UID),
}
CLUSTER = {
    "operator": rbac.operator_cluster_role(),
    "approver": rbac.approver_cluster_role(),
}
ALL = {**PER_CONNECTION, **CLUSTER}
ROLES = {"Role": PER_CONNECTION["Role"], **CLUSTER}


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every rule of a role."""
    out = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}  # no resourceNames, no URLs
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


def allowed(role: dict[str, Any], group: str, resource: str) -> set[str]:
    return {v for g, r, v in grants(role) if (g, r) == (group, resource)}


# ---------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("which", ALL)
def test_every_manifest_validates_against_the_kubernetes_schema(which: str) -> None:
    kubernetes_validate.validate(ALL[which], K8S_VERSION, strict=True)


def test_the_validator_is_strict_here_too() -> None:
    role = rbac.proxy_role(NAME, NS, UID)
    role["rules"][0]["verb"] = ["get"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(role, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------- least privilege
@pytest.mark.parametrize("which", ROLES)
def test_no_wildcards_and_no_secrets(which: str) -> None:
    for group, resource, verb in grants(ROLES[which]):
        assert "*" not in (group, resource, verb)
        assert resource != "secrets"
        # verbs that grant more than they name
        assert verb not in ("escalate", "bind", "impersonate", "deletecollection")


def test_the_proxy_role_is_exactly_what_the_approval_backend_uses() -> None:
    assert grants(PER_CONNECTION["Role"]) == {
        ("pgwarden.io", "approvalrequests", "get"),
        ("pgwarden.io", "approvalrequests", "list"),
        ("pgwarden.io", "approvalrequests", "watch"),
        ("pgwarden.io", "approvalrequests", "create"),
        ("pgwarden.io", "approvalrequests/status", "get"),
        ("pgwarden.io", "approvalrequests/status", "patch"),
    }


def test_the_approver_decides_and_nothing_more() -> None:
    role = CLUSTER["approver"]
    assert allowed(role, "pgwarden.io", "approvalrequests") == {"get", "list", "watch"}
    assert "patch" in allowed(role, "pgwarden.io", "approvalrequests/status")
    assert {r for _, r, _ in grants(role)} == {"approvalrequests", "approvalrequests/status"}
    assert not {v for *_, v in grants(role)} & {"create", "update", "delete"}


def test_the_operator_manages_what_the_builders_produce() -> None:
    role = CLUSTER["operator"]
    objects = builders.desired(NAME, NS, UID, CONN, policies=[], image="pgwarden:1.0")
    assert "NetworkPolicy" in {o["kind"] for o in objects}
    objects += rbac.proxy_rbac(NAME, NS, UID)
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        resource = obj["kind"].lower() + "s"
        resource = {"networkpolicys": "networkpolicies"}.get(resource, resource)
        assert {"get", "create", "patch"} <= allowed(role, group, resource), obj["kind"]


def test_the_operator_holds_what_the_proxy_role_grants() -> None:
    # Kubernetes refuses a Role that grants more than its creator holds (no `escalate`)
    assert grants(PER_CONNECTION["Role"]) <= grants(CLUSTER["operator"])


def test_the_operator_reads_no_secret_and_deletes_only_what_it_must() -> None:
    role = CLUSTER["operator"]
    assert not [g for g in grants(role) if g[1] == "secrets"]
    # its deletes: ApprovalRequests past their retention period, and the proxy workload whose
    # kind changed (a Deployment replaced by a StatefulSet, or back)
    risky = ("delete", "deletecollection", "update")
    writes = [g for g in grants(role) if g[2] in risky and not g[1].endswith("/finalizers")]
    assert sorted(writes) == [
        ("apps", "deployments", "delete"),
        ("apps", "statefulsets", "delete"),
        ("pgwarden.io", "approvalrequests", "delete"),
    ]
    assert allowed(role, "pgwarden.io", "approvalrequests") == set(
        ["get", "list", "watch", "create", "patch", "delete"]
    )
    # its own kinds, their status, and the finalizers of the owner of what it creates
    assert allowed(role, "pgwarden.io", "databaseconnections") >= {"get", "list", "watch", "patch"}
    assert allowed(role, "pgwarden.io", "accesspolicies") >= {"get", "list", "watch", "patch"}
    assert allowed(role, "pgwarden.io", "databaseconnections/status") == {"get", "patch"}
    assert allowed(role, "pgwarden.io", "accesspolicies/status") == {"get", "patch"}
    assert allowed(role, "pgwarden.io", "databaseconnections/finalizers") == {"update"}
    assert allowed(role, "", "events") == {"create"}


def test_namespaced_and_cluster_scoped_rules_split_the_cluster_role() -> None:
    """The chart's Role per watched namespace gets operator_rules(); cluster-scoped resources
    mean nothing in a Role, so they are kopf's read-only ClusterRole of their own."""
    namespaced, cluster_scoped = rbac.operator_rules(), rbac.operator_cluster_scoped_rules()
    assert CLUSTER["operator"]["rules"] == namespaced + cluster_scoped
    cluster_resources = {"customresourcedefinitions", "namespaces"}
    assert {r for _, r, _ in grants({"rules": cluster_scoped})} == cluster_resources
    assert {v for *_, v in grants({"rules": cluster_scoped})} == {"list", "watch"}
    assert not {r for _, r, _ in grants({"rules": namespaced})} & cluster_resources
    # rules share no lists (YAML dumps them without anchors; one edit changes one rule)
    by_resource = {rule["resources"][0]: rule for rule in namespaced}
    by_resource["configmaps"]["verbs"].append("delete")
    assert "delete" not in by_resource["poddisruptionbudgets"]["verbs"]
    fresh = {rule["resources"][0]: rule for rule in rbac.operator_rules()}
    assert "delete" not in fresh["configmaps"]["verbs"]


# ---------------------------------------------------------------------------------- ownership
@pytest.mark.parametrize("kind", PER_CONNECTION)
def test_per_connection_objects_are_owned_and_labelled_like_the_rest(kind: str) -> None:
    meta = PER_CONNECTION[kind]["metadata"]
    assert meta["name"] == builders.proxy_name(NAME) == PROXY_SA
    assert meta["namespace"] == NS
    assert meta["labels"] == builders.labels(NAME)
    [owner] = meta["ownerReferences"]
    assert owner == {
        "apiVersion": API_VERSION,
        "kind": "DatabaseConnection",
        "name": NAME,
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def test_the_binding_binds_the_proxy_s_account_to_the_proxy_s_role() -> None:
    binding = PER_CONNECTION["RoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": PER_CONNECTION["Role"]["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": PROXY_SA, "namespace": NS}]


def test_the_deployment_runs_as_the_proxy_s_account() -> None:
    deployment = next(
        o
        for o in builders.desired(NAME, NS, UID, CONN, policies=[], image="x:1")
        if o["kind"] == "Deployment"
    )
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == PROXY_SA


def test_cluster_roles_are_not_namespaced_and_not_owned() -> None:
    for role in CLUSTER.values():
        assert "namespace" not in role["metadata"]
        assert "ownerReferences" not in role["metadata"]
