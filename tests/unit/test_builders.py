"""The operator's pure builders: a DatabaseConnection in, valid and hardened manifests out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from pgwarden.api.config import ProxyConfig, load_config
from pgwarden.api.policy import AccessPolicySpec
from pgwarden.api.resources import API_VERSION, DatabaseConnectionSpec
from pgwarden_operator import builders
from pgwarden_operator.config import OperatorDefaults
from pgwarden_proxy.reload import LIVE_FIELDS

K8S_VERSION = "1.31"
NAME, NS, UID, IMAGE = "orders-db", "data", "0f6a3c1e-1111-2222-3333-444455556666", "pgwarden:1.0"
PASSWORD = "s3cr3t-Hunter2-do-not-leak"  # what the Secret would hold; builders never see it
SECRET = "orders-db-credentials"


def conn(**over: Any) -> DatabaseConnectionSpec:
    raw: dict[str, Any] = {
        "host": "orders.data.svc",
        "database": "orders",
        "credentialsSecretRef": {"name": SECRET},
        "tls": {"sslmode": "verify-full", "caSecretRef": {"name": "orders-db-ca"}},
        "proxy": {"replicas": 2, "tlsSecretRef": {"name": "orders-db-proxy-tls"}},
        "auth": {"oidc": {"issuer": "https://idp.example.com"}},
        "recording": {"sink": {"s3": {"bucket": "audit", "region": "us-east-1"}}},
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return DatabaseConnectionSpec.model_validate(raw)


def policy(**spec: Any) -> AccessPolicySpec:
    return AccessPolicySpec.model_validate(spec)


POLICIES = [
    ("everyone-reads", policy(connections=["*"], subjects={"groups": ["ai-agents"]})),
    ("orders-writers", policy(connections=[NAME], access="read-write")),
    ("billing-only", policy(connections=["billing-db"], access="read-write")),
]


def desired(spec: DatabaseConnectionSpec | None = None, **kw: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"policies": POLICIES, "image": IMAGE, **kw}
    return builders.desired(NAME, NS, UID, spec or conn(), **args)


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The objects by kind; the replicas' headless Service as "Service/peers"."""
    kinds = {
        "Service/peers" if o["metadata"]["name"] == builders.peers_name(NAME) else o["kind"]: o
        for o in objects
    }
    assert len(kinds) == len(objects)
    return kinds


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = by_kind(objects)["Deployment"]["spec"]["template"]["spec"]
    return spec


def proxy_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = pod_spec(objects)["containers"]
    assert isinstance(container, dict)
    return container


def loaded_bundle(objects: list[dict[str, Any]], tmp_path: Path) -> ProxyConfig:
    path = tmp_path / "proxy.yaml"
    path.write_text(by_kind(objects)["ConfigMap"]["data"]["proxy.yaml"])
    return load_config(path)


VARIANTS = {
    "full": conn(inCluster=True, databaseSelector={"app": "orders-postgres"}),
    "minimal": conn(tls={"sslmode": "require", "caSecretRef": None}, proxy={"tlsSecretRef": None}),
    "single-replica-lb": conn(proxy={"replicas": 1, "service": {"type": "LoadBalancer"}}),
    "persistent-spool": conn(proxy={"spoolVolume": {"size": "4Gi", "storageClassName": "ssd"}}),
}


# ---------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates_against_the_kubernetes_schema(variant: str) -> None:
    objects = desired(VARIANTS[variant])
    kinds = {o["kind"] for o in objects}
    assert kinds >= {"ConfigMap", "Service", "PodDisruptionBudget"}
    assert len(kinds & builders.WORKLOAD_KINDS) == 1
    for obj in objects:
        # strict: an unknown or misspelt field is an error, not silently dropped by the API
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_validator_is_strict() -> None:
    svc = by_kind(desired())["Service"]
    svc["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------- bundle
def test_bundle_round_trips_and_holds_exactly_the_selecting_policies(tmp_path: Path) -> None:
    objects = desired()
    config = loaded_bundle(objects, tmp_path)
    assert config == builders.bundle(conn(), NAME, NS, POLICIES)
    assert [p.name for p in config.policies] == ["everyone-reads", "orders-writers"]
    assert config.policies[1].spec == POLICIES[1][1]
    assert config.connection == NAME
    up = config.upstream
    assert (up.host, up.port, up.database) == ("orders.data.svc", 5432, "orders")
    assert up.username is None
    assert up.username_file == Path("/etc/pgwarden/db/username")
    assert up.password_file == Path("/etc/pgwarden/db/password")
    assert up.ca_file == Path("/etc/pgwarden/db-ca/ca.crt")
    assert config.approvals.backend == "kubernetes"
    assert config.approvals.namespace == NS
    assert config.metrics.port == 9187
    assert config.listen.port == 5432
    assert config.listen.tls is not None
    assert config.listen.tls.cert_file == Path("/etc/pgwarden/tls/tls.crt")
    assert not config.listen.insecure_plaintext
    assert config.recording.sink is not None
    assert config.recording.sink.s3 is not None
    assert config.auth == conn().auth


def test_policy_order_does_not_change_the_rendering() -> None:
    a = by_kind(desired())["ConfigMap"]
    b = by_kind(desired(policies=list(reversed(POLICIES))))["ConfigMap"]
    assert a == b


def test_without_a_tls_secret_the_proxy_listens_in_plaintext_and_says_why(tmp_path: Path) -> None:
    objects = desired(conn(proxy={"tlsSecretRef": None}))
    config = loaded_bundle(objects, tmp_path)
    assert config.listen.tls is None
    assert config.listen.insecure_plaintext
    assert "only for testing" in by_kind(objects)["ConfigMap"]["data"]["proxy.yaml"]
    assert "tls" not in {v["name"] for v in pod_spec(objects)["volumes"]}


def test_verify_full_without_a_ca_is_refused_naming_the_spec_field() -> None:
    with pytest.raises(builders.InvalidSpec, match=r"spec\.tls\.caSecretRef"):
        desired(conn(tls={"sslmode": "verify-full", "caSecretRef": None}))


@pytest.mark.parametrize("name", ["Orders", "9db", "a" * 60, "db_1"])
def test_a_name_that_cannot_name_a_service_is_refused(name: str) -> None:
    with pytest.raises(builders.InvalidSpec, match=r"metadata\.name"):
        builders.desired(name, NS, UID, conn(), [], IMAGE)


# ---------------------------------------------------------------------------------- credentials
def test_no_credential_in_the_config_map_or_in_any_env_var() -> None:
    objects = desired()
    rendered = json.dumps(objects)
    assert PASSWORD not in rendered
    cm = by_kind(objects)["ConfigMap"]
    assert SECRET not in json.dumps(cm)  # not even the Secret's name: only mounted file paths
    for container in pod_spec(objects)["containers"]:
        assert "envFrom" not in container
        for env in container.get("env", []):
            assert "valueFrom" not in env or "secretKeyRef" not in env["valueFrom"]
    creds = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "db-credentials")
    assert creds["secret"]["secretName"] == SECRET
    assert creds["secret"]["items"] == [
        {"key": "username", "path": "username"},
        {"key": "password", "path": "password"},
    ]
    assert creds["secret"]["defaultMode"] == 0o400
    mounts = {m["name"]: m for m in proxy_container(objects)["volumeMounts"]}
    assert mounts["db-credentials"] == {
        "name": "db-credentials",
        "mountPath": "/etc/pgwarden/db",
        "readOnly": True,
    }
    # secret files stay 0400 root-owned unless fsGroup hands them to the proxy's group
    assert pod_spec(objects)["securityContext"]["fsGroup"] == builders.PROXY_UID


def test_mounts_match_the_bundle_paths(tmp_path: Path) -> None:
    objects = desired()
    config = loaded_bundle(objects, tmp_path)
    dirs = {m["name"]: Path(m["mountPath"]) for m in proxy_container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(objects)["volumes"]}
    assert config.upstream.password_file is not None
    assert config.upstream.ca_file is not None
    assert config.upstream.password_file.parent == dirs["db-credentials"]
    assert config.upstream.ca_file.parent == dirs["db-ca"]
    assert volumes["db-ca"]["secret"]["secretName"] == "orders-db-ca"
    assert config.listen.tls is not None
    assert config.listen.tls.key_file.parent == dirs["tls"]
    assert volumes["tls"]["secret"]["secretName"] == "orders-db-proxy-tls"
    assert config.recording.spool_dir == dirs["spool"]
    assert "emptyDir" in volumes["spool"]
    assert "emptyDir" in volumes["tmp"]
    assert dirs["tmp"] == Path("/tmp")
    # the bundle directory, not a subPath: a subPath mount never sees a ConfigMap update
    assert dirs["bundle"] / "proxy.yaml" == builders.BUNDLE_FILE
    assert all("subPath" not in m for m in proxy_container(objects)["volumeMounts"])
    assert (
        volumes["bundle"]["configMap"]["name"] == by_kind(objects)["ConfigMap"]["metadata"]["name"]
    )
    assert proxy_container(objects)["command"] == [
        "pgwarden",
        "proxy",
        "--config",
        "/etc/pgwarden/bundle/proxy.yaml",
    ]


# ---------------------------------------------------------------------------------- hardening
def test_hardened_security_context_probes_ports_and_resources() -> None:
    objects = desired()
    container = proxy_container(objects)
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    pod = pod_spec(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "orders-db-proxy"
    assert pod["automountServiceAccountToken"] is True
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"postgres": 5432, "metrics": 9187}
    assert container["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"memory": "512Mi"},
    }
    assert container["image"] == IMAGE
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert "env" not in container


def test_the_spec_image_wins_over_the_operators() -> None:
    objects = desired(conn(proxy={"image": "registry.example/pgwarden:2"}))
    assert proxy_container(objects)["image"] == "registry.example/pgwarden:2"


# ---------------------------------------------------------------------------------- ownership
def test_every_object_is_owned_and_labelled() -> None:
    objects = desired(VARIANTS["full"])
    assert len(objects) == 6
    expected_labels = {
        "app.kubernetes.io/name": "pgwarden-proxy",
        "app.kubernetes.io/instance": NAME,
        "app.kubernetes.io/component": "proxy",
        "app.kubernetes.io/managed-by": "pgwarden-operator",
        "app.kubernetes.io/part-of": "pgwarden",
        "pgwarden.io/connection": NAME,
    }
    assert builders.labels(NAME) == expected_labels
    for obj in objects:
        meta = obj["metadata"]
        assert meta["namespace"] == NS
        assert meta["labels"] == expected_labels
        assert meta["ownerReferences"] == [
            {
                "apiVersion": API_VERSION,
                "kind": "DatabaseConnection",
                "name": NAME,
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    kinds = by_kind(objects)
    selector = kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    pod_labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert pod_labels == expected_labels
    assert selector.items() <= pod_labels.items()
    assert kinds["Service"]["spec"]["selector"] == selector
    assert kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"] == selector


def test_service_follows_the_spec() -> None:
    svc = by_kind(desired(conn(proxy={"service": {"type": "NodePort", "port": 6432}})))["Service"]
    assert svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["ports"] == [
        {"name": "postgres", "port": 6432, "targetPort": "postgres", "protocol": "TCP"}
    ]


@pytest.mark.parametrize(
    ("replicas", "budget"),
    [(3, {"minAvailable": 1}), (2, {"minAvailable": 1}), (1, {"maxUnavailable": 1})],
)
def test_disruption_budget(replicas: int, budget: dict[str, int]) -> None:
    pdb = by_kind(desired(conn(proxy={"replicas": replicas})))["PodDisruptionBudget"]
    assert {k: v for k, v in pdb["spec"].items() if k != "selector"} == budget
    assert (
        by_kind(desired(conn(proxy={"replicas": replicas})))["Deployment"]["spec"]["replicas"]
        == replicas
    )


# ---------------------------------------------------------------------------------- spec hash
def template(objects: list[dict[str, Any]]) -> dict[str, Any]:
    tpl: dict[str, Any] = by_kind(objects)["Deployment"]["spec"]["template"]
    return tpl


def spec_hash(objects: list[dict[str, Any]]) -> str:
    value: str = template(objects)["metadata"]["annotations"]["pgwarden.io/spec-hash"]
    return value


@pytest.mark.parametrize(
    "change",
    [
        {"host": "orders-2.data.svc"},
        {"port": 6432},
        {"database": "orders_v2"},
        {"tls": {"sslmode": "verify-ca"}},
        {"proxy": {"tlsSecretRef": {"name": "other-tls"}}},
        {"proxy": {"resources": {"requests": {"cpu": "1"}}}},
        {"auth": {"oidc": {"issuer": "https://other.example.com"}}},
        {"recording": {"sink": {"s3": {"bucket": "audit-2"}}}},
        {"recording": {"signingKeySecretRef": {"name": "orders-signing"}}},
        {"recording": {"s3CredentialsSecretRef": {"name": "orders-s3"}}},
        {"masking": {"hashKeySecretRef": {"name": "orders-hash"}}},
    ],
)
def test_a_change_that_needs_a_restart_changes_the_hash(change: dict[str, Any]) -> None:
    assert spec_hash(desired(conn(**change))) != spec_hash(desired())


def test_a_new_image_changes_the_hash() -> None:
    assert spec_hash(desired(image="pgwarden:1.1")) != spec_hash(desired())
    assert spec_hash(desired(conn(proxy={"image": "pgwarden:2"}))) != spec_hash(desired())


def test_a_policy_change_rerenders_the_config_map_only() -> None:
    before = by_kind(desired())
    changed = [
        ("everyone-reads", policy(connections=["*"], guardrails={"maxRows": 10})),
        ("new-one", policy(connections=[NAME], subjects={"users": ["bot@example.com"]})),
    ]
    after = by_kind(desired(policies=changed))
    assert after["ConfigMap"] != before["ConfigMap"]
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        assert after[kind] == before[kind], kind
    assert spec_hash(list(after.values())) == spec_hash(list(before.values()))
    assert spec_hash(desired(policies=[])) == spec_hash(list(before.values()))


def test_scaling_does_not_roll_the_pods() -> None:
    """replicas is the Deployment's to act on: restarting the running pods would only cut
    their sessions, so the pod template (and the hash in it) stays as it is."""
    two, five = desired(), desired(conn(proxy={"replicas": 5}))
    assert by_kind(five)["Deployment"]["spec"]["replicas"] == 5
    assert template(five) == template(two)


def test_the_hash_leaves_out_only_what_the_proxy_reloads_live() -> None:
    assert set(LIVE_FIELDS) >= builders.LIVE_BUNDLE_FIELDS
    assert "upstream" not in builders.LIVE_BUNDLE_FIELDS  # a new database host rolls the pods


# ---------------------------------------------------------------------------------- netpol
@pytest.mark.parametrize(
    ("in_cluster", "selector", "expected"),
    [(True, {"app": "orders-postgres"}, True), (True, {}, False), (False, {"app": "x"}, False)],
)
def test_network_policy_only_in_cluster_with_a_selector(
    in_cluster: bool, selector: dict[str, str], expected: bool
) -> None:
    objects = desired(conn(inCluster=in_cluster, databaseSelector=selector))
    kinds = by_kind(objects)
    assert ("NetworkPolicy" in kinds) is expected
    if expected:
        np = kinds["NetworkPolicy"]
        assert np["spec"]["podSelector"] == {"matchLabels": selector}
        assert np["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = np["spec"]["ingress"]
        assert rule["from"] == [
            {"podSelector": {"matchLabels": kinds["Deployment"]["spec"]["selector"]["matchLabels"]}}
        ]
        assert rule["ports"] == [{"protocol": "TCP", "port": 5432}]


def test_the_config_map_is_yaml_with_a_header() -> None:
    text = by_kind(desired())["ConfigMap"]["data"]["proxy.yaml"]
    assert text.startswith("# Rendered by pgwarden-operator")
    assert yaml.safe_load(text)["connection"] == NAME


# ---------------------------------------------------------------------------------- defaults
DEFAULTS = OperatorDefaults.model_validate(
    {
        "oidc": {"issuer": "https://default-idp.example.com", "audience": "gateway"},
        "recording": {"sink": {"file": {"dir": "/recordings"}}},
    }
)
BARE = conn(auth=None, recording={"sink": None})  # leaves both to the operator's defaults


def test_defaults_fill_what_the_spec_leaves_out(tmp_path: Path) -> None:
    config = loaded_bundle(desired(BARE, defaults=DEFAULTS), tmp_path)
    assert config.auth.oidc == DEFAULTS.oidc
    assert config.recording.sink == DEFAULTS.recording.sink
    assert builders.with_defaults(BARE, DEFAULTS) == conn(
        auth={"oidc": {"issuer": "https://default-idp.example.com", "audience": "gateway"}},
        recording={"sink": {"file": {"dir": "/recordings"}}},
    )


def test_the_spec_replaces_a_default_as_a_whole(tmp_path: Path) -> None:
    """No field-by-field merge: the spec's issuer does not get the default's audience."""
    config = loaded_bundle(desired(conn(), defaults=DEFAULTS), tmp_path)
    assert config.auth == conn().auth
    assert config.auth.oidc.audience == "pgwarden"  # the model's default, not "gateway"
    assert config.recording.sink == conn().recording.sink
    assert desired(conn(), defaults=DEFAULTS) == desired(conn())


def test_each_default_applies_on_its_own(tmp_path: Path) -> None:
    only_auth = OperatorDefaults.model_validate({"oidc": {"issuer": "https://i.example.com"}})
    config = loaded_bundle(desired(BARE, defaults=only_auth), tmp_path)
    assert config.auth.oidc.issuer == "https://i.example.com"
    assert config.recording.sink is None  # no sink anywhere: sessions are only logged
    own_sink = conn(auth=None)
    config = loaded_bundle(desired(own_sink, defaults=DEFAULTS), tmp_path)
    assert config.recording.sink == conn().recording.sink


@pytest.mark.parametrize(
    "defaults", [None, OperatorDefaults(), OperatorDefaults.model_validate({"recording": {}})]
)
def test_no_issuer_anywhere_is_an_invalid_spec(defaults: OperatorDefaults | None) -> None:
    with pytest.raises(builders.InvalidSpec) as e:
        desired(BARE, defaults=defaults)
    message = str(e.value)
    assert message.startswith("spec.auth:")
    assert "spec.auth.oidc" in message
    assert "defaults.oidc" in message


def test_a_new_default_rolls_the_pods_that_use_it() -> None:
    other = OperatorDefaults.model_validate(
        {**DEFAULTS.model_dump(mode="json"), "oidc": {"issuer": "https://new.example.com"}}
    )
    assert spec_hash(desired(BARE, defaults=other)) != spec_hash(desired(BARE, defaults=DEFAULTS))
    # a connection with its own auth and sink does not use the defaults: its pods stay
    assert spec_hash(desired(defaults=other)) == spec_hash(desired(defaults=DEFAULTS))
    # the status's specHash (handlers) is the pod template's
    assert builders.spec_hash(BARE, NAME, NS, IMAGE, defaults=DEFAULTS) == spec_hash(
        desired(BARE, defaults=DEFAULTS)
    )


def test_defaulted_manifests_validate() -> None:
    for obj in desired(BARE, defaults=DEFAULTS):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ---------------------------------------------------------------------------------- keys, peers
def test_keys_and_s3_credentials_are_mounted_files_the_bundle_names(tmp_path: Path) -> None:
    spec = conn(
        recording={
            "signingKeySecretRef": {"name": "orders-signing"},
            "s3CredentialsSecretRef": {"name": "orders-s3"},
        },
        masking={"hashKeySecretRef": {"name": "orders-hash"}},
    )
    objects = desired(spec)
    config = loaded_bundle(objects, tmp_path)
    mounts = {m["name"]: Path(m["mountPath"]) for m in proxy_container(objects)["volumeMounts"]}
    volumes = {v["name"]: v["secret"] for v in pod_spec(objects)["volumes"] if "secret" in v}
    assert config.recording.signing_key_file == mounts["signing-key"] / "signing.key"
    assert volumes["signing-key"]["secretName"] == "orders-signing"
    assert config.masking.hash_key_file == mounts["hash-key"] / "hash.key"
    assert volumes["hash-key"]["secretName"] == "orders-hash"
    assert volumes["s3-credentials"]["secretName"] == "orders-s3"
    for name in ("signing-key", "hash-key", "s3-credentials"):
        assert volumes[name]["defaultMode"] == 0o400
    # boto3 finds the mounted credentials file by path; the credentials stay in the file
    assert proxy_container(objects)["env"] == [
        {
            "name": "AWS_SHARED_CREDENTIALS_FILE",
            "value": str(mounts["s3-credentials"] / "credentials"),
        }
    ]
    assert "env" not in proxy_container(desired())
    with_default_sink = builders.with_defaults(
        conn(recording={"sink": None, "signingKeySecretRef": {"name": "orders-signing"}}),
        OperatorDefaults.model_validate({"recording": {"sink": {"file": {"dir": "/r"}}}}),
    )
    assert with_default_sink.recording.signing_key_secret_ref is not None


def test_replicas_find_each_other_through_a_headless_service(tmp_path: Path) -> None:
    objects = desired()
    peers = by_kind(objects)["Service/peers"]
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["selector"] == by_kind(objects)["Service"]["spec"]["selector"]
    config = loaded_bundle(objects, tmp_path)
    assert config.peers.dns == f"{peers['metadata']['name']}.{NS}.svc"
    assert config.peers.port is None  # listen.port, the same in every replica


# ---------------------------------------------------------------------------------- spool
def test_a_spool_volume_makes_a_stateful_set_with_a_claim_per_replica() -> None:
    objects = desired(VARIANTS["persistent-spool"])
    kinds = by_kind(objects)
    assert "Deployment" not in kinds
    sts = kinds["StatefulSet"]
    assert sts["metadata"]["name"] == builders.proxy_name(NAME)
    # the headless Service of the replicas governs it
    assert sts["spec"]["serviceName"] == kinds["Service/peers"]["metadata"]["name"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["resources"]["requests"]["storage"] == "4Gi"
    assert claim["spec"]["storageClassName"] == "ssd"
    pod = sts["spec"]["template"]["spec"]
    assert "spool" not in {v["name"] for v in pod["volumes"]}  # the claim, not an emptyDir
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["spool"] == str(builders.SPOOL_DIR)
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    # the same pod as the Deployment's, but for the spool volume and the revision label
    plain = by_kind(desired())["Deployment"]["spec"]["template"]["spec"]
    assert pod["containers"] == plain["containers"]
    assert pod["topologySpreadConstraints"][0]["matchLabelKeys"] == ["controller-revision-hash"]


@pytest.mark.parametrize("size", ["1Gi", "1000Mi", "1G"])
def test_a_spool_volume_smaller_than_the_spool_is_refused(size: str) -> None:
    with pytest.raises(builders.InvalidSpec, match=r"spec\.proxy\.spoolVolume\.size"):
        desired(conn(proxy={"spoolVolume": {"size": size}}))


@pytest.mark.parametrize(
    ("quantity", "value"),
    [("2Gi", 2 * 2**30), ("1536Mi", 1536 * 2**20), ("1.5G", 1_500_000_000), ("100", 100)],
)
def test_quantities(quantity: str, value: int) -> None:
    assert builders.quantity_bytes(quantity) == value
