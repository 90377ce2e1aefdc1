"""Which API server, as whom, in which namespace: kubectl's conventions, read into a
`kopf.ConnectionInfo` for `pgwarden_operator.k8s.Api`.

kopf's own `login_with_kubeconfig` only knows the current context of `$KUBECONFIG`, resolves no
relative paths and runs no credential plugins, so this reads the kubeconfig itself:

- files: `--kubeconfig FILE`, else every file of `$KUBECONFIG` (merged: the first file that
  names a cluster, user or context wins, and the first `current-context`), else
  `~/.kube/config`, else the pod's service account (in a cluster);
- `--context NAME`, else `current-context`;
- credentials: `token`, `tokenFile`, client certificates (paths relative to the kubeconfig
  file), basic auth, a legacy `auth-provider`'s stored token, and `exec` credential plugins
  (`kubelogin`, `aws eks get-token`, `gke-gcloud-auth-plugin`, ...): the plugin's stderr and
  prompts reach the terminal, its ExecCredential answer is read from stdout;
- namespace: `-n`, else the context's, else `default`.

Not supported: `proxy-url` and `tls-server-name` (the client connects to `server` directly).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import kopf
import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

DEFAULT_NAMESPACE = "default"
KUBECONFIG_ENV = "KUBECONFIG"
EXEC_INFO_ENV = "KUBERNETES_EXEC_INFO"


class KubeconfigError(Exception):
    """No usable kubeconfig: the message says what is missing or wrong."""


class _Kube(BaseModel):
    # kubeconfigs carry fields this client does not use (extensions, preferences): ignored
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


def _list(value: Any) -> Any:
    return [] if value is None else value  # kubectl writes `users: null` for an empty list


class Cluster(_Kube):
    server: str = Field(min_length=1)
    certificate_authority: str | None = Field(default=None, alias="certificate-authority")
    certificate_authority_data: str | None = Field(default=None, alias="certificate-authority-data")
    insecure_skip_tls_verify: bool = Field(default=False, alias="insecure-skip-tls-verify")


class ExecEnvVar(_Kube):
    name: str
    value: str


class ExecConfig(_Kube):
    command: str = Field(min_length=1)
    args: Annotated[list[str], BeforeValidator(_list)] = Field(default_factory=list)
    env: Annotated[list[ExecEnvVar], BeforeValidator(_list)] = Field(default_factory=list)
    api_version: str = Field(default="client.authentication.k8s.io/v1", alias="apiVersion")
    install_hint: str | None = Field(default=None, alias="installHint")
    provide_cluster_info: bool = Field(default=False, alias="provideClusterInfo")


class AuthProvider(_Kube):
    name: str = ""
    config: dict[str, str] = Field(default_factory=dict)


class User(_Kube):
    token: str | None = None
    token_file: str | None = Field(default=None, alias="tokenFile")
    client_certificate: str | None = Field(default=None, alias="client-certificate")
    client_certificate_data: str | None = Field(default=None, alias="client-certificate-data")
    client_key: str | None = Field(default=None, alias="client-key")
    client_key_data: str | None = Field(default=None, alias="client-key-data")
    username: str | None = None
    password: str | None = None
    exec: ExecConfig | None = None
    auth_provider: AuthProvider | None = Field(default=None, alias="auth-provider")


class Context(_Kube):
    cluster: str = Field(min_length=1)
    user: str = ""
    namespace: str | None = None


class NamedCluster(_Kube):
    name: str
    cluster: Cluster


class NamedUser(_Kube):
    name: str
    user: User = Field(default_factory=User)


class NamedContext(_Kube):
    name: str
    context: Context


class KubeConfig(_Kube):
    clusters: Annotated[list[NamedCluster], BeforeValidator(_list)] = Field(default_factory=list)
    users: Annotated[list[NamedUser], BeforeValidator(_list)] = Field(default_factory=list)
    contexts: Annotated[list[NamedContext], BeforeValidator(_list)] = Field(default_factory=list)
    current_context: str | None = Field(default=None, alias="current-context")


class ExecCredentialStatus(_Kube):
    token: str | None = None
    client_certificate_data: str | None = Field(default=None, alias="clientCertificateData")
    client_key_data: str | None = Field(default=None, alias="clientKeyData")


class ExecCredential(_Kube):
    status: ExecCredentialStatus


@dataclass(frozen=True)
class Login:
    info: kopf.ConnectionInfo
    namespace: str  # the default namespace: the context's, else "default"
    source: str  # where it came from, for messages: "context NAME of FILE" or "in-cluster"


def _files(kubeconfig: str | None) -> list[Path]:
    if kubeconfig:
        path = Path(kubeconfig).expanduser()
        if not path.is_file():
            raise KubeconfigError(f"--kubeconfig {kubeconfig}: no such file")
        return [path]
    listed = os.environ.get(KUBECONFIG_ENV, "")
    if listed.strip():
        # as kubectl: files of the list that do not exist are skipped
        paths = [Path(p).expanduser() for p in listed.split(os.pathsep) if p.strip()]
        return [p for p in paths if p.is_file()]
    default = Path("~/.kube/config").expanduser()
    return [default] if default.is_file() else []


def _read(path: Path) -> KubeConfig:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return KubeConfig.model_validate(raw)
    except OSError as e:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise KubeconfigError(f"kubeconfig {path} is not YAML: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise KubeconfigError(f"kubeconfig {path}: {where}: {first['msg']}") from None


def _resolve(path: str | None, base: Path) -> str | None:
    """A path in a kubeconfig is relative to the file it is written in."""
    if not path:
        return None
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else base / p)


def load(
    kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
) -> Login:
    files = _files(kubeconfig)
    if not files:
        return _in_cluster(context, namespace)
    clusters: dict[str, tuple[Cluster, Path]] = {}
    users: dict[str, tuple[User, Path]] = {}
    contexts: dict[str, Context] = {}
    current: str | None = None
    for path in files:
        config = _read(path)
        base = path.resolve().parent
        current = current or config.current_context
        for c in config.clusters:
            clusters.setdefault(c.name, (c.cluster, base))
        for u in config.users:
            users.setdefault(u.name, (u.user, base))
        for x in config.contexts:
            contexts.setdefault(x.name, x.context)
    shown = os.pathsep.join(str(p) for p in files)
    name = context or current
    if not name:
        raise KubeconfigError(f"no current-context in {shown}; give --context")
    if name not in contexts:
        raise KubeconfigError(f"no context {name!r} in {shown}")
    ctx = contexts[name]
    if ctx.cluster not in clusters:
        raise KubeconfigError(f"context {name!r} names cluster {ctx.cluster!r}, not in {shown}")
    cluster, cluster_base = clusters[ctx.cluster]
    if ctx.user and ctx.user not in users:
        raise KubeconfigError(f"context {name!r} names user {ctx.user!r}, not in {shown}")
    user, user_base = users.get(ctx.user, (User(), cluster_base))
    info = kopf.ConnectionInfo(
        server=cluster.server,
        ca_path=_resolve(cluster.certificate_authority, cluster_base),
        ca_data=None if cluster.certificate_authority else cluster.certificate_authority_data,
        insecure=cluster.insecure_skip_tls_verify,
        default_namespace=ctx.namespace,
        **_credentials(user, user_base, cluster),
    )
    return Login(
        info=info,
        namespace=namespace or ctx.namespace or DEFAULT_NAMESPACE,
        source=f"context {name} of {shown}",
    )


def _in_cluster(context: str | None, namespace: str | None) -> Login:
    if context is not None:
        raise KubeconfigError(f"--context {context}: no kubeconfig (set KUBECONFIG)")
    info = None
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        info = kopf.login_with_service_account(settings=kopf.OperatorSettings())
    if info is None:
        raise KubeconfigError(
            "no kubeconfig: give --kubeconfig, set KUBECONFIG or create ~/.kube/config"
        )
    return Login(
        info=info,
        namespace=namespace or info.default_namespace or DEFAULT_NAMESPACE,
        source="the pod's service account",
    )


def _credentials(user: User, base: Path, cluster: Cluster) -> dict[str, Any]:
    """ConnectionInfo's credential fields; `*_data` are base64, as in a kubeconfig."""
    cert = _resolve(user.client_certificate, base)
    key = _resolve(user.client_key, base)
    found: dict[str, Any] = {
        "certificate_path": cert,
        "certificate_data": None if cert else user.client_certificate_data,
        "private_key_path": key,
        "private_key_data": None if key else user.client_key_data,
        "username": user.username,
        "password": user.password,
        "token": user.token,
    }
    if not user.token and user.token_file:
        path = Path(_resolve(user.token_file, base) or "")
        try:
            found["token"] = path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise KubeconfigError(f"cannot read tokenFile {path}: {e.strerror or e}") from None
    if not found["token"] and user.auth_provider is not None:
        config = user.auth_provider.config  # kubectl's oidc provider keeps `id-token`
        found["token"] = config.get("id-token") or config.get("access-token")
    if user.exec is not None and not found["token"]:
        status = _run_exec(user.exec, base, cluster)
        found["token"] = status.token
        if status.client_certificate_data and status.client_key_data:
            # the plugin answers PEM; ConnectionInfo's data fields are base64, as a kubeconfig's
            found.update(
                certificate_path=None,
                certificate_data=base64.b64encode(status.client_certificate_data.encode()),
                private_key_path=None,
                private_key_data=base64.b64encode(status.client_key_data.encode()),
            )
    return found


def _run_exec(config: ExecConfig, base: Path, cluster: Cluster) -> ExecCredentialStatus:
    command = config.command
    if os.sep in command and not Path(command).is_absolute():
        command = str(base / command)  # as kubectl: relative to the kubeconfig
    if shutil.which(command) is None:
        hint = f": {config.install_hint.strip()}" if config.install_hint else ""
        raise KubeconfigError(f"credential plugin {config.command!r} not found{hint}")
    spec: dict[str, Any] = {"interactive": sys.stdin.isatty()}
    if config.provide_cluster_info:
        spec["cluster"] = {
            "server": cluster.server,
            "certificate-authority-data": cluster.certificate_authority_data,
            "insecure-skip-tls-verify": cluster.insecure_skip_tls_verify,
        }
    info = {"apiVersion": config.api_version, "kind": "ExecCredential", "spec": spec}
    env = {**os.environ, **{v.name: v.value for v in config.env}, EXEC_INFO_ENV: json.dumps(info)}
    try:
        # stdin and stderr stay the terminal's: plugins prompt and log there
        done = subprocess.run([command, *config.args], env=env, stdout=subprocess.PIPE, check=False)
    except OSError as e:
        raise KubeconfigError(f"credential plugin {command}: {e.strerror or e}") from None
    if done.returncode != 0:
        raise KubeconfigError(f"credential plugin {command} failed (exit {done.returncode})")
    try:
        return ExecCredential.model_validate_json(done.stdout).status
    except ValidationError:
        raise KubeconfigError(
            f"credential plugin {command} did not answer an ExecCredential"
        ) from None
