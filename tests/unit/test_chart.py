"""The Helm chart, rendered and linted offline with Helm's own SDK (`helm-python-sdk`: Helm v4's Go
SDK as a library, no cluster, no network): it lints, every manifest validates against the
Kubernetes schemas, its CRDs and RBAC are the generated ones, and bad values are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from pgwarden import crds
from pgwarden.cli import build_parser
from pgwarden_operator import admission, approvals, config, rbac

CHART = Path(__file__).resolve().parents[2] / "charts" / "pgwarden"
K8S_VERSIONS = ["1.30", "1.31"]  # 1.30: ValidatingAdmissionPolicy is GA (the chart's kubeVersion)
RELEASE, NS = "pgwarden", "pgwarden-system"
OIDC = {"issuer": "https://idp.example.com", "audience": "pgwarden", "groupsClaim": "roles"}
S3 = {"s3": {"bucket": "audit", "prefix": "pgwarden/", "region": "eu-west-1"}}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cluster-wide": {"watchNamespaces": ["*"]},
    "namespaces": {"watchNamespaces": ["data", "analytics", "data"]},
    "four-eyes-off": {"fourEyes": {"enabled": False}},
    "defaults": {
        "defaults": {"oidc": OIDC, "recording": {"sink": S3}},
        "approvalRetention": "30d",
    },
    "file-sink": {"defaults": {"recording": {"sink": {"file": {"dir": "/recordings"}}}}},
    "everything": {
        "fullnameOverride": "gate",
        "image": {
            "repository": "registry.example/pgwarden",
            "tag": "1.2.3",
            "pullPolicy": "Always",
        },
        "imagePullSecrets": [{"name": "regcred"}],
        "proxyImage": {"tag": "1.2.4"},
        "resources": {"requests": {"cpu": 0.1, "memory": "64Mi"}, "limits": {"memory": "1Gi"}},
        "serviceAccount": {"annotations": {"example.com/role": "pgwarden"}},
        "podAnnotations": {"example.com/scrape": "false"},
        "podLabels": {"team": "data"},
        "priorityClassName": "system-cluster-critical",
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders (templates only: Helm installs crds/ separately)."""
    out = []
    for name, text in sorted(chart.render(values or {}, name=RELEASE, namespace=NS).items()):
        if name.endswith(".yaml"):
            out += [doc for doc in yaml.safe_load_all(text) if doc]
    return out


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (obj,) = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return obj


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = find(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(c, dict)
    return c


def env(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objects)["env"]}


# ---------------------------------------------------------------------------------- lint
@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_passes_strictly(values: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[values], strict=True, namespace=NS, kube_version="v1.30.0")
    assert report["errors"] == []
    # severity 1 is information ("icon is recommended"); 2 warnings and 3 errors fail
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_a_broken_chart(tmp_path: Path) -> None:
    broken = tmp_path / "pgwarden"
    broken.mkdir()
    (broken / "Chart.yaml").write_text("apiVersion: v2\nname: pgwarden\nversion: 0.1.0\n")
    (broken / "templates").mkdir()
    (broken / "templates" / "x.yaml").write_text("kind: {{ .Values.nope.deeper }}\n")
    assert helm.lint(broken, strict=True)["errors"]


# ---------------------------------------------------------------------------------- schemas
@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_manifest_validates_against_the_kubernetes_schema(
    chart: helm.Chart, values: str, version: str
) -> None:
    objects = render(chart, VALUE_SETS[values])
    assert {o["kind"] for o in objects} >= {
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "ClusterRole",
        "ClusterRoleBinding",
    }
    for obj in objects:
        # strict: a misspelt field is an error, not silently dropped by the API server
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_crds_validate_against_the_kubernetes_schema(chart: helm.Chart) -> None:
    for crd in chart.crds:
        kubernetes_validate.validate(yaml.safe_load(crd["data"]), K8S_VERSIONS[0], strict=True)


# ---------------------------------------------------------------------------------- generated
def test_the_chart_crds_are_pgwarden_crds(chart: helm.Chart) -> None:
    hint = "charts/pgwarden/crds is stale: run `pgwarden crds --out charts/pgwarden/crds`"
    shipped = {Path(c["name"]).name: c["data"] for c in chart.crds}
    assert shipped == crds.all_crds(), hint


def test_generated_chart_files_are_fresh() -> None:
    for name, text in admission.render_chart().items():
        assert (CHART / name).read_text(encoding="utf-8") == text, (
            f"charts/pgwarden/{name} is stale: run `python -m pgwarden_operator.admission`"
        )


def test_values_schema_is_what_helm_loads(chart: helm.Chart) -> None:
    assert chart.schema == admission.values_schema()
    assert chart.schema["$schema"] == "http://json-schema.org/draft-07/schema#"


# ---------------------------------------------------------------------------------- values
@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"imagee": {"tag": "1"}}, "additional properties 'imagee'"),  # a typo at the top
        ({"image": {"tagg": "1"}}, "additional properties 'tagg'"),  # a typo below
        ({"image": {"tag": 1}}, "/image/tag"),  # a number where a string goes
        ({"fourEyes": {"enabled": "yes"}}, "/fourEyes/enabled"),
        ({"watchNamespaces": "data"}, "/watchNamespaces"),
        ({"watchNamespaces": ["*", "data"]}, "/watchNamespaces"),
        ({"watchNamespaces": ["Data_1"]}, "/watchNamespaces"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "latest"}}, "/image/digest"),
        ({"approvalRetention": "a week"}, "/approvalRetention"),
        ({"resources": {"limits": {"memory": True}}}, "/resources/limits/memory"),
        ({"defaults": {"oidc": {"audience": "pgwarden"}}}, "issuer"),  # required
        ({"defaults": {"oidc": {**OIDC, "usernameClam": "sub"}}}, "usernameClam"),
        ({"defaults": {"recording": {"sink": {"s3": {"bucket": "ab"}}}}}, "bucket"),
        ({"defaults": {"recording": {"sink": {**S3, "file": {"dir": "/x"}}}}}, "sink"),
        ({"defaults": {"recording": {"sink": {}}}}, "sink"),
        ({"defaults": {"recordings": {}}}, "recordings"),
        ({"defaults": None}, "missing property 'defaults'"),  # null drops a key in Helm
    ],
)
def test_bad_values_are_refused_naming_the_key(
    chart: helm.Chart, values: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as e:
        chart.validate_schema(values)
    assert complaint in str(e.value)
    with pytest.raises(helm.HelmError):
        chart.render(values, name=RELEASE, namespace=NS)
    assert helm.lint(CHART, values, namespace=NS)["errors"]


def test_the_schema_refuses_what_the_operator_refuses(chart: helm.Chart) -> None:
    """`defaults` of the schema is config.OperatorDefaults: both accept the same."""
    good = VALUE_SETS["defaults"]["defaults"]
    chart.validate_schema({"defaults": good})
    assert config.parse_defaults(json.dumps(good), "test").oidc is not None
    bad = {"oidc": {"issuer": "https://x", "groupsClam": "g"}}
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema({"defaults": bad})
    with pytest.raises(config.ConfigError, match=r"oidc\.groupsClam"):
        config.parse_defaults(json.dumps(bad), "test")


@pytest.mark.parametrize(
    "retention", ["7d", "12h", "30m", "45s", "90", "2.5", " 1 d ", "7 days", "d", "-1d", "7w"]
)
def test_the_schema_takes_the_retentions_the_operator_takes(
    chart: helm.Chart, retention: str
) -> None:
    try:
        approvals.parse_retention(retention)
        operator_takes = True
    except ValueError:
        operator_takes = False
    try:
        chart.validate_schema({"approvalRetention": retention})
        schema_takes = True
    except helm.HelmValuesError:
        schema_takes = False
    assert schema_takes == operator_takes


# ---------------------------------------------------------------------------------- deployment
def test_one_operator_replaced_not_rolled(chart: helm.Chart) -> None:
    deployment = find(render(chart), "Deployment")
    assert deployment["metadata"]["name"] == "pgwarden-operator"
    assert deployment["metadata"]["namespace"] == NS
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == find(render(chart), "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_the_security_context_is_hardened(chart: helm.Chart, values: str) -> None:
    objects = render(chart, VALUE_SETS[values])
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container(objects)["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["runAsUser"] != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["privileged"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    # the read-only root filesystem leaves /tmp writable through an emptyDir
    mounts = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    # the token is mounted into the operator's pod only, not into any pod using the account
    assert find(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is True


def test_image_tag_defaults_to_the_app_version(chart: helm.Chart) -> None:
    objects = render(chart)
    image = f"ghcr.io/pgwarden/pgwarden:{chart.metadata['appVersion']}"
    assert container(objects)["image"] == image
    assert container(objects)["imagePullPolicy"] == "IfNotPresent"
    assert env(objects)["PGWARDEN_IMAGE"] == image  # the proxies run the same image


def test_image_values(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["everything"])
    assert container(objects)["image"] == "registry.example/pgwarden:1.2.3"
    assert container(objects)["imagePullPolicy"] == "Always"
    assert env(objects)["PGWARDEN_IMAGE"] == "registry.example/pgwarden:1.2.4"
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert container(objects)["resources"]["limits"] == {"memory": "1Gi"}
    assert find(objects, "Deployment")["metadata"]["name"] == "gate-operator"
    digest = "sha256:" + "ab" * 32
    pinned = render(chart, {"image": {"digest": digest}, "proxyImage": {"repository": "p"}})
    assert container(pinned)["image"] == f"ghcr.io/pgwarden/pgwarden@{digest}"
    assert env(pinned)["PGWARDEN_IMAGE"] == f"p:{chart.metadata['appVersion']}"


def test_env_and_liveness_probe(chart: helm.Chart) -> None:
    objects = render(chart)
    variables = env(objects)
    assert variables["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert variables["PGWARDEN_APPROVAL_RETENTION"] == "7d"
    c = container(objects)
    (port,) = c["ports"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    liveness = [a for a in c["args"] if a.startswith("--liveness=")]
    assert liveness == [f"--liveness=http://0.0.0.0:{port['containerPort']}/healthz"]


@pytest.mark.parametrize(
    ("values", "scope"),
    [
        ("default", {"namespace": [NS], "all_namespaces": False}),
        ("namespaces", {"namespace": ["analytics", "data"], "all_namespaces": False}),
        ("cluster-wide", {"namespace": None, "all_namespaces": True}),
    ],
)
def test_the_operator_command_line(chart: helm.Chart, values: str, scope: dict[str, Any]) -> None:
    """The image's entrypoint is `pgwarden`; the args parse with its own parser."""
    args = container(render(chart, VALUE_SETS[values]))["args"]
    assert args[0] == "operator"
    parsed = build_parser().parse_args(args)
    assert {"namespace": parsed.namespace, "all_namespaces": parsed.all_namespaces} == scope
    assert parsed.liveness == "http://0.0.0.0:8080/healthz"


# ---------------------------------------------------------------------------------- defaults
def defaults_of(objects: list[dict[str, Any]]) -> config.OperatorDefaults:
    """What the operator reads: the ConfigMap's file, at PGWARDEN_DEFAULTS_FILE in the pod."""
    path = Path(env(objects)[config.DEFAULTS_FILE_ENV])
    mount = {m["mountPath"]: m["name"] for m in container(objects)["volumeMounts"]}[
        str(path.parent)
    ]
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount]
    cm = find(objects, "ConfigMap", volume["configMap"]["name"])
    return config.parse_defaults(cm["data"][path.name], "chart")


def test_no_defaults_by_default(chart: helm.Chart) -> None:
    assert defaults_of(render(chart)) == config.OperatorDefaults()


def test_defaults_reach_the_operator(chart: helm.Chart) -> None:
    got = defaults_of(render(chart, VALUE_SETS["defaults"]))
    assert got == config.OperatorDefaults.model_validate({"oidc": OIDC, "recording": {"sink": S3}})
    sink = defaults_of(render(chart, VALUE_SETS["file-sink"])).recording.sink
    assert sink is not None
    assert sink.file is not None
    assert str(sink.file.dir) == "/recordings"


def test_new_defaults_roll_the_operator(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        meta = find(render(chart, values), "Deployment")["spec"]["template"]["metadata"]
        return str(meta["annotations"]["checksum/defaults"])

    assert checksum({}) != checksum(VALUE_SETS["defaults"])
    assert checksum({}) == checksum({"fourEyes": {"enabled": False}})


# ---------------------------------------------------------------------------------- RBAC
def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def subject(objects: list[dict[str, Any]]) -> list[dict[str, str]]:
    sa = find(objects, "ServiceAccount")["metadata"]
    return [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]


def test_cluster_wide_rbac_is_rbacs_cluster_role(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["cluster-wide"])
    role = find(objects, "ClusterRole", rbac.OPERATOR_CLUSTER_ROLE)
    assert role["rules"] == rbac.operator_cluster_role()["rules"]
    binding = find(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": rbac.RBAC_GROUP,
        "kind": "ClusterRole",
        "name": rbac.OPERATOR_CLUSTER_ROLE,
    }
    assert binding["subjects"] == subject(objects)
    assert of_kind(objects, "Role") == of_kind(objects, "RoleBinding") == []


@pytest.mark.parametrize(
    ("values", "namespaces"), [("default", [NS]), ("namespaces", ["analytics", "data"])]
)
def test_namespaced_rbac_is_a_role_per_watched_namespace(
    chart: helm.Chart, values: str, namespaces: list[str]
) -> None:
    objects = render(chart, VALUE_SETS[values])
    roles = of_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
    for role in roles:
        assert role["rules"] == rbac.operator_rules()
        # the proxy Role the operator creates there grants nothing the operator lacks there
        proxy_role = rbac.proxy_role("orders", role["metadata"]["namespace"], "uid")
        assert grants(proxy_role["rules"]) <= grants(role["rules"])
    bindings = of_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == namespaces
    for binding in bindings:
        ref = binding["roleRef"]
        assert ref == {
            "apiGroup": rbac.RBAC_GROUP,
            "kind": "Role",
            "name": roles[0]["metadata"]["name"],
        }
        assert binding["subjects"] == subject(objects)
    # cluster-wide, only kopf's reads of CRDs and namespaces
    operator_cluster_roles = [
        r for r in of_kind(objects, "ClusterRole") if r["metadata"]["name"] != "pgwarden-approver"
    ]
    (cluster_role,) = operator_cluster_roles
    assert cluster_role["rules"] == rbac.operator_cluster_scoped_rules()
    assert {v for _, _, v in grants(cluster_role["rules"])} == {"list", "watch"}
    binding = find(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == cluster_role["metadata"]["name"]
    assert binding["subjects"] == subject(objects)


def test_no_rule_names_secrets_or_wildcards(chart: helm.Chart) -> None:
    for values in VALUE_SETS.values():
        for obj in render(chart, values):
            for group, resource, verb in grants(obj.get("rules") or []):
                assert "*" not in (group, resource, verb)
                assert resource != "secrets"


@pytest.mark.parametrize("enabled", [True, False])
def test_four_eyes_toggle(chart: helm.Chart, enabled: bool) -> None:
    objects = render(chart, {"fourEyes": {"enabled": enabled}})
    kinds = {o["kind"] for o in objects}
    admission_kinds = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
    assert (admission_kinds <= kinds) is enabled
    assert (admission_kinds & kinds == set()) is (not enabled)
    # approvers need their ClusterRole either way
    assert find(objects, "ClusterRole", rbac.APPROVER_CLUSTER_ROLE) == rbac.approver_cluster_role()


# ---------------------------------------------------------------------------------- labels
def test_release_objects_carry_the_standard_labels(chart: helm.Chart) -> None:
    objects = render(chart, VALUE_SETS["namespaces"])
    generated = {rbac.APPROVER_CLUSTER_ROLE, admission.FOUR_EYES_POLICY}  # fixed, cluster-wide
    for obj in objects:
        if obj["metadata"]["name"] in generated:
            continue
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "pgwarden"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/part-of"] == "pgwarden"
        assert labels["app.kubernetes.io/version"] == chart.metadata["appVersion"]
    deployment = find(objects, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert "app.kubernetes.io/version" not in selector  # a selector cannot change on upgrade


def test_notes_say_what_is_watched(chart: helm.Chart) -> None:
    notes = chart.render(VALUE_SETS["namespaces"], name=RELEASE, namespace=NS)
    text = notes["pgwarden/templates/NOTES.txt"]
    assert "watching analytics, data." in text
    assert "spec.auth.oidc" in text  # no default issuer
    everywhere = chart.render(VALUE_SETS["cluster-wide"], name=RELEASE, namespace=NS)
    assert "watching every namespace" in everywhere["pgwarden/templates/NOTES.txt"]
