"""examples/ (GitOps) and tests/e2e/manifests/ (the kind suite's cluster objects), offline:
pgwarden.io objects pass the models and the CRD schemas in crds/, built-in kinds the Kubernetes
1.31 schemas, and the examples fit together (names, audience, identities)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.manifests import ROOT, Obj, crd_errors, is_pgwarden, load, model_errors, validate

EXAMPLES = ROOT / "examples"
E2E_MANIFESTS = ROOT / "tests" / "e2e" / "manifests"
NOT_OBJECTS = {"kustomization.yaml"}
SECRET_EXAMPLE = EXAMPLES / "secret-credentials.example.yaml"
MANIFEST_FILES = sorted(
    p
    for p in [*EXAMPLES.rglob("*.yaml"), *E2E_MANIFESTS.glob("*.yaml")]
    if p.name not in NOT_OBJECTS
)


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def examples() -> list[Obj]:
    """What `kubectl apply -k examples/` applies, as the files hold it."""
    kustomization = yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())
    return [d for f in kustomization["resources"] for d in load(EXAMPLES / f)]


def one(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    (found,) = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    return found


# ---------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("path", MANIFEST_FILES, ids=rel)
def test_manifest_is_valid(path: Path) -> None:
    docs = load(path)
    assert docs, f"{rel(path)} holds no object"
    for obj in docs:
        validate(obj)


def test_examples_hold_the_three_kinds_of_policy_setup() -> None:
    kinds = [o["kind"] for o in examples()]
    assert kinds.count("DatabaseConnection") == 1
    assert kinds.count("AccessPolicy") == 2
    assert {"ServiceAccount", "Deployment", "Namespace"} <= set(kinds)


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("DatabaseConnection", ("spec", "tls", "sslmode"), "prefer"),
        ("AccessPolicy", ("spec", "guardrails", "deny"), ["everything"]),
        ("AccessPolicy", ("spec", "subjects", "teams"), ["x"]),  # pruned by the API server
    ],
)
def test_a_wrong_example_is_caught_by_both_checks(
    kind: str, path: tuple[str, ...], value: Any
) -> None:
    obj = copy.deepcopy(next(o for o in examples() if o["kind"] == kind))
    node = obj
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    assert crd_errors(obj)
    assert model_errors(obj)


def test_a_wrong_builtin_object_is_caught() -> None:
    deployment = copy.deepcopy(one(examples(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


# ---------------------------------------------------------------------------------- coherence
def test_policies_select_the_example_connection() -> None:
    objs = examples()
    connection = one(objs, "DatabaseConnection")["metadata"]["name"]
    for policy in (o for o in objs if o["kind"] == "AccessPolicy"):
        assert policy["spec"]["connections"] == [connection], policy["metadata"]["name"]


def test_agent_logs_in_with_a_token_the_connection_accepts() -> None:
    objs = examples()
    kustomization = yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())
    namespace = kustomization["namespace"]
    oidc = one(objs, "DatabaseConnection")["spec"]["auth"]["oidc"]
    assert oidc["serviceAccounts"] is True
    pod = one(objs, "Deployment", "sql-agent")["spec"]["template"]["spec"]
    sources = pod["volumes"][0]["projected"]["sources"]
    token = next(s["serviceAccountToken"] for s in sources if "serviceAccountToken" in s)
    assert token["audience"] == oidc["audience"]
    account = one(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    # the identity the proxy derives from the token is a subject of the read-only policy
    readonly = one(objs, "AccessPolicy", "agents-readonly")["spec"]
    assert f"system:serviceaccount:{namespace}:{account}" in readonly["subjects"]["users"]
    assert readonly["access"] == "read-only"
    # the password is the token file, read at each login (the kubelet rotates it)
    script = pod["containers"][0]["args"][0]
    mount = pod["containers"][0]["volumeMounts"][0]["mountPath"]
    assert f'PGPASSWORD="$(cat {mount}/{token["path"]})"' in script
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["PGSSLMODE"] == "verify-full"
    conn_name = one(objs, "DatabaseConnection")["metadata"]["name"]
    assert env["PGHOST"] == f"{conn_name}-proxy.{namespace}.svc"  # the operator's Service


def test_write_policy_needs_approval() -> None:
    spec = one(examples(), "AccessPolicy", "orders-team-approved-writes")["spec"]
    assert spec["access"] == "read-write"
    assert "write" in spec["approvals"]["require"]


# ---------------------------------------------------------------------------------- secrets
def test_no_secret_is_applied_and_the_placeholder_holds_none() -> None:
    assert all(o["kind"] != "Secret" for o in examples())
    listed = set(yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())["resources"])
    assert SECRET_EXAMPLE.name not in listed
    (secret,) = load(SECRET_EXAMPLE)
    assert secret["stringData"]["password"] == "REPLACE-ME"
    assert "data" not in secret
    # the Secret the connection names has the keys it reads
    ref = one(examples(), "DatabaseConnection")["spec"]["credentialsSecretRef"]["name"]
    assert secret["metadata"]["name"] == ref
    assert set(secret["stringData"]) == {"username", "password"}


def test_kustomization_lists_every_example_file() -> None:
    listed = set(yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())["resources"])
    files = {p.name for p in EXAMPLES.glob("*.yaml")} - NOT_OBJECTS - {SECRET_EXAMPLE.name}
    assert listed == files


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_valid_objects_in_one_namespace() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(EXAMPLES)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert len(rendered) == len(examples())
    for obj in rendered:
        validate(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "data", obj["metadata"]["name"]
    assert sum(is_pgwarden(o) for o in rendered) == 3
