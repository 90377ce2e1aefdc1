"""Pure builders: a DatabaseConnection (and the AccessPolicies that select it, and the operator's
defaults for what it leaves out) in, the desired Kubernetes manifests out, as plain dicts. No I/O
and no kopf here: the handlers read the cluster, call `desired(...)` and apply what it returns.

Per connection `<conn>` (all in the connection's namespace, all owned by it so that deleting the
DatabaseConnection deletes them):

- ConfigMap `<conn>-proxy`: the proxy bundle (`proxy.yaml`, the config-file schema of
  `pgwarden.api.config.ProxyConfig`) with every AccessPolicy that selects the connection;
- Deployment `<conn>-proxy`: `pgwarden proxy --config /etc/pgwarden/bundle/proxy.yaml`;
- Service `<conn>-proxy`, PodDisruptionBudget `<conn>-proxy`;
- Service `<conn>-peers` (headless): every replica's address, so that a cancel request that
  lands on another replica than its session's is passed on (the bundle's `peers.dns`);
- NetworkPolicy `<conn>-database`, only with `inCluster` and a `databaseSelector`.

The database credential never enters a manifest: the Secret named by `credentialsSecretRef`
is mounted as files (`usernameFile`, `passwordFile`), never copied into the ConfigMap and never
exposed as an environment variable. The proxy reads both files at each upstream login, so a
rotated Secret is picked up without a restart.

Rollouts and live reloads: the proxy watches its config file and applies a changed bundle
without a restart and without dropping sessions. The ConfigMap is therefore mounted as a
directory (never with `subPath`, which would freeze the file), and the Deployment's pod
template does not depend on the policies at all (`deployment()` does not even take them): a
policy change re-renders the ConfigMap and nothing else. What the proxy only reads at start
(listen socket and TLS, OIDC, recording, metrics, logging, the connection name) and what
changes the pod itself (image, resources, mounted Secrets) goes into `spec_hash()`, which the
pod template carries as the `pgwarden.io/spec-hash` annotation, so such a change rolls the pods.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from pgwarden.api.config import (
    Approvals,
    Auth,
    Limits,
    Listen,
    MaskingKeys,
    Metrics,
    NamedPolicy,
    Peers,
    ProxyConfig,
    Recording,
    SslMode,
    TlsFiles,
    Upstream,
)
from pgwarden.api.policy import AccessPolicySpec
from pgwarden.api.resources import (
    API_VERSION,
    DATABASE_CONNECTION,
    DatabaseConnectionSpec,
)
from pgwarden_operator.config import OperatorDefaults

Manifest = dict[str, Any]

# ---------------------------------------------------------------------------------- constants
SPEC_HASH_ANNOTATION = "pgwarden.io/spec-hash"
CONNECTION_LABEL = "pgwarden.io/connection"

WORKLOAD_KINDS = frozenset({"Deployment", "StatefulSet"})  # what runs the proxy pods
PROXY_UID = 10001  # the `pgwarden` user of the image (Dockerfile)
POSTGRES_PORT = 5432
METRICS_PORT = 9187

BUNDLE_DIR = Path("/etc/pgwarden/bundle")
BUNDLE_KEY = "proxy.yaml"
BUNDLE_FILE = BUNDLE_DIR / BUNDLE_KEY
DB_DIR = Path("/etc/pgwarden/db")  # credentials Secret: keys username, password
USERNAME_FILE = DB_DIR / "username"
PASSWORD_FILE = DB_DIR / "password"
DB_CA_DIR = Path("/etc/pgwarden/db-ca")  # upstream CA Secret: key ca.crt
CA_FILE = DB_CA_DIR / "ca.crt"
TLS_DIR = Path("/etc/pgwarden/tls")  # kubernetes.io/tls Secret: tls.crt, tls.key
HASH_KEY_FILE = Path("/etc/pgwarden/masking/hash.key")  # masking.hashKeySecretRef
SIGNING_KEY_FILE = Path("/etc/pgwarden/signing/signing.key")  # recording.signingKeySecretRef
S3_CREDENTIALS_FILE = Path("/etc/pgwarden/s3/credentials")  # recording.s3CredentialsSecretRef
SPOOL_DIR = Recording().spool_dir  # /var/lib/pgwarden/spool: an emptyDir, or a claim
SPOOL_VOLUME_MIB = Recording().max_spool_bytes * 3 // 2 // 2**20  # room above the bound

# Bundle fields a running proxy applies live (a subset of pgwarden_proxy.reload.LIVE_FIELDS;
# a unit test keeps them in step). `upstream` is live in the proxy too, but a new database
# host, port or name should move every session, old ones included: it stays in the hash.
LIVE_BUNDLE_FIELDS = frozenset({"policies", "approvals", "limits", "masking"})

_SafeDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# Service names are DNS-1035 labels (63 characters) and label values are at most 63 too.
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = 63 - len("-database")


class InvalidSpec(ValueError):
    """The DatabaseConnection cannot be rendered; the message names the spec field (a
    permanent error for the handler: retrying does not help until the spec changes)."""


# ---------------------------------------------------------------------------------- names
def proxy_name(conn_name: str) -> str:
    """ConfigMap, Deployment, Service, PDB and ServiceAccount of the connection's proxy."""
    return f"{conn_name}-proxy"


def peers_name(conn_name: str) -> str:
    """The headless Service of the proxy's replicas."""
    return f"{conn_name}-peers"


def network_policy_name(conn_name: str) -> str:
    return f"{conn_name}-database"


def check_name(conn_name: str) -> None:
    if len(conn_name) > _MAX_NAME or not _NAME.match(conn_name):
        raise InvalidSpec(
            f"metadata.name {conn_name!r}: a DatabaseConnection name must be a DNS-1035 label "
            f"of at most {_MAX_NAME} characters (lower-case letters, digits and '-', starting "
            "with a letter), since it names the proxy's Service and is a label value"
        )


def selector_labels(conn_name: str) -> dict[str, str]:
    """The stable subset of `labels()` that selects the proxy pods (a Deployment's selector
    cannot change, so it holds no label that might)."""
    return {
        "app.kubernetes.io/name": "pgwarden-proxy",
        "app.kubernetes.io/instance": conn_name,
        "app.kubernetes.io/component": "proxy",
    }


def labels(conn_name: str) -> dict[str, str]:
    return {
        **selector_labels(conn_name),
        "app.kubernetes.io/managed-by": "pgwarden-operator",
        "app.kubernetes.io/part-of": "pgwarden",
        CONNECTION_LABEL: conn_name,
    }


def owner_reference(kind: str, name: str, uid: str) -> Manifest:
    """The owning pgwarden.io resource: the garbage collector deletes what it owns with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def owned_metadata(name: str, namespace: str, conn_name: str, uid: str) -> Manifest:
    """Name, labels and the owner reference of an object a DatabaseConnection owns."""
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels(conn_name),
        "ownerReferences": [owner_reference(DATABASE_CONNECTION.kind, conn_name, uid)],
    }


# ---------------------------------------------------------------------------------- defaults
def effective_auth(spec: DatabaseConnectionSpec, defaults: OperatorDefaults | None) -> Auth:
    """spec.auth, else the operator's default issuer; neither: InvalidSpec."""
    if spec.auth is not None:
        return spec.auth
    if defaults is not None and defaults.oidc is not None:
        return Auth(oidc=defaults.oidc)
    raise InvalidSpec(
        "spec.auth: no OIDC issuer for this connection: set spec.auth.oidc, or give the "
        "operator a default issuer (the Helm chart's defaults.oidc)"
    )


def with_defaults(
    spec: DatabaseConnectionSpec, defaults: OperatorDefaults | None
) -> DatabaseConnectionSpec:
    """`spec` with what it leaves out (auth, recording.sink) taken from the operator's
    defaults, each as a whole (config.py says why). Idempotent. Raises InvalidSpec."""
    sink = spec.recording.sink
    if sink is None and defaults is not None:
        sink = defaults.recording.sink
    return spec.model_copy(
        update={
            "auth": effective_auth(spec, defaults),
            "recording": spec.recording.model_copy(update={"sink": sink}),
        }
    )


# ---------------------------------------------------------------------------------- bundle
def bundle(
    conn: DatabaseConnectionSpec,
    name: str,
    namespace: str,
    policies: list[tuple[str, AccessPolicySpec]],
    *,
    defaults: OperatorDefaults | None = None,
) -> ProxyConfig:
    """The proxy's config file for connection `name`, with the policies (name, spec) among
    `policies` that select it, sorted by name so that the rendering does not depend on the
    order the cluster listed them in; `defaults` fill what the spec leaves out. Raises
    InvalidSpec for a spec that cannot work."""
    conn = with_defaults(conn, defaults)
    tls = conn.tls
    if tls.sslmode in (SslMode.VERIFY_CA, SslMode.VERIFY_FULL) and tls.ca_secret_ref is None:
        raise InvalidSpec(
            f"spec.tls.sslmode {tls.sslmode.value} verifies the database's certificate and "
            "needs spec.tls.caSecretRef (a Secret with key ca.crt); or set sslmode require"
        )
    if conn.proxy.tls_secret_ref is not None:
        listen = Listen(
            host="0.0.0.0",
            port=POSTGRES_PORT,
            tls=TlsFiles(cert_file=TLS_DIR / "tls.crt", key_file=TLS_DIR / "tls.key"),
        )
    else:
        # No spec.proxy.tlsSecretRef: clients' OIDC tokens travel in clear. Only for testing
        # inside a cluster (e.g. kind); a real connection sets tlsSecretRef.
        listen = Listen(host="0.0.0.0", port=POSTGRES_PORT, insecure_plaintext=True)
    selected = sorted((n, p) for n, p in policies if p.selects(name))
    return ProxyConfig(
        connection=name,
        listen=listen,
        upstream=Upstream(
            host=conn.host,
            port=conn.port,
            database=conn.database,
            username_file=USERNAME_FILE,
            password_file=PASSWORD_FILE,
            sslmode=tls.sslmode,
            ca_file=CA_FILE if tls.ca_secret_ref is not None else None,
        ),
        auth=effective_auth(conn, None),  # with_defaults filled it in
        policies=[NamedPolicy(name=n, spec=p) for n, p in selected],
        recording=Recording(
            spool_dir=SPOOL_DIR,
            sink=conn.recording.sink,
            signing_key_file=SIGNING_KEY_FILE if conn.recording.signing_key_secret_ref else None,
        ),
        approvals=Approvals(backend="kubernetes", namespace=namespace),
        masking=MaskingKeys(
            hash_key_file=HASH_KEY_FILE if conn.masking.hash_key_secret_ref else None
        ),
        metrics=Metrics(host="0.0.0.0", port=METRICS_PORT),
        peers=Peers(dns=f"{peers_name(name)}.{namespace}.svc"),
    )


def render_bundle(config: ProxyConfig) -> str:
    """The YAML text of the ConfigMap (`load_config` reads it back to an equal ProxyConfig)."""
    head = (
        f"# Rendered by pgwarden-operator from DatabaseConnection {config.connection}: "
        "edit the DatabaseConnection and its AccessPolicies, not this file.\n"
    )
    if config.listen.insecure_plaintext:
        head += (
            "# listen.insecurePlaintext: the DatabaseConnection has no spec.proxy.tlsSecretRef; "
            "only for testing inside a cluster.\n"
        )
    # libyaml's emitter when present: a policy change renders every selected bundle, and the
    # pure-Python one was most of the operator's CPU at 200 connections (bench/operator.py)
    body = yaml.dump(
        config.model_dump(mode="json", by_alias=True),
        Dumper=_SafeDumper,
        sort_keys=False,
        allow_unicode=True,
    )
    return head + body


def spec_hash(
    conn: DatabaseConnectionSpec,
    name: str,
    namespace: str,
    image: str,
    *,
    defaults: OperatorDefaults | None = None,
) -> str:
    """A digest of what needs a new pod to take effect (the `pgwarden.io/spec-hash` annotation
    of the pod template, and `status.specHash`).

    Inputs: the bundle without its live fields (so: connection, listen with its TLS files,
    upstream host/port/database/sslmode/CA, auth, recording, metrics, logging), the image, the
    resources and the names of the mounted Secrets. Not inputs: the AccessPolicies, approvals,
    limits and masking (the proxy reloads them live from the mounted ConfigMap, keeping its
    sessions), and `replicas` (scaling adds or removes pods; restarting the others would only
    cut their sessions). It takes no policies, so no policy can change it. `defaults` as in
    `bundle`: the effective issuer and sink are inputs, so a new default rolls the pods.
    """
    config = bundle(conn, name, namespace, [], defaults=defaults)
    proxy = conn.proxy
    inputs = {
        "bundle": config.model_dump(mode="json", by_alias=True, exclude=set(LIVE_BUNDLE_FIELDS)),
        "image": image,
        "resources": proxy.resources.model_dump(mode="json", by_alias=True),
        "secrets": {volume: secret for volume, secret, *_ in mounted_secrets(conn)},
    }
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------- manifests
def config_map(conn_name: str, namespace: str, uid: str, config: ProxyConfig) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owned_metadata(proxy_name(conn_name), namespace, conn_name, uid),
        "data": {BUNDLE_KEY: render_bundle(config)},
    }


def _secret_volume(name: str, secret: str, keys: list[str], mode: int) -> Manifest:
    return {
        "name": name,
        "secret": {
            "secretName": secret,
            "items": [{"key": k, "path": k} for k in keys],
            "defaultMode": mode,
        },
    }


def mounted_secrets(spec: DatabaseConnectionSpec) -> list[tuple[str, str, list[str], int, Path]]:
    """(volume, Secret, keys, file mode, directory) of every Secret the proxy pods mount:
    private keys 0400, certificates 0444 (the pod's fsGroup makes them group-readable)."""
    refs = [
        ("db-credentials", spec.credentials_secret_ref, ["username", "password"], 0o400, DB_DIR),
        ("db-ca", spec.tls.ca_secret_ref, ["ca.crt"], 0o444, DB_CA_DIR),
        ("tls", spec.proxy.tls_secret_ref, ["tls.crt", "tls.key"], 0o400, TLS_DIR),
        ("hash-key", spec.masking.hash_key_secret_ref, ["hash.key"], 0o400, HASH_KEY_FILE.parent),
        (
            "signing-key",
            spec.recording.signing_key_secret_ref,
            ["signing.key"],
            0o400,
            SIGNING_KEY_FILE.parent,
        ),
        (
            "s3-credentials",
            spec.recording.s3_credentials_secret_ref,
            ["credentials"],
            0o400,
            S3_CREDENTIALS_FILE.parent,
        ),
    ]
    return [(v, ref.name, keys, mode, d) for v, ref, keys, mode, d in refs if ref is not None]


_QUANTITY_UNITS = {
    "": 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes (`2Gi`, `1.5G`, `500M`) as a number."""
    number = quantity.rstrip("kMGTPEi")
    return int(float(number) * _QUANTITY_UNITS[quantity[len(number) :]])


def deployment(
    conn_name: str, namespace: str, uid: str, spec: DatabaseConnectionSpec, image: str
) -> Manifest:
    """The proxy pods: a Deployment, or with spec.proxy.spoolVolume a StatefulSet whose pods
    each keep a PersistentVolumeClaim for the spool. `image` is the effective image
    (spec.proxy.image or the operator's)."""
    proxy = spec.proxy
    persistent = proxy.spool_volume
    if persistent is not None and quantity_bytes(persistent.size) < SPOOL_VOLUME_MIB * 2**20:
        raise InvalidSpec(
            f"spec.proxy.spoolVolume.size {persistent.size} is too small: the spool holds up "
            f"to {Recording().max_spool_bytes // 2**20}Mi before the proxy refuses statements; "
            f"give it at least {SPOOL_VOLUME_MIB}Mi"
        )
    pod_labels = labels(conn_name)
    # Secret files are 0400 and owned by root; fsGroup makes the kubelet give them to the
    # group 10001 with group read (0440), so the non-root proxy can read them.
    volumes: list[Manifest] = [
        {
            "name": "bundle",
            "configMap": {"name": proxy_name(conn_name), "defaultMode": 0o444},
        },
    ]
    mounts: list[Manifest] = [
        {"name": "bundle", "mountPath": str(BUNDLE_DIR), "readOnly": True},
    ]
    for volume, secret, keys, mode, directory in mounted_secrets(spec):
        volumes.append(_secret_volume(volume, secret, keys, mode))
        mounts.append({"name": volume, "mountPath": str(directory), "readOnly": True})
    # The spool holds recordings until they are shipped; beyond maxSpoolBytes the proxy refuses
    # new statements, so the emptyDir limit sits above it and never evicts the pod first.
    if persistent is None:
        volumes.append({"name": "spool", "emptyDir": {"sizeLimit": f"{SPOOL_VOLUME_MIB}Mi"}})
    volumes.append({"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}})  # read-only root fs
    mounts += [
        {"name": "spool", "mountPath": str(SPOOL_DIR)},
        {"name": "tmp", "mountPath": "/tmp"},  # noqa: S108 (a mount path, not a file)
    ]
    resources = {
        k: v for k, v in proxy.resources.model_dump(mode="json", by_alias=True).items() if v
    }
    # after SIGTERM the proxy drains sessions for limits.shutdownGrace, then seals the spool
    # and ships what S3 accepts: leave it time for both before the kubelet kills it
    grace = int(Limits().shutdown_grace.total_seconds()) + 30
    container: Manifest = {
        "name": "proxy",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["pgwarden", "proxy", "--config", str(BUNDLE_FILE)],
        "ports": [
            {"name": "postgres", "containerPort": POSTGRES_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "initialDelaySeconds": 5,
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "resources": resources,
        # a path, not a credential: boto3 reads the mounted file
        **(
            {"env": [{"name": "AWS_SHARED_CREDENTIALS_FILE", "value": str(S3_CREDENTIALS_FILE)}]}
            if spec.recording.s3_credentials_secret_ref is not None
            else {}
        ),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }
    revision_label = "pod-template-hash" if persistent is None else "controller-revision-hash"
    pod_template = {
        "metadata": {
            "labels": pod_labels,
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(spec, conn_name, namespace, image)},
        },
        "spec": {
            "serviceAccountName": proxy_name(conn_name),
            # the proxy creates and watches ApprovalRequests through the API
            "automountServiceAccountToken": True,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": grace,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": PROXY_UID,
                "runAsGroup": PROXY_UID,
                "fsGroup": PROXY_UID,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": volumes,
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                    "labelSelector": {"matchLabels": selector_labels(conn_name)},
                    # spread each revision's pods, not old and new together
                    "matchLabelKeys": [revision_label],
                }
            ],
        },
    }
    meta = owned_metadata(proxy_name(conn_name), namespace, conn_name, uid)
    selector = {"matchLabels": selector_labels(conn_name)}
    if persistent is None:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": proxy.replicas,
                "selector": selector,
                # a new pod is ready before an old one drains: capacity holds during a rollout
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "template": pod_template,
            },
        }
    claim: Manifest = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": persistent.size}},
    }
    if persistent.storage_class_name:
        claim["storageClassName"] = persistent.storage_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta,
        "spec": {
            "replicas": proxy.replicas,
            "selector": selector,
            "serviceName": peers_name(conn_name),
            # replicas are alike: start and stop them together, not one after the other
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            "template": pod_template,
            "volumeClaimTemplates": [
                {"metadata": {"name": "spool", "labels": labels(conn_name)}, "spec": claim}
            ],
            # a claim outlives its pod, and its replica: a scaled-down or deleted proxy may
            # leave segments that S3 has not confirmed (docs/operator.md)
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Retain",
                "whenScaled": "Retain",
            },
        },
    }


def service(conn_name: str, namespace: str, uid: str, spec: DatabaseConnectionSpec) -> Manifest:
    svc = spec.proxy.service
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(proxy_name(conn_name), namespace, conn_name, uid),
        "spec": {
            "type": svc.type,
            "selector": selector_labels(conn_name),
            "ports": [
                {"name": "postgres", "port": svc.port, "targetPort": "postgres", "protocol": "TCP"}
            ],
        },
    }


def peers_service(conn_name: str, namespace: str, uid: str) -> Manifest:
    """Headless: its name resolves to every proxy pod, ready or not (a draining replica still
    holds sessions that a cancel request may name)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owned_metadata(peers_name(conn_name), namespace, conn_name, uid),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(conn_name),
            "ports": [
                {
                    "name": "postgres",
                    "port": POSTGRES_PORT,
                    "targetPort": "postgres",
                    "protocol": "TCP",
                }
            ],
        },
    }


def pod_disruption_budget(
    conn_name: str, namespace: str, uid: str, spec: DatabaseConnectionSpec
) -> Manifest:
    """Several replicas: keep one serving through a drain. One (or none): a node drain may
    take it (minAvailable 1 would block the drain for good)."""
    budget: Manifest = {"minAvailable": 1} if spec.proxy.replicas > 1 else {"maxUnavailable": 1}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": owned_metadata(proxy_name(conn_name), namespace, conn_name, uid),
        "spec": {**budget, "selector": {"matchLabels": selector_labels(conn_name)}},
    }


def network_policy(
    conn_name: str, namespace: str, uid: str, spec: DatabaseConnectionSpec
) -> Manifest | None:
    """With `inCluster` and a `databaseSelector`: the database pods (in the connection's
    namespace) accept ingress only from this connection's proxy pods, on spec.port.

    NetworkPolicies add up: this one isolates the selected pods for ingress, so whatever else
    must reach them (replicas streaming from a primary, backups, another operator's probes)
    needs a policy of its own that allows it."""
    if not spec.in_cluster or not spec.database_selector:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": owned_metadata(network_policy_name(conn_name), namespace, conn_name, uid),
        "spec": {
            "podSelector": {"matchLabels": dict(spec.database_selector)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": selector_labels(conn_name)}}],
                    "ports": [{"protocol": "TCP", "port": spec.port}],
                }
            ],
        },
    }


def desired(
    conn_name: str,
    namespace: str,
    uid: str,
    spec: DatabaseConnectionSpec,
    policies: list[tuple[str, AccessPolicySpec]],
    image: str,
    *,
    defaults: OperatorDefaults | None = None,
) -> list[Manifest]:
    """Every object the connection should have; `image` is the operator's own image, used
    when spec.proxy.image is not set; `defaults` (the operator's) fill what the spec leaves
    out. Raises InvalidSpec (see `bundle`, `check_name`, `effective_auth`)."""
    check_name(conn_name)
    spec = with_defaults(spec, defaults)
    effective_image = spec.proxy.image or image
    objects = [
        config_map(conn_name, namespace, uid, bundle(spec, conn_name, namespace, policies)),
        deployment(conn_name, namespace, uid, spec, effective_image),
        service(conn_name, namespace, uid, spec),
        peers_service(conn_name, namespace, uid),
        pod_disruption_budget(conn_name, namespace, uid, spec),
    ]
    netpol = network_policy(conn_name, namespace, uid, spec)
    if netpol is not None:
        objects.append(netpol)
    return objects
