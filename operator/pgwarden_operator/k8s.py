"""A small async Kubernetes client over aiohttp: just what the handlers need.

get / list / create / merge-patch / delete of namespaced objects, the status subresource, and an
idempotent `apply` (read; create when absent; patch only when the live object differs from the
desired one). Credentials come from a `kopf.ConnectionInfo` (the one kopf's login produced, see
handlers.py), or a base URL and token (tests).

Errors are already classified for kopf: a 5xx, 429, conflict, timeout or connection error is a
`kopf.TemporaryError` (kopf retries the handler after `delay`), an authentication or
authorization failure too (fixing RBAC changes nothing in the resource, so a permanent error
would never be retried), and anything else in 4xx (validation, unknown kind) is a
`kopf.PermanentError` (retrying does not help until the resource changes).
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tempfile
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf

Obj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
DEFAULT_TIMEOUT = 15.0
RETRY_DELAY = 5.0  # seconds before kopf retries after a transient failure
AUTH_RETRY_DELAY = 30.0  # 401/403: someone has to fix RBAC or credentials

# kind -> plural for what the builders produce (and the pgwarden.io kinds); others: see plural()
_PLURALS = {
    "ConfigMap": "configmaps",
    "Deployment": "deployments",
    "StatefulSet": "statefulsets",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "NetworkPolicy": "networkpolicies",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Secret": "secrets",
    "Event": "events",
    "DatabaseConnection": "databaseconnections",
    "AccessPolicy": "accesspolicies",
    "ApprovalRequest": "approvalrequests",
}


class ApiTemporaryError(kopf.TemporaryError):
    """Transient: kopf retries the handler after `delay` seconds."""

    def __init__(self, message: str, *, status: int | None, delay: float = RETRY_DELAY) -> None:
        super().__init__(message, delay=delay)
        self.status = status


class ApiPermanentError(kopf.PermanentError):
    """The request itself is wrong (validation, unknown kind): retrying does not help."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


def plural(kind: str) -> str:
    if kind in _PLURALS:
        return _PLURALS[kind]
    low = kind.lower()
    if low.endswith("y"):
        return low[:-1] + "ies"
    if low.endswith(("s", "x")):
        return low + "es"
    return low + "s"


def path(
    api_version: str,
    kind_plural: str,
    namespace: str | None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """`/api/v1/namespaces/ns/configmaps/name` and `/apis/group/version/...` URLs."""
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    url = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{kind_plural}"
    if name is not None:
        url += f"/{name}"
        if subresource is not None:
            url += f"/{subresource}"
    return url


def is_subset(desired: Any, live: Any) -> bool:
    """Does `live` already hold everything `desired` says? Dicts: every desired key, recursively
    (the server adds defaults and fields of its own); lists: the same length, item by item (the
    server defaults fields inside list items too, e.g. a container's terminationMessagePath);
    anything else: equal."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            k in live and is_subset(v, live[k]) for k, v in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(desired) == len(live)
            and all(is_subset(d, x) for d, x in zip(desired, live, strict=True))
        )
    return bool(desired == live)


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context()
    if info.ca_path:
        ctx.load_verify_locations(cafile=os.fsdecode(info.ca_path))
    elif info.ca_data:
        data = info.ca_data.encode() if isinstance(info.ca_data, str) else info.ca_data
        ctx.load_verify_locations(cadata=base64.b64decode(data).decode())
    cert, key = info.certificate_path, info.private_key_path
    if info.certificate_data and info.private_key_data:
        # ssl wants files: write the client certificate and key to a private temporary dir,
        # removed once loaded (a short-lived CLI must not leave private keys behind in /tmp)
        with tempfile.TemporaryDirectory(prefix="pgwarden-k8s-") as tmp:
            cert, key = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
            for target, blob in ((cert, info.certificate_data), (key, info.private_key_data)):
                raw = blob.encode() if isinstance(blob, str) else blob
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(raw))
            ctx.load_cert_chain(cert, key)
    elif cert and key:
        ctx.load_cert_chain(os.fsdecode(cert), os.fsdecode(key))
    return ctx


class Api:
    """One aiohttp session to one API server. Create it inside the event loop that uses it."""

    def __init__(
        self,
        server: str,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | bool | None = None,
        basic_auth: tuple[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.server = server.rstrip("/")
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        auth = aiohttp.BasicAuth(*basic_auth) if basic_auth else None
        self._session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            # per socket operation, not `total`: a request queued behind others for a pooled
            # connection must not time out before it was sent
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
            connector=aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else True),
        )

    @classmethod
    def from_connection_info(cls, info: kopf.ConnectionInfo) -> Api:
        basic = (info.username, info.password) if info.username and info.password else None
        return cls(info.server, token=info.token, ssl_context=_ssl_context(info), basic_auth=basic)

    async def close(self) -> None:
        await self._session.close()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------------------ transport
    async def _request(
        self,
        method: str,
        url: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        what = f"{method} {url}"
        try:
            async with self._session.request(
                method,
                self.server + url,
                json=body,
                params=params,
                headers={"Content-Type": content_type} if body is not None else None,
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise ApiTemporaryError(
                f"{what}: API server unreachable: {type(e).__name__}: {e}", status=None
            ) from e
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = None
        if status < 400:
            return status, data
        if status == 404:
            return status, data
        message = data.get("message") if isinstance(data, dict) else None
        detail = f"{what}: HTTP {status}: {message or text[:300]}"
        if status >= 500 or status in (409, 429):
            raise ApiTemporaryError(detail, status=status)
        if status in (401, 403):
            raise ApiTemporaryError(detail, status=status, delay=AUTH_RETRY_DELAY)
        raise ApiPermanentError(detail, status=status)

    # ------------------------------------------------------------------------------ verbs
    async def get(
        self, api_version: str, kind_plural: str, namespace: str | None, name: str
    ) -> Obj | None:
        """The object, or None when it does not exist."""
        status, data = await self._request("GET", path(api_version, kind_plural, namespace, name))
        return None if status == 404 else _obj(data)

    async def list(self, api_version: str, kind_plural: str, namespace: str | None) -> list[Obj]:
        url = path(api_version, kind_plural, namespace)
        status, data = await self._request("GET", url)
        if status == 404:
            raise ApiPermanentError(f"GET {url}: HTTP 404: no such resource", status=404)
        items = data.get("items") if isinstance(data, dict) else None
        return [i for i in items or [] if isinstance(i, dict)]

    async def create(self, obj: Obj) -> Obj:
        """POST; a 409 (exists) is an ApiTemporaryError with status 409."""
        meta = obj.get("metadata", {})
        url = path(obj["apiVersion"], plural(obj["kind"]), meta.get("namespace"))
        status, data = await self._request("POST", url, body=obj)
        if status == 404:
            raise ApiPermanentError(f"POST {url}: HTTP 404: no such resource", status=404)
        # some API servers (and emulators) answer 200 with an empty body: fall back to ours
        return _obj(data) or obj

    async def patch(
        self,
        api_version: str,
        kind_plural: str,
        namespace: str | None,
        name: str,
        patch: Obj,
        *,
        subresource: str | None = None,
    ) -> Obj | None:
        """JSON merge patch (RFC 7386: lists are replaced, null deletes a key). None: the
        object does not exist."""
        url = path(api_version, kind_plural, namespace, name, subresource)
        status, data = await self._request("PATCH", url, body=patch, content_type=MERGE_PATCH)
        return None if status == 404 else _obj(data)

    async def patch_status(
        self, api_version: str, kind_plural: str, namespace: str | None, name: str, status: Obj
    ) -> Obj | None:
        return await self.patch(
            api_version, kind_plural, namespace, name, {"status": status}, subresource="status"
        )

    async def delete(
        self,
        api_version: str,
        kind_plural: str,
        namespace: str | None,
        name: str,
        *,
        uid: str | None = None,
    ) -> bool:
        """DELETE; True when deleted (or its deletion started: finalizers), False when it was
        already gone (404). `uid`: a precondition, so a newer object of the same name stays (a
        mismatch is a 409, an ApiTemporaryError with status 409)."""
        url = path(api_version, kind_plural, namespace, name)
        body: Obj | None = None
        if uid is not None:
            body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"uid": uid}}
        status, _ = await self._request("DELETE", url, body=body)
        return status != 404

    async def apply(self, obj: Obj) -> tuple[str, Obj]:
        """Make the live object hold `obj`: ("created" | "patched" | "unchanged", live object).

        No write when the live object already holds every desired field (so a replayed event
        changes nothing). Patches are merge patches of the desired object, status excluded; a
        ConfigMap's `data` is replaced as a whole (a key the operator no longer renders goes).
        Fields the operator stopped setting elsewhere stay (no server-side apply here)."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        meta = obj["metadata"]
        ns, name = meta.get("namespace"), meta["name"]
        kp = plural(kind)
        for _ in range(3):
            live = await self.get(api_version, kp, ns, name)
            if live is None:
                try:
                    return "created", await self.create(obj)
                except ApiTemporaryError as e:
                    if e.status != 409:
                        raise
                    continue  # created concurrently: compare and patch it
            desired = {k: v for k, v in obj.items() if k != "status"}
            if is_subset(desired, live):
                return "unchanged", live
            patch = dict(desired)
            if "data" in live and isinstance(live["data"], dict) and "data" in desired:
                patch["data"] = {
                    **{k: None for k in live["data"] if k not in desired["data"]},
                    **desired["data"],
                }
            patched = await self.patch(api_version, kp, ns, name, patch)
            if patched is not None:
                return "patched", patched
            # deleted between the read and the patch: create it again
        raise ApiTemporaryError(f"{kind} {ns}/{name}: kept changing while applying", status=None)


def _obj(data: Any) -> Obj:
    return data if isinstance(data, dict) else {}
