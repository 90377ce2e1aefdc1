"""`kubectl pgwarden` against kmock, the Kubernetes API emulation of tests/kmockapi.py.

The plugin runs in-process (`main()` in a worker thread: it runs its own event loop while
kmock serves in the test's), and once as the installed console script. It finds the emulated
API through a kubeconfig written to tmp_path, as kubectl would; `ApiServer.user_info` is who
the API server says the caller is (SelfSubjectReview). Decisions are read back the way the
proxy reads them (`KubernetesApprovals.wait`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml

from pgwarden.api.approvals import ApprovalState
from pgwarden.api.resources import API_VERSION
from pgwarden.embedded.certs import make_certs
from pgwarden.kubectl import main
from pgwarden.kubectl.client import open_api
from pgwarden.kubectl.kubeconfig import load
from pgwarden.recording.store import FileStore
from pgwarden_operator.k8s import Api
from pgwarden_proxy.approvals.kubernetes import KubernetesApprovals
from tests.integration.test_operator import NS, connection
from tests.integration.test_operator_approvals import request
from tests.kmockapi import ApiServer, declare_crds
from tests.unit.test_sessions_cli import write_session

pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")

SECRET = "kubeconfig-bearer-s3cr3t"  # the kubeconfig user's token: never printed
APPROVALS = "approvalrequests"
SCRIPT = Path(sys.executable).parent / "kubectl-pgwarden"


def kubeconfig(server: str, *, namespace: str = NS, **user: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": {"server": server}}],
        "users": [{"name": "me", "user": user or {"token": SECRET}}],
        "contexts": [
            {"name": "test", "context": {"cluster": "kmock", "user": "me", "namespace": namespace}}
        ],
        "current-context": "test",
        "preferences": {},  # fields the plugin does not use are fine
    }


@dataclass
class Kube:
    server: ApiServer
    client: Api
    url: str
    config: Path

    async def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        rc = await asyncio.to_thread(main, list(argv))
        out, err = capsys.readouterr()
        return rc, out, err

    async def create(self, obj: dict[str, Any], status: dict[str, Any] | None = None) -> None:
        await self.client.create(obj)
        if status is not None:
            meta = obj["metadata"]
            plural = obj["kind"].lower() + "s"
            await self.client.patch_status(
                API_VERSION, plural, meta["namespace"], meta["name"], status
            )

    def status(self, name: str) -> dict[str, Any]:
        obj = self.server.objects[kmock.resource(f"{API_VERSION}/{APPROVALS}"), NS, name]
        return dict(obj.raw.get("status") or {})

    def patches(self) -> list[kmock.Request]:
        return [r for r in list(self.server) if r.method == "PATCH"]


@pytest.fixture
async def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Kube]:
    async with ApiServer() as server, kmock.Server(server):
        declare_crds(server)
        url = str(server.url)
        config = tmp_path / "kubeconfig"
        config.write_text(yaml.safe_dump(kubeconfig(url)))
        monkeypatch.setenv("KUBECONFIG", str(config))
        async with Api(url) as client:
            yield Kube(server, client, url, config)


def ready(endpoint: str, policies: list[str]) -> dict[str, Any]:
    return {
        "endpoint": endpoint,
        "policies": policies,
        "readyReplicas": 2,
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "Reconciled",
                "message": "the proxy runs",
                "observedGeneration": 1,
                "lastTransitionTime": "2026-11-27T10:00:00Z",
            }
        ],
    }


def in_namespace(obj: dict[str, Any], namespace: str) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}


# ---------------------------------------------------------------------------------- status
async def test_status_table_json_yaml_and_not_found(
    kube: Kube, capsys: pytest.CaptureFixture[str]
) -> None:
    await kube.create(connection("orders"), ready("orders-proxy.data.svc:5432", ["analysts"]))
    await kube.create(connection("billing", proxy={"replicas": 3}))  # not reconciled yet
    await kube.create(in_namespace(connection("elsewhere"), "other"))

    rc, out, err = await kube.run(capsys, "status")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "ENDPOINT",
        "READY",
        "STATUS",
        "REASON",
        "POLICIES",
        "MESSAGE",
    ]
    assert lines[1].split() == ["billing", "<none>", "0/3", "Unknown", "<none>"]
    assert lines[2].split()[:6] == [
        "orders",
        "orders-proxy.data.svc:5432",
        "2/2",
        "True",
        "Reconciled",
        "analysts",
    ]
    assert lines[2].endswith("the proxy runs")
    assert "elsewhere" not in out

    rc, out, _ = await kube.run(capsys, "status", "-A")
    assert rc == 0
    assert out.splitlines()[0].startswith("NAMESPACE")
    assert [line.split()[:2] for line in out.splitlines()[1:]] == [
        ["data", "billing"],
        ["data", "orders"],
        ["other", "elsewhere"],
    ]

    rc, out, _ = await kube.run(capsys, "status", "orders", "-o", "json")
    assert rc == 0
    obj = json.loads(out)
    assert obj["metadata"]["name"] == "orders"
    assert obj["status"]["endpoint"] == "orders-proxy.data.svc:5432"

    rc, out, _ = await kube.run(capsys, "status", "-n", "other", "-o", "yaml")
    assert rc == 0
    listed = yaml.safe_load(out)
    assert listed["kind"] == "List"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["elsewhere"]

    rc, out, err = await kube.run(capsys, "status", "absent")
    assert (rc, out) == (1, "")
    assert err == (
        "kubectl pgwarden status: databaseconnection absent not found in namespace data\n"
    )
    with pytest.raises(SystemExit) as usage:
        await kube.run(capsys, "status", "orders", "-A")
    assert usage.value.code == 2
    assert "error: NAME needs one namespace" in capsys.readouterr().err

    rc, out, err = await kube.run(capsys, "status", "-n", "empty")
    assert (rc, out, err) == (0, "", "No database connections in namespace empty.\n")


# ---------------------------------------------------------------------------------- approvals
LONG = "UPDATE orders SET note = 'a very long note that goes on' WHERE id = $1 AND shop = 'x'"


async def three_requests(kube: Kube) -> None:
    await kube.create(request("r-pending", 600, statement=LONG))
    await kube.create(
        request("r-approved", 600),
        {"state": "Approved", "decidedBy": "bob", "decidedAt": "2026-11-27T10:00:00Z"},
    )
    await kube.create(request("r-late", -60))  # Pending past expiresAt: as good as Expired


async def test_approvals_pending_all_and_one(
    kube: Kube, capsys: pytest.CaptureFixture[str]
) -> None:
    await three_requests(kube)
    rc, out, err = await kube.run(capsys, "approvals")
    assert (rc, err) == (0, "")
    head, *rows = out.splitlines()
    assert head.split() == [
        "NAME",
        "CONNECTION",
        "REQUESTER",
        "CLASSES",
        "POLICY",
        "AGE",
        "EXPIRES",
        "IN",
        "STATEMENT",
    ]
    assert len(rows) == 1
    cells = rows[0].split()
    assert cells[:5] == ["r-pending", "orders", "alice", "write", "analysts"]
    assert cells[6] in ("9m", "10m")  # expires in 600 s
    assert rows[0].endswith("...")  # the statement, cut to its first 60 characters
    assert LONG[:40] in rows[0]

    rc, out, _ = await kube.run(capsys, "approvals", "--all")
    assert rc == 0
    states = {line.split()[0]: line.split()[7] for line in out.splitlines()[1:]}
    assert states == {"r-pending": "Pending", "r-approved": "Approved", "r-late": "Expired"}

    rc, out, _ = await kube.run(capsys, "approvals", "-o", "yaml")
    assert rc == 0
    listed = yaml.safe_load(out)
    assert [i["spec"]["statement"] for i in listed["items"]] == [LONG]  # whole

    rc, out, _ = await kube.run(capsys, "approvals", "r-pending")
    assert rc == 0
    assert "namespace:   data" in out
    assert "state:       Pending" in out
    assert f"  {LONG}" in out
    assert "parameters:  $1='42'" in out

    rc, out, _ = await kube.run(capsys, "approvals", "r-pending", "-o", "json")
    assert json.loads(out)["spec"]["statement"] == LONG

    # what the agent sent cannot hide part of itself from the approver
    await kube.create(request("r-bidi", 600, statement="SELECT 1 -- \u202eDROP"))
    for argv in (["approvals"], ["approvals", "r-bidi"], ["approvals", "r-bidi", "-o", "yaml"]):
        rc, out, _ = await kube.run(capsys, *argv)
        assert rc == 0
        assert "\u202e" not in out
        assert "\\u202e" in out.lower()  # escaped (yaml writes \u202E)
    await kube.client.delete(API_VERSION, APPROVALS, NS, "r-bidi")

    rc, out, _ = await kube.run(capsys, "approvals", "-A", "-o", "json")
    assert [i["metadata"]["name"] for i in json.loads(out)["items"]] == ["r-pending"]

    rc, _, err = await kube.run(capsys, "approvals", "-n", "empty")
    assert (rc, err) == (0, "No pending approval requests in namespace empty.\n")
    rc, _, err = await kube.run(capsys, "approvals", "absent")
    assert (rc, err) == (
        1,
        "kubectl pgwarden approvals: approvalrequest absent not found in namespace data\n",
    )


# ---------------------------------------------------------------------------------- decide
async def test_approve_and_deny_write_what_the_proxy_reads(
    kube: Kube, capsys: pytest.CaptureFixture[str]
) -> None:
    await kube.create(request("r-1", 600))
    await kube.create(request("r-2", 600))
    kube.server.user_info = {"username": "oidc:bob@example.com", "groups": ["approvers"]}
    before = datetime.now(UTC)

    rc, out, err = await kube.run(capsys, "approve", "r-1", "--comment", "looks right")
    assert (rc, err) == (0, "")
    assert out == (
        "approved r-1: write on orders, requested by alice; decidedBy oidc:bob@example.com\n"
    )
    status = kube.status("r-1")
    assert status["state"] == "Approved"
    assert status["decidedBy"] == "oidc:bob@example.com"  # what the four-eyes policy demands
    assert status["comment"] == "looks right"
    assert status["decidedAt"].endswith("Z")
    decided = datetime.fromisoformat(status["decidedAt"].replace("Z", "+00:00"))
    assert before - timedelta(seconds=1) <= decided <= datetime.now(UTC)
    # a compare-and-set: the patch names the version it was checked against
    (patch,) = kube.patches()
    assert patch.url.path.endswith("/approvalrequests/r-1/status")
    assert patch.data["metadata"]["resourceVersion"]

    rc, out, _ = await kube.run(capsys, "deny", "r-2")
    assert rc == 0
    assert out.startswith("denied r-2: ")
    assert kube.status("r-2")["state"] == "Denied"
    assert "comment" not in kube.status("r-2")

    proxy = KubernetesApprovals(NS, api_url=kube.url, poll_interval=0.05)
    approved = await proxy.wait("r-1", timeout=2)
    assert approved.state is ApprovalState.APPROVED
    assert approved.decided_by == "oidc:bob@example.com"
    assert approved.comment == "looks right"
    denied = await proxy.wait("r-2", timeout=2)
    assert denied.state is ApprovalState.DENIED


async def test_refusals_write_nothing(kube: Kube, capsys: pytest.CaptureFixture[str]) -> None:
    await three_requests(kube)
    patched = len(kube.patches())  # r-approved's status
    kube.server.user_info = {"username": "carol@example.com"}

    rc, out, err = await kube.run(capsys, "approve", "r-approved")
    assert (rc, out) == (1, "")
    assert "request r-approved was already approved by bob" in err
    rc, _, err = await kube.run(capsys, "deny", "r-late")
    assert rc == 1
    assert "request r-late expired at" in err

    # the requester, as the API server names them (with an authenticator prefix too)
    for username in ("alice", "ALICE@example.com", "oidc:alice", "https://idp#alice"):
        kube.server.user_info = {"username": username}
        for verb in ("approve", "deny"):
            rc, _, err = await kube.run(capsys, verb, "r-pending")
            assert rc == 1, username
            assert "another person must decide it (four eyes)" in err

    kube.server.user_info = {"username": "system:serviceaccount:agents:sql-agent"}
    rc, _, err = await kube.run(capsys, "approve", "r-pending")
    assert rc == 1
    assert "is a service account; a person approves or denies" in err

    kube.server.user_info = None  # an API server without SelfSubjectReview
    rc, _, err = await kube.run(capsys, "approve", "r-pending")
    assert rc == 1
    assert "this API server has no SelfSubjectReview" in err
    assert "Traceback" not in err

    kube.server.user_info = {"username": "carol@example.com"}
    rc, _, err = await kube.run(capsys, "approve", "absent")
    assert (rc, err) == (
        1,
        "kubectl pgwarden approve: approvalrequest absent not found in namespace data\n",
    )
    assert len(kube.patches()) == patched
    assert kube.status("r-pending") == {}


# ---------------------------------------------------------------------------------- errors
async def test_forbidden_and_unreachable_say_what_is_needed(
    kube: Kube, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def forbidden() -> None:
        raise kmock.KubernetesError(
            status=403,
            reason="Forbidden",
            message='approvalrequests.pgwarden.io is forbidden: User "dave" cannot list',
            details={},
        )

    kube.server[f"get /apis/{API_VERSION}/namespaces/{NS}/approvalrequests"] << forbidden
    rc, out, err = await kube.run(capsys, "approvals")
    assert (rc, out) == (1, "")
    assert err.startswith(
        "kubectl pgwarden approvals: cannot list approvalrequests in namespace data: "
        'forbidden (HTTP 403: approvalrequests.pgwarden.io is forbidden: User "dave"'
    )
    assert "the pgwarden-approver ClusterRole" in err

    gone = tmp_path / "gone"
    gone.write_text(yaml.safe_dump(kubeconfig("http://127.0.0.1:9")))  # nothing listens
    rc, _, err = await kube.run(capsys, "status", "--kubeconfig", str(gone))
    assert rc == 1
    assert err.startswith(
        "kubectl pgwarden status: cannot list databaseconnections in namespace data: "
        "the Kubernetes API at http://127.0.0.1:9 is unreachable"
    )
    assert "Traceback" not in err

    rc, _, err = await kube.run(capsys, "status", "--context", "nope")
    assert rc == 1
    assert f"no context 'nope' in {kube.config}" in err


# ---------------------------------------------------------------------------------- kubeconfig
async def test_kubeconfig_files_contexts_and_credentials(
    kube: Kube, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$KUBECONFIG lists files (missing ones skipped, first wins); --context picks one; paths
    are relative to the file; tokenFile and exec credential plugins give the bearer token."""
    await kube.create(in_namespace(connection("elsewhere"), "other"))
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "token").write_text("from-token-file\n")
    plugin = tmp_path / "creds" / "plugin.sh"
    answer = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": "from-exec"},
    }
    plugin.write_text(
        f"#!/bin/sh\ntest -n \"$KUBERNETES_EXEC_INFO\" || exit 3\necho '{json.dumps(answer)}'\n"
    )
    plugin.chmod(0o755)
    extra = {
        "users": [
            {"name": "filed", "user": {"tokenFile": "creds/token"}},
            {"name": "plugged", "user": {"exec": {"command": "./creds/plugin.sh", "args": None}}},
        ],
        "contexts": [
            {"name": "test", "context": {"cluster": "shadowed", "user": "filed"}},  # not first
            {"name": "filed", "context": {"cluster": "kmock", "user": "filed"}},
            {
                "name": "plugged",
                "context": {"cluster": "kmock", "user": "plugged", "namespace": "other"},
            },
        ],
        "current-context": "plugged",  # the first file's current-context wins
    }
    second = tmp_path / "second"
    second.write_text(yaml.safe_dump(extra))
    listed = os.pathsep.join([str(tmp_path / "missing"), str(kube.config), str(second)])
    monkeypatch.setenv("KUBECONFIG", listed)

    def bearer() -> str:
        return str(list(kube.server)[-1].headers.get("Authorization"))

    rc, out, _ = await kube.run(capsys, "status")  # context test: namespace data
    assert (rc, out) == (0, "")
    assert bearer() == f"Bearer {SECRET}"
    rc, out, _ = await kube.run(capsys, "status", "--context", "filed", "-n", "other")
    assert rc == 0
    assert "elsewhere" in out
    assert bearer() == "Bearer from-token-file"
    rc, out, _ = await kube.run(capsys, "status", "--context", "plugged")
    assert rc == 0
    assert "elsewhere" in out  # the context's namespace
    assert bearer() == "Bearer from-exec"


def test_client_certificates_leave_no_key_on_disk(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")

    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    config = tmp_path / "kubeconfig"
    config.write_text(
        yaml.safe_dump(
            {
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": "https://127.0.0.1:6443",
                            "certificate-authority-data": b64(certs.ca_cert),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "client-certificate-data": b64(certs.cert),
                            "client-key-data": b64(certs.key),
                        },
                    }
                ],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    login = load(str(config))
    assert login.namespace == "default"

    def leftovers() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("pgwarden-k8s-*")}

    before = leftovers()

    async def build() -> None:
        async with open_api(login):
            pass

    asyncio.run(build())
    assert leftovers() == before


# ---------------------------------------------------------------------------------- sessions
def test_sessions_are_pgwardens_own_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileStore(tmp_path / "rec")
    write_session(store, "s-a")
    monkeypatch.delenv("PGWARDEN_STORE", raising=False)
    assert main(["sessions", "list", "--store", store.url]) == 0
    out, _ = capsys.readouterr()
    assert out.splitlines()[0].startswith("SESSION")
    assert "s-a" in out
    assert main(["sessions", "verify", "s-a", "--store", store.url]) == 0
    assert main(["sessions", "list"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("kubectl pgwarden sessions list: give --store URL")


# ---------------------------------------------------------------------------------- token
async def test_token_help_names_the_endpoint_and_no_secret(
    kube: Kube, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = connection(
        "orders",
        auth={"oidc": {"issuer": "https://kubernetes.default.svc", "serviceAccounts": True}},
        proxy={"replicas": 2, "tlsSecretRef": {"name": "orders-proxy-tls"}},
    )
    await kube.create(conn, ready("orders-proxy.data.svc:5432", []))
    await kube.create(connection("plain"))  # no TLS, no service accounts, not reconciled

    rc, out, err = await kube.run(capsys, "token", "orders", "--service-account", "sql-agent")
    assert (rc, err) == (0, "")
    assert "endpoint:  orders-proxy.data.svc:5432" in out
    assert "audience:  pgwarden" in out
    assert (
        'PGPASSWORD="$(cat /var/run/secrets/pgwarden/token)" psql \'host=orders-proxy.data.svc '
        "port=5432 dbname=orders user=agent sslmode=verify-full'"
    ) in out
    assert "system:serviceaccount:data:sql-agent" in out
    snippet = out.split("Add to the pod spec:\n", 1)[1].split("\n\n", 1)[0]
    pod = yaml.safe_load(snippet)
    (volume,) = pod["spec"]["volumes"]
    assert volume["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "pgwarden",
                "expirationSeconds": 3600,
                "path": "token",
            }
        }
    ]
    assert pod["spec"]["serviceAccountName"] == "sql-agent"
    assert SECRET not in out

    rc, out, _ = await kube.run(capsys, "token", "plain")
    assert rc == 0
    assert "not reconciled by the operator yet" in out
    assert "the proxy listens in plaintext" in out
    assert "does not accept them yet" in out
    assert "sslmode=disable" in out

    rc, out, _ = await kube.run(capsys, "token")  # no cluster needed
    assert rc == 0
    assert "kubectl pgwarden token NAME" in out
    rc, _, err = await kube.run(capsys, "token", "absent")
    assert (rc, err) == (
        1,
        "kubectl pgwarden token: databaseconnection absent not found in namespace data\n",
    )


# ---------------------------------------------------------------------------------- script
async def test_the_console_script_kubectl_finds(kube: Kube) -> None:
    await kube.create(request("r-1", 600))
    kube.server.user_info = {"username": "bob@example.com"}

    async def script(*argv: str) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            str(SCRIPT),
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "KUBECONFIG": str(kube.config)},
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    rc, out, _ = await script("approvals")
    assert rc == 0
    assert out.splitlines()[1].startswith("r-1 ")
    rc, out, _ = await script("approve", "r-1")
    assert (rc, out.split(":")[0]) == (0, "approved r-1")
    assert kube.status("r-1")["decidedBy"] == "bob@example.com"
    rc, out, err = await script("approve", "r-1")
    assert (rc, out) == (1, "")
    assert err.startswith("kubectl pgwarden approve: request r-1 was already approved by bob@")
    assert "Traceback" not in err
