"""The Kubernetes backend: one `ApprovalRequest` custom resource (pgwarden.io/v1alpha1) per request.

The proxy creates the object (spec and labels; the API server ignores `status` on create, and an
absent status reads as Pending), polls it until a person writes a decision to the `/status`
subresource, and records Expired or Executed there itself. Every status change is a JSON merge
patch that carries the `metadata.resourceVersion` the change was checked against, so the API
server refuses it (409 Conflict) when somebody wrote in between; the proxy then re-reads and
checks again. So a person approving at the moment the proxy expires the request never loses the
decision, and the CRD's own rule (state only moves Pending -> Approved | Denied | Expired,
Approved -> Executed) backs the same transitions up on the server side.

In a pod the API is `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, authenticated
with the service account token (re-read at every request: kubelet rotates it) and verified with
the service account's `ca.crt`. `PGWARDEN_KUBE_API_URL` (tests and local runs only) points the
backend at another API server instead; then no token is sent unless one is configured.

Who may approve is whoever RBAC lets patch `approvalrequests/status`; `decidedBy` is what the
approver writes (the proxy still refuses an approval whose `decidedBy` is the requester).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import ValidationError

from pgwarden.api.approvals import (
    ApprovalRequest,
    ApprovalRequestSpec,
    ApprovalRequestStatus,
    ApprovalState,
    new_request_name,
)
from pgwarden.api.resources import API_VERSION, APPROVAL_REQUEST, GROUP, VERSION
from pgwarden_proxy.approvals.backend import (
    ApprovalError,
    UnknownApproval,
    expiry_comment,
    finish_comment,
    seconds_left,
    transition,
    validation_summary,
)

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_FILE = SERVICE_ACCOUNT_DIR / "token"
CA_FILE = SERVICE_ACCOUNT_DIR / "ca.crt"
API_URL_ENV = "PGWARDEN_KUBE_API_URL"  # tests and local runs: another API server than the pod's

POLL_INTERVAL = 0.5  # seconds between two looks at a request `wait` is waiting on
REQUEST_TIMEOUT = 10.0  # seconds for one API call
CONFLICT_RETRIES = 5  # re-read and re-check this often when somebody else wrote in between

CONNECTION_LABEL = "pgwarden.io/connection"
REQUESTER_LABEL = "pgwarden.io/requester"
SESSION_LABEL = "pgwarden.io/session"

_NOT_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_LABEL_MAX = 63


def label_value(value: str) -> str:
    """`value` as a valid label value: `@` and other characters become `_`, at most 63 long,
    starting and ending with a letter or digit. For selecting (`-l`), not for identifying:
    the full, exact values are in the spec."""
    cleaned = _NOT_LABEL_CHARS.sub("_", value)[:_LABEL_MAX]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", cleaned) or "unknown"


@dataclass
class _Failed(Exception):
    """An API answer that is not a success (internal; turned into ApprovalError with context)."""

    status: int  # 0: the API could not be reached
    reason: str
    message: str

    @property
    def transient(self) -> bool:
        return self.status == 0 or self.status == 429 or self.status >= 500


class KubernetesApprovals:
    """Implements `ApprovalBackend` over ApprovalRequest objects in one namespace."""

    def __init__(
        self,
        namespace: str,
        *,
        api_url: str | None = None,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.namespace = namespace
        self.poll_interval = poll_interval
        api_url = api_url or os.environ.get(API_URL_ENV)
        if api_url is None:  # in a pod: the service account's API, token and CA
            host = os.environ.get("KUBERNETES_SERVICE_HOST")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ApprovalError(
                    "approvals.backend kubernetes needs the Kubernetes API, and this proxy does "
                    "not run in a pod (KUBERNETES_SERVICE_HOST is not set); run it in the "
                    f"cluster, set {API_URL_ENV}, or use approvals.backend file"
                )
            host = f"[{host}]" if ":" in host else host  # an IPv6 service address
            api_url = f"https://{host}:{port}"
            token_file = token_file or TOKEN_FILE
            ca_file = ca_file or CA_FILE
        self.api_url = api_url.rstrip("/")
        self.token_file = token_file
        self.ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._collection = (
            f"{self.api_url}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/"
            f"{APPROVAL_REQUEST.plural}"
        )

    # -- the proxy's side (ApprovalBackend) ------------------------------------------------------

    async def submit(self, spec: ApprovalRequestSpec) -> str:
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": APPROVAL_REQUEST.kind,
            "metadata": {
                "labels": {
                    CONNECTION_LABEL: label_value(spec.connection),
                    REQUESTER_LABEL: label_value(spec.requester.username),
                    SESSION_LABEL: label_value(spec.session_id),
                },
            },
            "spec": spec.model_dump(mode="json", by_alias=True),
        }
        async with self._session() as http:
            for _ in range(CONFLICT_RETRIES):
                name = new_request_name(spec.connection)
                body["metadata"]["name"] = name
                try:
                    await self._call(http, "POST", self._collection, body)
                except _Failed as e:
                    if e.status == 409:  # AlreadyExists: the random suffix collided
                        continue
                    raise self._error(e, "create", name=None) from None
                return name
        raise ApprovalError(
            f"could not find a free approval request name in namespace {self.namespace}"
        )

    async def wait(self, name: str, timeout: float) -> ApprovalRequestStatus:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        give_up = loop.time() + max(timeout, 0.0)
        async with self._session() as http:
            while True:
                try:
                    req, _ = await self._read(http, name)
                except _Failed as e:
                    if not e.transient:
                        raise self._error(e, "get", name) from None
                    # a restarting API server is no reason to give up on a person's decision
                    log.warning(
                        "cannot read approval request, trying again",
                        extra={"request": name, "error": e.message},
                    )
                    if loop.time() >= give_up:
                        raise self._error(e, "get", name) from None
                    await asyncio.sleep(self.poll_interval)
                    continue
                if req.status.state is not ApprovalState.PENDING:
                    return req.status
                left = seconds_left(req, give_up - loop.time())
                if left <= 0:
                    return (await self._expire(http, name, expiry_comment(req, timeout))).status
                await asyncio.sleep(min(self.poll_interval, left))

    async def finish(self, name: str, state: ApprovalState, comment: str | None = None) -> None:
        comment = finish_comment(state, comment)
        async with self._session() as http:
            await self._change(http, name, state, comment)

    def how_to_decide(self, name: str) -> str:
        def patch(state: str) -> str:
            body = json.dumps(
                {"status": {"state": state, "decidedBy": "you@example.com"}},
                separators=(",", ":"),
            )
            return (
                f"kubectl patch approvalrequest {shlex.quote(name)} "
                f"-n {shlex.quote(self.namespace)} --subresource=status --type=merge "
                f"-p {shlex.quote(body)}"
            )

        return f"a person approves with `{patch('Approved')}` or denies with `{patch('Denied')}`"

    # -- status changes --------------------------------------------------------------------------

    async def _change(
        self, http: aiohttp.ClientSession, name: str, state: ApprovalState, comment: str | None
    ) -> ApprovalRequest:
        """Compare-and-set: the transition is checked against the object as last read, and the
        patch only applies to that version of it (else 409: read again, check again)."""
        for _ in range(CONFLICT_RETRIES):
            req, version = await self._read_or_fail(http, name)
            if state is ApprovalState.EXPIRED and req.status.state is ApprovalState.EXPIRED:
                return req  # the proxy withdrawing what already expired: nothing to do
            if req.past_deadline() and state is not ApprovalState.EXPIRED:
                # record what every reader already reports; `transition` below refuses with why
                expired = transition(
                    req, ApprovalState.EXPIRED, comment="no decision before the deadline"
                )
                try:
                    await self._patch_status(http, name, expired.status, version)
                except _Failed as e:
                    if e.status != 409:
                        raise self._error(e, "patch", name) from None
                    continue
            updated = transition(req, state, comment=comment)  # ApprovalError when not allowed
            try:
                await self._patch_status(http, name, updated.status, version)
            except _Failed as e:
                if e.status == 409:
                    continue
                raise self._error(e, "patch", name) from None
            return updated
        raise ApprovalError(
            f"approval request {name} in namespace {self.namespace} kept changing while the "
            f"proxy tried to mark it {state.value}; try again"
        )

    async def _expire(self, http: aiohttp.ClientSession, name: str, why: str) -> ApprovalRequest:
        """Expired, unless a decision got there first: then that decision stands."""
        for _ in range(CONFLICT_RETRIES):
            req, version = await self._read_or_fail(http, name)
            if req.status.state is not ApprovalState.PENDING:
                return req
            expired = transition(req, ApprovalState.EXPIRED, comment=why)
            try:
                await self._patch_status(http, name, expired.status, version)
            except _Failed as e:
                if e.status != 409:
                    raise self._error(e, "patch", name) from None
                continue  # somebody wrote in between: read what they wrote
            req, _ = await self._read_or_fail(http, name)
            return req  # what is recorded, whoever wrote it
        raise ApprovalError(
            f"approval request {name} in namespace {self.namespace} kept changing while the "
            "proxy tried to expire it; try again"
        )

    async def _patch_status(
        self,
        http: aiohttp.ClientSession,
        name: str,
        status: ApprovalRequestStatus,
        version: str | None,
    ) -> None:
        body: dict[str, Any] = {"status": status.model_dump(mode="json", by_alias=True)}
        if version:
            # a precondition: the API server answers 409 Conflict if the object has changed
            body["metadata"] = {"resourceVersion": version}
        await self._call(
            http,
            "PATCH",
            f"{self._collection}/{name}/status",
            body,
            content_type="application/merge-patch+json",
        )

    # -- reading ---------------------------------------------------------------------------------

    async def _read(
        self, http: aiohttp.ClientSession, name: str
    ) -> tuple[ApprovalRequest, str | None]:
        """The request as recorded (no deadline applied), and its resourceVersion."""
        obj = await self._call(http, "GET", f"{self._collection}/{name}")
        meta = obj.get("metadata") or {}
        try:
            req = ApprovalRequest.from_resource(obj, name)
        except ValidationError as e:
            raise ApprovalError(
                f"approvalrequest {name} in namespace {self.namespace} is not a valid approval "
                f"request: {validation_summary(e)}"
            ) from None
        return req, meta.get("resourceVersion")

    async def _read_or_fail(
        self, http: aiohttp.ClientSession, name: str
    ) -> tuple[ApprovalRequest, str | None]:
        try:
            return await self._read(http, name)
        except _Failed as e:
            raise self._error(e, "get", name) from None

    # -- HTTP ------------------------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        """A session per operation: the backend is rebuilt at each config reload, and a
        session per operation is never left open by one that was replaced."""
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.api_url.startswith("https:"):
            return None
        if self._ssl is None:
            try:
                self._ssl = ssl.create_default_context(
                    cafile=str(self.ca_file) if self.ca_file is not None else None
                )
            except (OSError, ssl.SSLError) as e:
                raise ApprovalError(
                    f"cannot load the Kubernetes API's CA certificate {self.ca_file}: {e}"
                ) from e
        return self._ssl

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        if self.token_file is not None:
            try:  # every time: the kubelet rotates the projected token
                token = self.token_file.read_text().strip()
            except OSError as e:
                raise ApprovalError(
                    f"cannot read the service account token {self.token_file}: {e.strerror} "
                    "(is automountServiceAccountToken off for the proxy's pod?)"
                ) from e
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _call(
        self,
        http: aiohttp.ClientSession,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        *,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = self._headers(content_type if data is not None else None)
        try:
            async with http.request(
                method, url, data=data, headers=headers, ssl=self._ssl_context() or True
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise _Failed(0, "Unreachable", f"{type(e).__name__}: {e}".rstrip(": ")) from None
        try:
            answer = json.loads(text) if text else {}
        except ValueError:
            answer = {}
        if not isinstance(answer, dict):
            answer = {}
        if 200 <= status < 300:
            return answer
        message = str(answer.get("message") or text.strip()[:300] or f"HTTP {status}")
        raise _Failed(status, str(answer.get("reason") or ""), message)

    def _error(self, e: _Failed, verb: str, name: str | None) -> ApprovalError:
        """An ApprovalError that says what failed and what a person can do about it."""
        ns = self.namespace
        what = f"approvalrequest {name}" if name else "an approvalrequest"
        resource = "approvalrequests/status" if verb == "patch" else "approvalrequests"
        if e.status == 0:
            return ApprovalError(f"cannot reach the Kubernetes API at {self.api_url}: {e.message}")
        if e.status == 401:
            return ApprovalError(
                f"the Kubernetes API at {self.api_url} did not accept the proxy's credentials "
                f"(401 Unauthorized): check the service account token {self.token_file}"
            )
        if e.status == 403:
            return ApprovalError(
                f"the proxy's service account may not {verb} {resource} in {ns} "
                f"(403 Forbidden: {e.message}); it needs the Role the operator creates for the "
                "proxy (get, create approvalrequests; get, patch approvalrequests/status)"
            )
        if e.status == 404 and name is None:
            return ApprovalError(
                f"the Kubernetes API has no approvalrequests in namespace {ns} (404: "
                f"{e.message}); is the ApprovalRequest CRD installed (crds/) and does the "
                "namespace exist?"
            )
        if e.status == 404:
            return UnknownApproval(f"no approval request {name} in namespace {ns}")
        if e.status == 422:
            return ApprovalError(f"the Kubernetes API refused to {verb} {what}: {e.message}")
        return ApprovalError(
            f"the Kubernetes API failed to {verb} {what} in namespace {ns} "
            f"(HTTP {e.status} {e.reason}: {e.message})".replace(" :", ":")
        )
