"""The custom resources (group pgwarden.io, version v1alpha1): the operator's contract.

`AccessPolicySpec` (policy.py) and `ApprovalRequestSpec`/`ApprovalRequestStatus` (approvals.py)
are shared with the proxy; `DatabaseConnectionSpec` describes one database and the proxy next to
it. The CRD YAML in crds/ is generated from these models (`pgwarden crds`), so a field's
description here is what `kubectl explain` shows.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import Field

from pgwarden.api.approvals import ApprovalRequestSpec, ApprovalRequestStatus, UtcDateTime
from pgwarden.api.config import Auth, SslMode
from pgwarden.api.config import Sink as RecordingSink
from pgwarden.api.policy import AccessPolicySpec, Model

GROUP = "pgwarden.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


# ---------------------------------------------------------------------------------- status
class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """A condition as the Kubernetes API conventions define it."""

    type: str = Field(min_length=1, max_length=316, description="e.g. Ready, Valid")
    status: ConditionStatus
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase, for machines",
    )
    message: str = Field(default="", max_length=32768, description="for people")
    observed_generation: int | None = Field(default=None, ge=0, alias="observedGeneration")
    last_transition_time: UtcDateTime = Field(alias="lastTransitionTime")


class ResourceStatus(Model):
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(default=None, ge=0, alias="observedGeneration")


# ---------------------------------------------------------------------------------- references
class SecretRef(Model):
    name: str = Field(min_length=1, max_length=253, description="a Secret in the same namespace")


class CredentialsSecretRef(SecretRef):
    """The database login of the proxy: keys `username` and `password` of the Secret (mounted
    as files, never in the ConfigMap or in an environment variable)."""


# ---------------------------------------------------------------------------------- connection
class UpstreamTls(Model):
    sslmode: SslMode = SslMode.VERIFY_FULL
    ca_secret_ref: SecretRef | None = Field(
        default=None, alias="caSecretRef", description="Secret with key ca.crt"
    )


class ServiceSpec(Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=5432, ge=1, le=65535)


class ResourceRequirements(Model):
    requests: dict[str, str] = Field(default_factory=dict)
    limits: dict[str, str] = Field(default_factory=dict)


class SpoolVolume(Model):
    """A PersistentVolumeClaim per replica for the recording spool; the proxies then run as a
    StatefulSet, so what is not shipped yet outlives its pod (a rollout, an eviction or a node
    drain while S3 is unreachable). Without it the spool is an emptyDir, which lives as long as
    the pod (container restarts keep it)."""

    size: str = Field(
        default="2Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$",
        description="the claim's size; at least 1.5 times the spool's bound (1 GiB)",
    )
    storage_class_name: str | None = Field(default=None, alias="storageClassName")


class ProxySpec(Model):
    replicas: int = Field(default=2, ge=0, le=100)
    resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"}
        )
    )
    tls_secret_ref: SecretRef | None = Field(
        default=None,
        alias="tlsSecretRef",
        description="kubernetes.io/tls Secret for client-facing TLS (tls.crt, tls.key)",
    )
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    image: str | None = Field(default=None, description="default: the operator's own image")
    spool_volume: SpoolVolume | None = Field(
        default=None,
        alias="spoolVolume",
        description="keep the recording spool on a PersistentVolumeClaim per replica "
        "(a StatefulSet instead of a Deployment)",
    )


class ConnectionRecording(Model):
    """Where the proxies of this connection ship recordings (levels are set by AccessPolicy)."""

    sink: RecordingSink | None = Field(
        default=None,
        description="default: the operator's defaults.recording.sink (Helm value); neither: "
        "sessions are only logged",
    )
    signing_key_secret_ref: SecretRef | None = Field(
        default=None,
        alias="signingKeySecretRef",
        description="Secret with key signing.key: an Ed25519 private key (PEM) that signs every "
        "session manifest, so that bucket write access cannot rewrite history unnoticed",
    )
    s3_credentials_secret_ref: SecretRef | None = Field(
        default=None,
        alias="s3CredentialsSecretRef",
        description="Secret with key credentials: an AWS shared credentials file for the S3 "
        "sink; without it the usual sources apply (IRSA or workload identity through the "
        "proxy's ServiceAccount, an instance role)",
    )


class ConnectionMasking(Model):
    hash_key_secret_ref: SecretRef | None = Field(
        default=None,
        alias="hashKeySecretRef",
        description="Secret with key hash.key: the key of the `hash` masking strategy, shared "
        "by every replica so that equal values hash alike in every session (without it each "
        "proxy process draws its own)",
    )


class DatabaseConnectionSpec(Model):
    host: str = Field(min_length=1, description="the database's host name")
    port: int = Field(default=5432, ge=1, le=65535)
    database: str = Field(min_length=1)
    credentials_secret_ref: CredentialsSecretRef = Field(alias="credentialsSecretRef")
    tls: UpstreamTls = Field(default_factory=UpstreamTls)
    proxy: ProxySpec = Field(default_factory=ProxySpec)
    auth: Auth | None = Field(
        default=None,
        description="how clients log in; default: the operator's defaults.oidc (Helm value), "
        "replaced as a whole when given",
    )
    recording: ConnectionRecording = Field(default_factory=ConnectionRecording)
    masking: ConnectionMasking = Field(default_factory=ConnectionMasking)
    in_cluster: bool = Field(
        default=False,
        alias="inCluster",
        description="the database runs in this cluster: a NetworkPolicy lets only the proxy "
        "pods reach it (needs databaseSelector)",
    )
    database_selector: dict[str, str] = Field(
        default_factory=dict,
        alias="databaseSelector",
        description="labels of the database pods (with inCluster)",
    )


class DatabaseConnectionStatus(ResourceStatus):
    endpoint: str | None = Field(default=None, description="host:port clients connect to")
    policies: list[str] = Field(default_factory=list, description="AccessPolicies selecting it")
    ready_replicas: int = Field(default=0, ge=0, alias="readyReplicas")
    spec_hash: str | None = Field(default=None, alias="specHash")


class AccessPolicyStatus(ResourceStatus):
    connections: list[str] = Field(
        default_factory=list, description="the DatabaseConnections this policy selects"
    )


# ---------------------------------------------------------------------------------- kinds
class Kind(Model):
    """What the CRD generator needs to know of one kind."""

    kind: str
    plural: str
    singular: str
    short_names: list[str] = Field(alias="shortNames")


DATABASE_CONNECTION = Kind(
    kind="DatabaseConnection",
    plural="databaseconnections",
    singular="databaseconnection",
    short_names=["pgconn", "dbconn"],
)
ACCESS_POLICY = Kind(
    kind="AccessPolicy", plural="accesspolicies", singular="accesspolicy", short_names=["pgpol"]
)
APPROVAL_REQUEST = Kind(
    kind="ApprovalRequest",
    plural="approvalrequests",
    singular="approvalrequest",
    short_names=["pgapproval", "pgar"],
)

# kind -> (spec model, status model)
SCHEMAS: dict[str, tuple[type[Model], type[Model]]] = {
    DATABASE_CONNECTION.kind: (DatabaseConnectionSpec, DatabaseConnectionStatus),
    ACCESS_POLICY.kind: (AccessPolicySpec, AccessPolicyStatus),
    APPROVAL_REQUEST.kind: (ApprovalRequestSpec, ApprovalRequestStatus),
}
KINDS = (DATABASE_CONNECTION, ACCESS_POLICY, APPROVAL_REQUEST)
