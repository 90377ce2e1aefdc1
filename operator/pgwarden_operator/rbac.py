"""Pure RBAC builders: who may do what with pgwarden's objects, as plain dict manifests.

Per connection `<conn>` (in its namespace, owned by the DatabaseConnection like the rest of
`builders.py`, with the same labels):

- ServiceAccount `<conn>-proxy`: the identity of the proxy pods (the Deployment's
  `serviceAccountName`);
- Role and RoleBinding `<conn>-proxy`: what the proxy does with approval requests, and nothing
  else (create a request, read it back while waiting, write Expired / Executed to its status).

Installed once with the operator (the chart renders them from these functions):

- `operator_rules()`: what the operator itself needs in a namespace it watches, and
  `operator_cluster_scoped_rules()`: kopf's cluster-wide reads (CRDs, namespaces). Watching the
  whole cluster, both go into one ClusterRole (`operator_cluster_role()`); watching some
  namespaces, the chart puts the first into a Role in each of them and the second into a
  ClusterRole of its own;
- `approver_cluster_role()`: for the people who decide; bind it with a RoleBinding in the
  namespaces where they may approve (a ClusterRole so that it is written once, a RoleBinding so
  that approving stays per namespace).

No rule anywhere names `*` or Secrets: the proxy reads its database credential from files the
kubelet mounts, and the operator only names the Secret in the pod template.
"""

from __future__ import annotations

from pgwarden.api.resources import ACCESS_POLICY, APPROVAL_REQUEST, DATABASE_CONNECTION, GROUP
from pgwarden_operator.builders import Manifest, owned_metadata, proxy_name

RBAC_API_VERSION = "rbac.authorization.k8s.io/v1"
RBAC_GROUP = "rbac.authorization.k8s.io"
OPERATOR_CLUSTER_ROLE = "pgwarden-operator"
APPROVER_CLUSTER_ROLE = "pgwarden-approver"

_APPROVALS = APPROVAL_REQUEST.plural
_APPROVALS_STATUS = f"{_APPROVALS}/status"
_READ = ["get", "list", "watch"]
# what the operator's client does with what it manages (k8s.Api.apply: get, then create or a
# merge patch; list and watch for kopf's view of owned objects). No delete (but for the workload
# whose kind changed): owner references let the garbage collector delete what a
# DatabaseConnection owned; no update: patches only.
_MANAGE = ["get", "list", "watch", "create", "patch"]


def _cluster_metadata(name: str, component: str) -> Manifest:
    return {
        "name": name,
        "labels": {
            "app.kubernetes.io/name": name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "pgwarden",
        },
    }


def _rule(group: str, resources: list[str], verbs: list[str]) -> Manifest:
    # copies: rules that share a verb list stay independent (and YAML gets no anchors)
    return {"apiGroups": [group], "resources": list(resources), "verbs": list(verbs)}


# ---------------------------------------------------------------------------------- per proxy
def proxy_service_account(conn_name: str, namespace: str, uid: str) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": owned_metadata(proxy_name(conn_name), namespace, conn_name, uid),
        # the proxy pods mount the token themselves (the Deployment sets
        # automountServiceAccountToken); other pods that borrow this account do not get it
        "automountServiceAccountToken": False,
    }


def proxy_role(conn_name: str, namespace: str, uid: str) -> Manifest:
    """Least privilege for the Kubernetes approval backend, in the connection's namespace."""
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "Role",
        "metadata": owned_metadata(proxy_name(conn_name), namespace, conn_name, uid),
        "rules": [
            # submit: create a request; wait: read it back (get; list and watch for a watch
            # on one name, `fieldSelector=metadata.name=...`). No update, patch or delete of
            # the object: the spec is the statement a person approves and stays as written.
            _rule(GROUP, [_APPROVALS], ["get", "list", "watch", "create"]),
            # the proxy's part of the decision: Expired at the timeout, Executed after the run
            # (the CRD's transition rule keeps it from writing anything else)
            _rule(GROUP, [_APPROVALS_STATUS], ["get", "patch"]),
        ],
    }


def proxy_role_binding(conn_name: str, namespace: str, uid: str) -> Manifest:
    name = proxy_name(conn_name)
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "RoleBinding",
        "metadata": owned_metadata(name, namespace, conn_name, uid),
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
    }


def proxy_rbac(conn_name: str, namespace: str, uid: str) -> list[Manifest]:
    """ServiceAccount, Role and RoleBinding of the connection's proxy, in creation order."""
    return [
        proxy_service_account(conn_name, namespace, uid),
        proxy_role(conn_name, namespace, uid),
        proxy_role_binding(conn_name, namespace, uid),
    ]


# ---------------------------------------------------------------------------------- operator
def operator_rules() -> list[Manifest]:
    """What the operator does in a namespace it watches (namespaced resources only)."""
    return [
        # its own resources: kopf watches them and keeps its progress and finalizer on
        # the object (a merge patch of metadata); the operator never creates or deletes
        # what users declare
        _rule(
            GROUP,
            [DATABASE_CONNECTION.plural, ACCESS_POLICY.plural],
            ["get", "list", "watch", "patch"],
        ),
        # Ready/Valid conditions go through the status subresource
        _rule(
            GROUP,
            [f"{DATABASE_CONNECTION.plural}/status", f"{ACCESS_POLICY.plural}/status"],
            ["get", "patch"],
        ),
        # owned objects carry blockOwnerDeletion: with the OwnerReferencesPermission-
        # Enforcement admission plugin that needs update on the owner's finalizers
        _rule(GROUP, [f"{DATABASE_CONNECTION.plural}/finalizers"], ["update"]),
        # approval requests: read (and kopf's annotations), plus exactly what the proxy
        # Role grants. Kubernetes only lets the operator create a Role that grants what
        # the operator holds itself (RBAC escalation prevention); the alternative, the
        # `escalate` and `bind` verbs, would let it grant anything. Delete: decided
        # requests go after the retention period (approvals.py); the only delete it holds.
        _rule(GROUP, [_APPROVALS], ["get", "list", "watch", "create", "patch", "delete"]),
        _rule(GROUP, [_APPROVALS_STATUS], ["get", "patch"]),
        # the proxy bundle (ConfigMap), its Service and ServiceAccount
        _rule("", ["configmaps", "services", "serviceaccounts"], _MANAGE),
        # the proxy pods: a Deployment, or a StatefulSet when the spool is on claims. Delete:
        # only when one replaces the other (spec.proxy.spoolVolume set or removed), and only
        # the one this connection owns (handlers._remove_other_workload)
        _rule("apps", ["deployments", "statefulsets"], [*_MANAGE, "delete"]),
        _rule("policy", ["poddisruptionbudgets"], _MANAGE),
        # egress of the proxy to an in-cluster database
        _rule("networking.k8s.io", ["networkpolicies"], _MANAGE),
        # the proxy's Role and RoleBinding (above: it can only grant what it holds)
        _rule(RBAC_GROUP, ["roles", "rolebindings"], _MANAGE),
        # kopf posts what its handlers did and why they failed as Events on the object
        _rule("", ["events"], ["create"]),
        # Secrets: none. The credentials Secret is only named in the pod template; the
        # kubelet mounts it, the operator never reads a secret value.
    ]


def operator_cluster_scoped_rules() -> list[Manifest]:
    """kopf notices CRDs and namespaces that come and go (read-only). Without these it works
    from what it found at start and logs that it cannot watch them."""
    return [
        _rule("apiextensions.k8s.io", ["customresourcedefinitions"], ["list", "watch"]),
        _rule("", ["namespaces"], ["list", "watch"]),
    ]


def operator_cluster_role(name: str = OPERATOR_CLUSTER_ROLE) -> Manifest:
    """Everything the operator needs when it watches the whole cluster (bound with a
    ClusterRoleBinding)."""
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRole",
        "metadata": _cluster_metadata(name, "operator"),
        "rules": operator_rules() + operator_cluster_scoped_rules(),
    }


# ---------------------------------------------------------------------------------- people
def approver_cluster_role(name: str = APPROVER_CLUSTER_ROLE) -> Manifest:
    """For people who decide: read requests, write a decision to their status; nothing else
    (they cannot create, change or delete a request, so what they approve is what was held)."""
    return {
        "apiVersion": RBAC_API_VERSION,
        "kind": "ClusterRole",
        "metadata": _cluster_metadata(name, "approver"),
        "rules": [
            _rule(GROUP, [_APPROVALS], _READ),
            # the decision (`kubectl patch ... --subresource=status`); get: reading the status
            # subresource is no more than reading the request
            _rule(GROUP, [_APPROVALS_STATUS], ["get", "patch"]),
        ],
    }
