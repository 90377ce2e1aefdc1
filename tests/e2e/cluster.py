"""The kind cluster of the end-to-end suite: image, cluster, chart, test services, port-forwards,
tokens and psql. Everything goes through the real command-line tools (docker, kind, kubectl,
helm, psql), with a kubeconfig of the suite's own so the user's contexts stay untouched.

Environment:
- PGWARDEN_E2E_KEEP=1         keep the cluster after the run (delete: `kind delete cluster
                              --name pgwarden-e2e`)
- PGWARDEN_E2E_NODE_IMAGE     a kindest/node image (Kubernetes >= 1.30); default: kind's own
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = Path(__file__).resolve().parent / "manifests"
CLUSTER = "pgwarden-e2e"
NAMESPACE = "pgwarden-e2e"  # the operator's and the test objects' namespace
IMAGE_REPOSITORY, IMAGE_TAG = "pgwarden", "e2e"
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
CONNECTION = "orders"
PROXY = f"{CONNECTION}-proxy"  # the operator's Deployment and Service
BUCKET, PREFIX = "audit", "pgwarden/"  # the DatabaseConnection's recording sink
STORE = f"s3://{BUCKET}/{PREFIX}"
MINIMUM_KUBERNETES = (1, 30)  # ValidatingAdmissionPolicy (four eyes) is GA

T = TypeVar("T")


class E2EError(AssertionError):
    """A step of the suite failed; the message has the command's output."""


def run(
    args: list[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and out.returncode != 0:
        raise E2EError(f"{' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
    return out


def eventually(what: str, probe: Callable[[], T | None], timeout: float = 120) -> T:
    """Poll `probe` until it returns something other than None/False."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise E2EError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(2)


@functools.cache
def minio_credentials() -> dict[str, str]:
    docs = yaml.safe_load_all((MANIFESTS / "minio.yaml").read_text())
    secret = next(d for d in docs if d["kind"] == "Secret")
    return dict(secret["stringData"])


@dataclass
class Cluster:
    kubeconfig: Path
    ports: dict[str, int] = field(default_factory=dict)  # service -> local port
    _forwards: list[subprocess.Popen[str]] = field(default_factory=list)

    # ------------------------------------------------------------------------------ tools
    @property
    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    def kubectl(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        return run(
            ["kubectl", "--namespace", NAMESPACE, *args], env=self.env, timeout=timeout, check=check
        ).stdout

    def get(self, kind: str, name: str | None = None) -> Any:
        return json.loads(self.kubectl("get", kind, *([name] if name else []), "-o", "json"))

    # ------------------------------------------------------------------------------ setup
    @classmethod
    @contextlib.contextmanager
    def up(cls, workdir: Path) -> Iterator[Cluster]:
        """Build the image, create the cluster, install everything; delete it all afterwards."""
        cluster = cls(kubeconfig=workdir / "kubeconfig")
        run(
            ["docker", "build", "--tag", IMAGE, "--build-arg", "REVISION=e2e", str(ROOT)],
            timeout=1800,
        )
        if CLUSTER in run(["kind", "get", "clusters"]).stdout.split():
            raise E2EError(
                f"a kind cluster {CLUSTER} exists already (a PGWARDEN_E2E_KEEP run?): "
                f"kind delete cluster --name {CLUSTER}"
            )
        create = ["kind", "create", "cluster", "--name", CLUSTER, "--wait", "180s"]
        if node_image := os.environ.get("PGWARDEN_E2E_NODE_IMAGE"):
            create += ["--image", node_image]
        run([*create, "--kubeconfig", str(cluster.kubeconfig)], timeout=600)
        try:
            cluster.check_version()
            run(["kind", "load", "docker-image", IMAGE, "--name", CLUSTER], timeout=600)
            cluster.kubectl("create", "namespace", NAMESPACE)
            cluster.install_chart()
            cluster.install_test_services()
            cluster.install_connection()
            yield cluster
        finally:
            cluster.stop_forwards()
            if os.environ.get("PGWARDEN_E2E_KEEP") != "1":
                delete = ["kind", "delete", "cluster", "--name", CLUSTER]
                run([*delete, "--kubeconfig", str(cluster.kubeconfig)], timeout=300, check=False)

    def check_version(self) -> None:
        version = json.loads(self.kubectl("version", "-o", "json"))["serverVersion"]
        found = (int(version["major"]), int(re.sub(r"\D.*", "", version["minor"])))
        if found < MINIMUM_KUBERNETES:
            raise E2EError(f"Kubernetes {found} is too old: set PGWARDEN_E2E_NODE_IMAGE (>= 1.30)")

    def install_chart(self) -> None:
        """The operator from charts/pgwarden, running the image built above. The one place that
        knows the chart's values: adjust here when they change."""
        run(
            [
                "helm", "upgrade", "--install", "pgwarden", str(ROOT / "charts" / "pgwarden"),
                "--namespace", NAMESPACE,
                "--set", f"image.repository={IMAGE_REPOSITORY}",
                "--set", f"image.tag={IMAGE_TAG}",
                "--set", "image.pullPolicy=Never",  # loaded into the nodes by kind
                "--wait", "--timeout", "5m",
            ],
            env=self.env,
            timeout=420,
        )  # fmt: skip
        # a chart that does not ship the CRDs leaves them to us (crds/ is generated from the
        # models, like the chart's copy)
        if self.kubectl("get", "crd", "databaseconnections.pgwarden.io", check=False) == "":
            self.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        self.kubectl(
            "wait", "--for", "condition=Established", "--timeout", "60s",
            "crd/databaseconnections.pgwarden.io", "crd/accesspolicies.pgwarden.io",
            "crd/approvalrequests.pgwarden.io",
        )  # fmt: skip

    def install_test_services(self) -> None:
        """PostgreSQL with sample data, MinIO (bucket `audit`), the issuer's discovery binding
        and the agents' service accounts."""
        for name in ("postgres.yaml", "minio.yaml", "issuer.yaml"):
            self.kubectl("apply", "-f", str(MANIFESTS / name))
        self.kubectl("rollout", "status", "statefulset/orders-db", "--timeout", "300s")
        self.kubectl("rollout", "status", "deployment/minio", "--timeout", "300s")
        self.forward("minio", 9000)
        self.s3_client().create_bucket(Bucket=BUCKET)

    def install_connection(self) -> None:
        """The DatabaseConnection (MinIO credentials and the cluster CA included: see
        README.md) and the policies; then wait for the proxy."""
        self.kubectl("apply", "-f", str(MANIFESTS / "pgwarden.yaml"))
        self.kubectl(
            "wait", f"databaseconnection/{CONNECTION}", "--for", "condition=Ready",
            "--timeout", "180s",
        )  # fmt: skip
        self.kubectl("rollout", "status", f"deployment/{PROXY}", "--timeout", "300s")
        self.forward(PROXY, 5432)

    # ------------------------------------------------------------------------------ access
    def forward(self, service: str, port: int) -> int:
        """`kubectl port-forward` to a Service on a free local port (printed by kubectl)."""
        process = subprocess.Popen(
            ["kubectl", "--namespace", NAMESPACE, "port-forward", f"svc/{service}", f":{port}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **self.env},
        )
        self._forwards.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()  # Forwarding from 127.0.0.1:PORT -> port
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        if m is None:
            raise E2EError(f"port-forward to {service}: {line}")
        self.ports[service] = int(m.group(1))
        return self.ports[service]

    def stop_forwards(self) -> None:
        for process in self._forwards:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        self._forwards.clear()

    def token(self, account: str) -> str:
        """A service-account token for the proxy's audience (what a pod's projected volume has)."""
        return self.kubectl(
            "create", "token", account, "--audience", "pgwarden", "--duration", "1h"
        ).strip()

    def psql_command(self, account: str, sql: str) -> tuple[list[str], dict[str, str]]:
        """A psql run through the proxy as `account`; VERBOSITY verbose shows SQLSTATEs."""
        dsn = (
            f"host=127.0.0.1 port={self.ports[PROXY]} dbname=orders user={account} sslmode=disable"
        )
        args = ["psql", dsn, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"]
        env = {**os.environ, "PGPASSWORD": self.token(account), "PGCONNECT_TIMEOUT": "20"}
        return [*args, "-c", sql], env

    def psql(self, account: str, sql: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        args, env = self.psql_command(account, sql)
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)

    def whoami(self) -> str:
        """The Kubernetes user kubectl acts as (four eyes: decidedBy must be this user)."""
        return self.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")

    # ------------------------------------------------------------------------------ storage
    @property
    def s3_env(self) -> dict[str, str]:
        """The AWS environment that reaches MinIO through the port-forward (the credentials
        of minio.yaml's Secret, which the proxy gets too)."""
        return {
            **minio_credentials(),
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.ports['minio']}",
        }

    def s3_client(self) -> Any:
        import boto3

        env = self.s3_env
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )

    def sessions(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`pgwarden sessions ARGS --store s3://audit/pgwarden/` against MinIO."""
        return run(
            [sys.executable, "-m", "pgwarden.cli", "sessions", *args, "--store", STORE],
            env={**self.s3_env, "PYTHONPATH": str(ROOT)},
            check=False,
            timeout=120,
        )
