"""The proxy configuration (the *bundle*): the local config file and the operator's ConfigMap.

The schema is a contract (see ARCHITECTURE.md). Fields the contract does not name (`limits`,
`logging`, `masking`, `approvals.holdTimeout`) are additions with safe defaults.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from pgwarden.api.policy import AccessPolicySpec, Duration, Model


class TlsFiles(Model):
    cert_file: Path = Field(alias="certFile")
    key_file: Path = Field(alias="keyFile")


class Listen(Model):
    host: str = "0.0.0.0"
    port: int = Field(default=5432, ge=0, le=65535)
    tls: TlsFiles | None = None
    insecure_plaintext: bool = Field(default=False, alias="insecurePlaintext")


class SslMode(StrEnum):
    DISABLE = "disable"
    REQUIRE = "require"
    VERIFY_CA = "verify-ca"
    VERIFY_FULL = "verify-full"


class Upstream(Model):
    host: str
    port: int = Field(default=5432, ge=1, le=65535)
    database: str
    username: str | None = Field(default=None, min_length=1)
    # from a file, like the password: in Kubernetes both come from the credentials Secret
    username_file: Path | None = Field(default=None, alias="usernameFile")
    password_file: Path | None = Field(default=None, alias="passwordFile")
    password: str | None = Field(default=None, repr=False)  # tests only; prefer passwordFile
    sslmode: SslMode = SslMode.VERIFY_FULL
    ca_file: Path | None = Field(default=None, alias="caFile")
    connect_timeout: Duration = Field(default=timedelta(seconds=10), alias="connectTimeout")

    @model_validator(mode="after")
    def _one_password_source(self) -> Upstream:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give either password or passwordFile, not both")
        if (self.username is None) == (self.username_file is None):
            raise ValueError("give exactly one of username or usernameFile")
        if self.sslmode in (SslMode.VERIFY_CA, SslMode.VERIFY_FULL) and self.ca_file is None:
            raise ValueError(f"sslmode {self.sslmode.value} needs caFile to verify the server")
        return self

    def read_username(self) -> str:
        if self.username_file is not None:
            return self.username_file.read_text().strip()
        assert self.username is not None
        return self.username

    def read_password(self) -> str | None:
        """The credential, read when needed (a rotated Secret is picked up on the next login)."""
        if self.password_file is not None:
            return self.password_file.read_text().rstrip("\r\n")
        return self.password


class Oidc(Model):
    issuer: str
    audience: str = "pgwarden"
    jwks_uri: str | None = Field(default=None, alias="jwksUri")
    username_claim: str = Field(default="email", alias="usernameClaim")
    groups_claim: str = Field(default="groups", alias="groupsClaim")
    ca_file: Path | None = Field(
        default=None,
        alias="caFile",
        description="CA bundle (PEM) that the issuer's TLS certificate must chain to, instead "
        "of the system's; in a DatabaseConnection a path inside the proxy pod, e.g. "
        "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt for the cluster's own issuer",
    )
    service_accounts: bool = Field(
        default=False,
        alias="serviceAccounts",
        description="tokens of Kubernetes service accounts: identity "
        "system:serviceaccount:NS:NAME, groups system:serviceaccounts and "
        "system:serviceaccounts:NS",
    )


class Auth(Model):
    oidc: Oidc


class NamedPolicy(Model):
    name: str = Field(min_length=1)
    spec: AccessPolicySpec


class ObjectLock(Model):
    """S3 Object Lock retention put on every recording object (the bucket must have Object Lock
    enabled): in COMPLIANCE mode nobody, the bucket owner included, can delete or overwrite
    a recording before `retainDays` have passed."""

    mode: Literal["GOVERNANCE", "COMPLIANCE"] = "COMPLIANCE"
    retain_days: int = Field(ge=1, alias="retainDays")


class ServerSideEncryption(Model):
    algorithm: Literal["AES256", "aws:kms", "aws:kms:dsse"] = "AES256"
    kms_key_id: str | None = Field(default=None, alias="kmsKeyId")

    @model_validator(mode="after")
    def _kms_key_only_for_kms(self) -> ServerSideEncryption:
        if self.kms_key_id is not None and not self.algorithm.startswith("aws:kms"):
            raise ValueError("kmsKeyId needs algorithm aws:kms or aws:kms:dsse")
        return self


class S3Sink(Model):
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = "pgwarden/"
    region: str | None = None
    # credentials come from the usual AWS sources (environment, profile, IRSA, instance role);
    # AWS_ENDPOINT_URL works too when endpointUrl is not set
    endpoint_url: str | None = Field(default=None, alias="endpointUrl")
    object_lock: ObjectLock | None = Field(default=None, alias="objectLock")
    sse: ServerSideEncryption | None = None


class FileSink(Model):
    dir: Path


class Sink(Model):
    s3: S3Sink | None = None
    file: FileSink | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Sink:
        if (self.s3 is None) == (self.file is None):
            raise ValueError("give exactly one of s3 or file")
        return self


class Recording(Model):
    spool_dir: Path = Field(default=Path("/var/lib/pgwarden/spool"), alias="spoolDir")
    sink: Sink | None = None  # none: nothing is recorded (events go to the log only)
    # unshipped spool beyond this: new statements are refused (fail closed, nothing is dropped)
    max_spool_bytes: int = Field(default=1024**3, ge=65536, alias="maxSpoolBytes")
    segment_bytes: int = Field(default=4 * 1024**2, ge=4096, alias="segmentBytes")
    ship_interval: Duration = Field(default=timedelta(seconds=5), alias="shipInterval")
    signing_key_file: Path | None = Field(default=None, alias="signingKeyFile")  # Ed25519 PEM
    # level `results`: rows and bytes of values kept per statement (a digest covers them all)
    result_rows: int = Field(default=100, ge=0, alias="resultRows")
    result_bytes: int = Field(default=65536, ge=0, alias="resultBytes")


class Approvals(Model):
    backend: Literal["kubernetes", "file"] = "kubernetes"
    namespace: str | None = None
    dir: Path | None = None
    hold_timeout: Duration = Field(default=timedelta(minutes=5), alias="holdTimeout")

    @model_validator(mode="after")
    def _backend_fields(self) -> Approvals:
        if self.backend == "file" and self.dir is None:
            raise ValueError("the file backend needs dir")
        return self


class MaskingKeys(Model):
    # The key of the `hash` strategy: the same key gives the same hashes in every session and
    # replica, so joins on hashed values still work. Without it a random key per process is used.
    hash_key_file: Path | None = Field(default=None, alias="hashKeyFile")

    def read_hash_key(self) -> bytes | None:
        if self.hash_key_file is None:
            return None
        return self.hash_key_file.read_bytes().strip()


class Metrics(Model):
    host: str = "0.0.0.0"
    port: int | None = Field(default=9187, ge=0, le=65535)  # null: no HTTP endpoint


class Limits(Model):
    max_client_connections: int = Field(default=1000, ge=1, alias="maxClientConnections")
    auth_timeout: Duration = Field(default=timedelta(seconds=30), alias="authTimeout")
    # Query, Parse, Bind and FunctionCall are held whole to inspect them; CopyData and result
    # rows stream through, so this bounds a session's memory, not the size of a result.
    max_message_bytes: int = Field(default=256 * 1024 * 1024, ge=1024, alias="maxMessageBytes")
    shutdown_grace: Duration = Field(default=timedelta(seconds=30), alias="shutdownGrace")


class Logging(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # One log line per statement; off leaves session start and end only. Unset: on, unless the
    # session recording is on: the recording keeps every statement, tamper-evident, and the log
    # would copy statement texts and parameters (personal data) into log pipelines beside it.
    statements: bool | None = None


class Peers(Model):
    """The other replicas of this proxy, so that a cancel request reaches the session it names
    whichever replica the load balancer picked (a client cancels on a new connection)."""

    dns: str | None = Field(
        default=None,
        min_length=1,
        description="a name that resolves to every replica (a headless Service), on `port`",
    )
    port: int | None = Field(
        default=None, ge=1, le=65535, description="the replicas' port (default: listen.port)"
    )
    addresses: list[str] = Field(
        default_factory=list,
        description="fixed `host:port` addresses of the replicas (instead of, or with, dns)",
    )

    @property
    def configured(self) -> bool:
        return bool(self.dns or self.addresses)

    @field_validator("addresses")
    @classmethod
    def _host_port(cls, v: list[str]) -> list[str]:
        for a in v:
            host, _, port = a.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{a!r} is not host:port")
        return v


class ProxyConfig(Model):
    connection: str = Field(min_length=1)
    listen: Listen = Field(default_factory=Listen)
    upstream: Upstream
    auth: Auth
    policies: list[NamedPolicy] = Field(default_factory=list)
    recording: Recording = Field(default_factory=Recording)
    approvals: Approvals = Field(default_factory=Approvals)
    masking: MaskingKeys = Field(default_factory=MaskingKeys)
    metrics: Metrics = Field(default_factory=Metrics)
    limits: Limits = Field(default_factory=Limits)
    logging: Logging = Field(default_factory=Logging)
    peers: Peers = Field(default_factory=Peers)

    @property
    def statement_log(self) -> bool:
        """Whether each statement gets a log line (`logging.statements`, or its default)."""
        if self.logging.statements is not None:
            return self.logging.statements
        return self.recording.sink is None

    @model_validator(mode="after")
    def _unique_policy_names(self) -> ProxyConfig:
        names = [p.name for p in self.policies]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"policy names must be unique; repeated: {', '.join(dupes)}")
        return self


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the field."""


def load_config(path: Path) -> ProxyConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror}") from e
    return parse_model(text, ProxyConfig, str(path), "config")


M = TypeVar("M", bound=BaseModel)


def parse_model(text: str, model: type[M], source: str, what: str, *, empty: bool = False) -> M:
    """`text` (YAML, and so JSON too) as a `model`; every error names `source` and, for an
    invalid value, the field. `empty`: an empty text is an empty mapping."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML (nor JSON): {e}") from e
    if raw is None and empty:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the {what} must be a mapping at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{source}: invalid {what}:\n{format_validation_error(e)}") from e


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, naming the field as a dotted path (`upstream.sslmode: ...`)."""
    lines = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against the documented schema)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)
