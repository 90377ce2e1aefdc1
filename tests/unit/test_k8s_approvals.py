"""The Kubernetes approval backend against a small in-test API server (aiohttp, on loopback).

`FakeKubeApi` serves what the backend uses of the Kubernetes API for ApprovalRequests: POST to
the collection (status dropped, as with a status subresource), GET an item, and PATCH
`.../status` as a JSON merge patch with a `metadata.resourceVersion` precondition (409), the
CRD's transition rule (422), and a resourceVersion that grows at every write. It can refuse
verbs with 403 and run a hook before a patch (to let a decision race the proxy's).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import itertools
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from pgwarden.api.approvals import (
    TRANSITIONS,
    ApprovalRequestSpec,
    ApprovalState,
    Requester,
    is_valid_name,
)
from pgwarden.api.config import ProxyConfig
from pgwarden.api.statements import StatementClass
from pgwarden_proxy.approvals.backend import ApprovalError, UnknownApproval
from pgwarden_proxy.approvals.kubernetes import (
    API_URL_ENV,
    CONNECTION_LABEL,
    REQUESTER_LABEL,
    SESSION_LABEL,
    KubernetesApprovals,
    label_value,
)
from pgwarden_proxy.server import approval_backend
from tests.kmockapi import merge_patch

NS = "data"
PREFIX = "/apis/pgwarden.io/v1alpha1/namespaces/{ns}/approvalrequests"


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return web.json_response(body, status=code)


class FakeKubeApi:
    """Just enough of the Kubernetes API for ApprovalRequests (see the module docstring)."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.forbidden: set[tuple[str, str]] = set()  # (verb, resource) answered with 403
        self.before_patch: Callable[[str, dict[str, Any]], None] | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # method, path, headers
        self._versions = itertools.count(1)
        self.url = ""
        app = web.Application()
        app.router.add_post(PREFIX.replace("{ns}", "{ns}"), self._create)
        app.router.add_get(PREFIX + "/{name}", self._get)
        app.router.add_patch(PREFIX + "/{name}/status", self._patch_status)
        self._runner = web.AppRunner(app)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle: on the running loop, or on a thread of its own ---------------------------
    async def start(self) -> FakeKubeApi:
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    def start_thread(self) -> FakeKubeApi:
        loop = self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="fake-kube-api", daemon=True)
        self._thread.start()
        assert started.wait(10)
        return self

    def stop_thread(self) -> None:
        assert self._loop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- what a test (or a person with kubectl) does ---------------------------------------------
    def only(self) -> dict[str, Any]:
        [obj] = self.objects.values()
        return obj

    def decide(self, name: str, state: str, by: str, *, ns: str = NS) -> None:
        """What `kubectl patch --subresource=status --type=merge` does (no precondition)."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            assert self._loop is not None  # from another thread: on the server's own loop
            done = concurrent.futures.Future[None]()

            def run() -> None:
                try:
                    self.decide(name, state, by, ns=ns)
                    done.set_result(None)
                except BaseException as e:
                    done.set_exception(e)

            self._loop.call_soon_threadsafe(run)
            done.result(10)
            return
        obj = self.objects[(ns, name)]
        obj["status"] = merge_patch(obj.get("status") or {}, {"state": state, "decidedBy": by})
        obj["metadata"]["resourceVersion"] = str(next(self._versions))

    # -- handlers --------------------------------------------------------------------------------
    def _seen(self, request: web.Request) -> None:
        self.requests.append((request.method, request.path, dict(request.headers)))

    async def _create(self, request: web.Request) -> web.Response:
        self._seen(request)
        ns = request.match_info["ns"]
        if ("create", "approvalrequests") in self.forbidden:
            return _status(
                403,
                "Forbidden",
                f'approvalrequests.pgwarden.io is forbidden: User "system:serviceaccount:{ns}:'
                f'x-proxy" cannot create resource "approvalrequests" in API group "pgwarden.io" '
                f'in the namespace "{ns}"',
            )
        body = await request.json()
        name = body["metadata"]["name"]
        if not is_valid_name(name):
            return _status(422, "Invalid", f"metadata.name: Invalid value: {name!r}")
        if (ns, name) in self.objects:
            return _status(409, "AlreadyExists", f'approvalrequests "{name}" already exists')
        body.pop("status", None)  # the status subresource: status is not written on create
        body["metadata"].update(
            namespace=ns,
            uid=str(uuid.uuid4()),
            resourceVersion=str(next(self._versions)),
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        self.objects[(ns, name)] = body
        return web.json_response(body, status=201)

    async def _get(self, request: web.Request) -> web.Response:
        self._seen(request)
        ns, name = request.match_info["ns"], request.match_info["name"]
        if ("get", "approvalrequests") in self.forbidden:
            return _status(403, "Forbidden", "cannot get resource approvalrequests")
        obj = self.objects.get((ns, name))
        if obj is None:
            return _status(404, "NotFound", f'approvalrequests.pgwarden.io "{name}" not found')
        return web.json_response(obj)

    async def _patch_status(self, request: web.Request) -> web.Response:
        self._seen(request)
        ns, name = request.match_info["ns"], request.match_info["name"]
        if ("patch", "approvalrequests/status") in self.forbidden:
            return _status(403, "Forbidden", "cannot patch resource approvalrequests/status")
        if request.content_type != "application/merge-patch+json":
            return _status(415, "UnsupportedMediaType", request.content_type)
        obj = self.objects.get((ns, name))
        if obj is None:
            return _status(404, "NotFound", f'approvalrequests.pgwarden.io "{name}" not found')
        patch = await request.json()
        if self.before_patch is not None:
            hook, self.before_patch = self.before_patch, None
            hook(name, patch)
        wanted = (patch.get("metadata") or {}).get("resourceVersion")
        if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
            return _status(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on approvalrequests.pgwarden.io "{name}": the '
                "object has been modified; please apply your changes to the latest version",
            )
        old = ApprovalState((obj.get("status") or {}).get("state", "Pending"))
        status = merge_patch(obj.get("status") or {}, patch.get("status") or {})
        new = ApprovalState(status.get("state", "Pending"))
        if new != old and new not in TRANSITIONS[old]:  # the CRD's CEL rule
            return _status(
                422,
                "Invalid",
                f'ApprovalRequest.pgwarden.io "{name}" is invalid: status.state: Invalid value: '
                '"string": state only moves Pending -> Approved | Denied | Expired and '
                "Approved -> Executed",
            )
        obj["status"] = status
        obj["metadata"]["resourceVersion"] = str(next(self._versions))
        return web.json_response(obj)


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    server = await FakeKubeApi().start()
    yield server
    await server.stop()


@pytest.fixture
def backend(api: FakeKubeApi) -> KubernetesApprovals:
    return KubernetesApprovals(NS, api_url=api.url, poll_interval=0.02)


def spec(seconds: float = 60, username: str = "agent@example.com") -> ApprovalRequestSpec:
    return ApprovalRequestSpec(
        connection="Orders_DB",
        requester=Requester(username=username, groups=["ai-agents"]),
        session_id="3f2a9c1d0e",
        statement="DELETE FROM ledger WHERE id = $1",
        fingerprint="abc123",
        classes=[StatementClass.WRITE],
        policy="careful",
        expires_at=datetime.now(UTC) + timedelta(seconds=seconds),
        parameters=["1", None],
    )


async def decide_soon(api: FakeKubeApi, name: str, state: str, by: str) -> None:
    await asyncio.sleep(0.1)
    api.decide(name, state, by)


# ---------------------------------------------------------------------------------- submit
async def test_submit_creates_the_resource_with_spec_and_labels(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec())
    assert name.startswith("orders-db-")
    assert is_valid_name(name)
    obj = api.objects[(NS, name)]
    assert obj["apiVersion"] == "pgwarden.io/v1alpha1"
    assert obj["kind"] == "ApprovalRequest"
    assert obj["metadata"]["labels"] == {
        CONNECTION_LABEL: "Orders_DB",
        REQUESTER_LABEL: "agent_example.com",
        SESSION_LABEL: "3f2a9c1d0e",
    }
    s = obj["spec"]
    assert s["sessionId"] == "3f2a9c1d0e"
    assert s["requester"] == {"username": "agent@example.com", "groups": ["ai-agents"]}
    assert s["expiresAt"].endswith("Z")
    assert s["parameters"] == ["1", None]
    assert s["classes"] == ["write"]
    assert ApprovalRequestSpec.model_validate(s) == spec().model_copy(
        update={"expires_at": ApprovalRequestSpec.model_validate(s).expires_at}
    )
    assert "status" not in obj  # written by the status subresource only
    method, path, headers = api.requests[-1]
    assert (method, path) == (
        "POST",
        f"/apis/pgwarden.io/v1alpha1/namespaces/{NS}/approvalrequests",
    )
    assert "Authorization" not in headers  # no token configured


def test_label_values_are_valid() -> None:
    assert label_value("alice@example.com") == "alice_example.com"
    assert label_value("-x-") == "x"
    assert label_value("@@@") == "unknown"
    long = label_value("a" * 80 + "@example.com")
    assert len(long) == 63


async def test_the_token_is_sent_and_re_read_at_each_request(
    api: FakeKubeApi, tmp_path: Any
) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    b = KubernetesApprovals(NS, api_url=api.url, token_file=token)
    name = await b.submit(spec())
    token.write_text("rotated")
    await b.finish(name, ApprovalState.EXPIRED)
    auth = [h.get("Authorization") for _, _, h in api.requests]
    assert auth[0] == "Bearer first"
    assert auth[-1] == "Bearer rotated"


async def test_a_missing_token_is_a_clear_error(api: FakeKubeApi, tmp_path: Any) -> None:
    b = KubernetesApprovals(NS, api_url=api.url, token_file=tmp_path / "nope")
    with pytest.raises(ApprovalError, match="cannot read the service account token"):
        await b.submit(spec())


# ---------------------------------------------------------------------------------- wait
async def test_wait_returns_an_approval(api: FakeKubeApi, backend: KubernetesApprovals) -> None:
    name = await backend.submit(spec())
    decider = asyncio.create_task(decide_soon(api, name, "Approved", "bob@example.com"))
    status = await backend.wait(name, 10)
    await decider
    assert status.state is ApprovalState.APPROVED
    assert status.decided_by == "bob@example.com"


async def test_wait_returns_a_denial(api: FakeKubeApi, backend: KubernetesApprovals) -> None:
    name = await backend.submit(spec())
    decider = asyncio.create_task(decide_soon(api, name, "Denied", "bob@example.com"))
    status = await backend.wait(name, 10)
    await decider
    assert status.state is ApprovalState.DENIED
    assert status.decided_by == "bob@example.com"


async def test_wait_records_expired_at_the_timeout(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec())
    status = await backend.wait(name, 0.2)
    assert status.state is ApprovalState.EXPIRED
    assert status.comment == "no decision within 0.2s"
    recorded = api.objects[(NS, name)]["status"]
    assert recorded["state"] == "Expired"
    assert recorded["comment"] == "no decision within 0.2s"
    assert recorded["decidedAt"]
    # the expiry was a precondition-guarded merge patch on the status subresource
    [patch] = [r for r in api.requests if r[0] == "PATCH"]
    assert patch[1].endswith(f"/approvalrequests/{name}/status")
    assert patch[2]["Content-Type"] == "application/merge-patch+json"


async def test_wait_records_expired_at_expires_at(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec(seconds=0.2))
    status = await backend.wait(name, 30)
    assert status.state is ApprovalState.EXPIRED
    assert status.comment == "no decision before the deadline"
    assert api.objects[(NS, name)]["status"]["state"] == "Expired"


async def test_a_decision_racing_the_expiry_wins(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec())
    seen: list[dict[str, Any]] = []

    def approve_first(patched: str, patch: dict[str, Any]) -> None:
        # a person's approval lands after the proxy read the request, before its patch
        seen.append(patch)
        api.decide(patched, "Approved", "bob@example.com")

    api.before_patch = approve_first
    status = await backend.wait(name, 0.1)
    assert seen[0]["status"]["state"] == "Expired"
    assert seen[0]["metadata"]["resourceVersion"]  # the precondition that lost
    assert status.state is ApprovalState.APPROVED
    assert status.decided_by == "bob@example.com"
    assert api.objects[(NS, name)]["status"]["state"] == "Approved"


async def test_wait_for_an_unknown_request(backend: KubernetesApprovals) -> None:
    with pytest.raises(UnknownApproval, match=f"no approval request nope-1 in namespace {NS}"):
        await backend.wait("nope-1", 1)


async def test_wait_rides_out_an_unreachable_api_until_the_timeout() -> None:
    b = KubernetesApprovals(NS, api_url="http://127.0.0.1:9", poll_interval=0.02)
    with pytest.raises(ApprovalError, match="cannot reach the Kubernetes API"):
        await b.wait("x-1", 0.1)


# ---------------------------------------------------------------------------------- finish
async def test_finish_marks_an_approved_request_executed(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec())
    api.decide(name, "Approved", "bob@example.com")
    api.objects[(NS, name)]["status"]["comment"] = "ok"
    await backend.finish(name, ApprovalState.EXECUTED, "ran")
    st = api.objects[(NS, name)]["status"]
    assert st["state"] == "Executed"
    assert st["decidedBy"] == "bob@example.com"  # who decided is kept
    assert st["comment"] == "ok; ran"


async def test_finish_withdraws_a_pending_request(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec())
    await backend.finish(name, ApprovalState.EXPIRED, "withdrawn: the client went away")
    st = api.objects[(NS, name)]["status"]
    assert (st["state"], st["comment"]) == ("Expired", "withdrawn: the client went away")
    await backend.finish(name, ApprovalState.EXPIRED)  # again: nothing to do, no error


@pytest.mark.parametrize(
    ("decided", "wanted", "message"),
    [
        ("Denied", ApprovalState.EXECUTED, "was already denied by bob@example.com"),
        ("Executed", ApprovalState.EXECUTED, "has already been executed"),
        ("Approved", ApprovalState.EXPIRED, "was already approved by bob@example.com"),
        (None, ApprovalState.EXECUTED, "is still pending"),
    ],
)
async def test_forbidden_transitions_are_refused(
    api: FakeKubeApi,
    backend: KubernetesApprovals,
    decided: str | None,
    wanted: ApprovalState,
    message: str,
) -> None:
    name = await backend.submit(spec())
    if decided is not None:
        api.decide(name, decided, "bob@example.com")
    before = copy.deepcopy(api.objects[(NS, name)])
    with pytest.raises(ApprovalError, match=message):
        await backend.finish(name, wanted)
    assert api.objects[(NS, name)] == before
    assert not [r for r in api.requests if r[0] == "PATCH"]  # refused before asking the API


async def test_executing_past_the_deadline_records_expired_and_refuses(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec(seconds=0.05))
    await asyncio.sleep(0.1)
    with pytest.raises(ApprovalError, match=r"expired at .* without a decision"):
        await backend.finish(name, ApprovalState.EXECUTED)
    assert api.objects[(NS, name)]["status"]["state"] == "Expired"


async def test_finish_takes_only_the_proxy_s_states(backend: KubernetesApprovals) -> None:
    with pytest.raises(ValueError, match="Executed or Expired"):
        await backend.finish("x-1", ApprovalState.APPROVED)


async def test_a_write_racing_finish_is_checked_again(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec())
    api.decide(name, "Approved", "carol@example.com")

    def overwrite_first(patched: str, _: dict[str, Any]) -> None:
        api.decide(patched, "Denied", "bob@example.com")  # e.g. someone with broad rights

    api.before_patch = overwrite_first  # between the proxy's read and its patch: 409, re-read
    with pytest.raises(ApprovalError, match=r"already denied by bob@example\.com"):
        await backend.finish(name, ApprovalState.EXECUTED)
    assert api.objects[(NS, name)]["status"]["state"] == "Denied"


# ---------------------------------------------------------------------------------- errors
async def test_forbidden_create_says_what_the_service_account_lacks(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    api.forbidden.add(("create", "approvalrequests"))
    with pytest.raises(ApprovalError) as err:
        await backend.submit(spec())
    msg = str(err.value)
    assert msg.startswith(f"the proxy's service account may not create approvalrequests in {NS}")
    assert "403 Forbidden" in msg
    assert 'cannot create resource "approvalrequests"' in msg


async def test_forbidden_status_patch_says_so(
    api: FakeKubeApi, backend: KubernetesApprovals
) -> None:
    name = await backend.submit(spec())
    api.forbidden.add(("patch", "approvalrequests/status"))
    with pytest.raises(ApprovalError, match=f"may not patch approvalrequests/status in {NS}"):
        await backend.wait(name, 0.05)


async def test_forbidden_get_is_not_retried(api: FakeKubeApi, backend: KubernetesApprovals) -> None:
    name = await backend.submit(spec())
    api.forbidden.add(("get", "approvalrequests"))
    with pytest.raises(ApprovalError, match=f"may not get approvalrequests in {NS}"):
        await backend.wait(name, 30)


async def test_a_missing_crd_or_namespace_is_named(api: FakeKubeApi) -> None:
    b = KubernetesApprovals(NS, api_url=api.url + "/nothing-here")
    with pytest.raises(ApprovalError, match="is the ApprovalRequest CRD installed"):
        await b.submit(spec())


def test_outside_a_pod_without_an_api_url_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv(API_URL_ENV, raising=False)
    with pytest.raises(ApprovalError, match="does not run in a pod"):
        KubernetesApprovals(NS)


def test_in_a_pod_the_service_account_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_URL_ENV, raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    b = KubernetesApprovals(NS)
    assert b.api_url == "https://10.96.0.1:443"
    assert str(b.token_file) == "/var/run/secrets/kubernetes.io/serviceaccount/token"
    assert str(b.ca_file) == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


# ---------------------------------------------------------------------------------- people
def test_how_to_decide_is_a_kubectl_line(backend: KubernetesApprovals) -> None:
    text = backend.how_to_decide("orders-db-0a1b2c3d")
    assert (
        "kubectl patch approvalrequest orders-db-0a1b2c3d -n data --subresource=status "
        """--type=merge -p '{"status":{"state":"Approved","decidedBy":"you@example.com"}}'"""
    ) in text
    assert '"state":"Denied"' in text


# ---------------------------------------------------------------------------------- wiring
def _config(**approvals: Any) -> ProxyConfig:
    return ProxyConfig.model_validate(
        {
            "connection": "app-db",
            "listen": {"host": "127.0.0.1", "port": 0, "insecurePlaintext": True},
            "upstream": {
                "host": "127.0.0.1",
                "database": "app",
                "username": "u",
                "password": "p",
                "sslmode": "disable",
            },
            "auth": {"oidc": {"issuer": "https://idp.example.com"}},
            "approvals": approvals,
        }
    )


def test_approval_backend_chooses_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_URL_ENV, "http://127.0.0.1:1")
    b = approval_backend(_config(backend="kubernetes", namespace="x"))
    assert isinstance(b, KubernetesApprovals)
    assert (b.namespace, b.api_url, b.token_file) == ("x", "http://127.0.0.1:1", None)
    # no namespace (the default section): no backend, held statements are refused
    assert approval_backend(_config()) is None


def test_approval_backend_outside_a_pod_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv(API_URL_ENV, raising=False)
    assert approval_backend(_config(backend="kubernetes", namespace="x")) is None
