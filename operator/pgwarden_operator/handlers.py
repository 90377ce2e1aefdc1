"""The kopf handlers: DatabaseConnection -> ConfigMap, Deployment, Service, PDB (NetworkPolicy);
AccessPolicy -> re-rendered ConfigMaps of the connections it selects.

`make_registry(Operator(...))` builds a fresh `kopf.OperatorRegistry` (no module-level global
state, so a test can run several operators, each against its own API server). The handlers:

- DatabaseConnection create/update/resume: parse the spec (invalid: condition Ready=False,
  reason InvalidSpec, the pydantic message, a warning event; no exception, so no retry until
  the spec changes; what was applied before keeps running), list the namespace's
  AccessPolicies, render `builders.desired(...)`, apply each manifest (a write only where the
  live object differs), then write the status (observedGeneration, Ready=True Reconciled,
  endpoint, policies, specHash) when it changed.
- AccessPolicy create/update/resume/delete: validate (invalid: Valid=False), re-render every
  connection it selects now or selected before (status.connections), then write its status:
  the connections, Valid, and ConnectionsResolved (False when it selects nothing or names a
  connection that does not exist).
- ApprovalRequest (approvals.py): expiry of Pending requests at expiresAt, an event per state,
  deletion of decided requests after PGWARDEN_APPROVAL_RETENTION; no finalizer.

Every handler is idempotent: a replayed event reads the same cluster, renders the same objects
and writes nothing. One connection is reconciled by one coroutine at a time (a lock per
connection), so a policy change and a connection change cannot interleave their reads and
writes of the same ConfigMap.

kopf keeps its own bookkeeping under the pgwarden.io prefix: the finalizer
`pgwarden.io/finalizer` (only AccessPolicies carry it: their deletion re-renders the
connections; the connections' children go with them by owner reference), and annotations
`pgwarden.io/*` for handler progress and the last handled spec.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from pydantic import ValidationError

from pgwarden.api.policy import AccessPolicySpec
from pgwarden.api.resources import (
    ACCESS_POLICY,
    API_VERSION,
    DATABASE_CONNECTION,
    GROUP,
    VERSION,
    DatabaseConnectionSpec,
)
from pgwarden_operator import approvals, builders, rbac
from pgwarden_operator.k8s import Api, Obj, is_subset

IMAGE_ENV = "PGWARDEN_IMAGE"
DEFAULT_IMAGE = "ghcr.io/pgwarden/pgwarden:latest"
FINALIZER = f"{GROUP}/finalizer"
CONNECTIONS = DATABASE_CONNECTION.plural
POLICIES = ACCESS_POLICY.plural

# condition types and reasons (CamelCase, as the API conventions want)
READY = "Ready"
VALID = "Valid"
RESOLVED = "ConnectionsResolved"
RECONCILED = "Reconciled"
INVALID_SPEC = "InvalidSpec"

_log = logging.getLogger("pgwarden.operator")
Log = logging.Logger | logging.LoggerAdapter[Any]


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's own marks under the pgwarden.io prefix, events posted."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.posting.enabled = True


def validation_message(e: ValidationError, prefix: str = "spec") -> str:
    """`spec.port: Input should be less than or equal to 65535; spec.auth: Field required`."""
    parts = []
    for err in e.errors(include_url=False):
        loc = ".".join(str(p) for p in (prefix, *err["loc"]))
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str,
    ok: bool,
    reason: str,
    message: str,
    generation: int | None,
    previous: list[Any] | None,
) -> Obj:
    """A condition; its lastTransitionTime moves only when its status does."""
    status = "True" if ok else "False"
    before = next(
        (c for c in previous or [] if isinstance(c, Mapping) and c.get("type") == type_), None
    )
    since = (
        before.get("lastTransitionTime")
        if before is not None and before.get("status") == status
        else None
    )
    cond: Obj = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or _now(),
    }
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def _raw(body: Mapping[str, Any]) -> Obj:
    """A plain, private copy of a kopf Body (or of a listed object)."""
    return copy.deepcopy({k: body[k] for k in body})


def _waits_for(policy: Obj, connection: str) -> bool:
    """A policy that selects `connection` (by name or "*") but whose status does not list it."""
    if _deleting(policy):
        return False
    selects = (policy.get("spec") or {}).get("connections", ["*"])
    if not isinstance(selects, list) or (connection not in selects and "*" not in selects):
        return False
    return connection not in ((policy.get("status") or {}).get("connections") or [])


def _deleting(obj: Obj) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


class Operator:
    """What the handlers of one running operator share: the image, the API credentials (from
    kopf's login), the client (created in the operator's event loop) and the locks."""

    def __init__(
        self,
        *,
        image: str | None = None,
        server: str | None = None,
        token: str | None = None,
    ) -> None:
        """`server` (and `token`): talk to this API server instead of logging in with the
        pod's service account or a kubeconfig (for tests)."""
        self.image = image or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
        self._server = server
        self._token = token
        self._info: kopf.ConnectionInfo | None = None
        self._api: Api | None = None
        self._api_info: kopf.ConnectionInfo | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    # ------------------------------------------------------------------------------ access
    def login(self, **kwargs: Any) -> kopf.ConnectionInfo:
        """kopf's login activity: the credentials kopf uses, and so does our client."""
        info: kopf.ConnectionInfo | None
        if self._server is not None:
            info = kopf.ConnectionInfo(server=self._server, token=self._token)
        else:
            info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
        if info is None:
            raise kopf.LoginError(
                "no Kubernetes credentials: not in a pod with a service account token, "
                "and no kubeconfig (KUBECONFIG or ~/.kube/config)"
            )
        self._info = info
        return info

    async def api(self) -> Api:
        info = self._info
        if info is None:
            raise kopf.TemporaryError("not logged in to the API server yet", delay=1)
        if self._api is None or self._api_info is not info:  # first use, or a new login
            if self._api is not None:
                await self._api.close()
            self._api, self._api_info = Api.from_connection_info(info), info
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    # ------------------------------------------------------------------------------ reads
    async def policies(
        self, namespace: str
    ) -> tuple[list[Obj], list[tuple[str, AccessPolicySpec]]]:
        """All AccessPolicies of the namespace, and the valid, not deleting ones parsed."""
        api = await self.api()
        raw = await api.list(API_VERSION, POLICIES, namespace)
        parsed: list[tuple[str, AccessPolicySpec]] = []
        for obj in raw:
            if _deleting(obj):
                continue
            try:
                spec = AccessPolicySpec.model_validate(obj.get("spec") or {})
            except ValidationError:
                continue  # its own handler marks it Valid=False; it grants nothing
            parsed.append((obj["metadata"]["name"], spec))
        return raw, parsed

    # ------------------------------------------------------------------------------ connection
    async def reconcile_connection(self, conn: Obj, logger: Log | None = None) -> None:
        log = logger or _log
        meta = conn["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        async with self._lock(namespace, name):
            api = await self.api()
            # the latest version (a policy handler passes what it listed a moment ago)
            fresh = await api.get(API_VERSION, CONNECTIONS, namespace, name)
            if fresh is None or _deleting(fresh):
                return
            conn = fresh
            generation = conn["metadata"].get("generation")
            old_status = conn.get("status") or {}
            try:
                spec = DatabaseConnectionSpec.model_validate(conn.get("spec") or {})
                raw_policies, policies = await self.policies(namespace)
                uid = conn["metadata"].get("uid", "")
                # the proxy's identity and its right to ApprovalRequests first: the Deployment
                # names the ServiceAccount
                manifests = rbac.proxy_rbac(name, namespace, uid) + builders.desired(
                    name, namespace, uid, spec, policies, self.image
                )
            except (ValidationError, builders.InvalidSpec) as e:
                message = validation_message(e) if isinstance(e, ValidationError) else str(e)
                log.warning("DatabaseConnection %s/%s: invalid spec: %s", namespace, name, message)
                kopf.warn(
                    kopf.Body(cast("kopf.RawBody", conn)),
                    reason=INVALID_SPEC,
                    message=message[:1024],
                )
                status = {
                    "observedGeneration": generation,
                    "conditions": [
                        condition(
                            READY,
                            False,
                            INVALID_SPEC,
                            message + " (the proxy keeps running its last valid configuration)",
                            generation,
                            old_status.get("conditions"),
                        )
                    ],
                }
                await self._write_status(api, CONNECTIONS, conn, status)
                return

            ready_replicas = 0
            for manifest in manifests:
                action, live = await api.apply(manifest)
                if action != "unchanged":
                    log.info(
                        "%s %s/%s %s",
                        manifest["kind"],
                        namespace,
                        manifest["metadata"]["name"],
                        action,
                    )
                if manifest["kind"] == "Deployment":
                    ready_replicas = int((live.get("status") or {}).get("readyReplicas") or 0)
            selected = sorted(n for n, p in policies if p.selects(name))
            status = {
                "observedGeneration": generation,
                "endpoint": (
                    f"{builders.proxy_name(name)}.{namespace}.svc:{spec.proxy.service.port}"
                ),
                "policies": selected,
                "readyReplicas": ready_replicas,
                "specHash": builders.spec_hash(
                    spec, name, namespace, spec.proxy.image or self.image
                ),
                "conditions": [
                    condition(
                        READY,
                        True,
                        RECONCILED,
                        f"proxy objects applied with {len(selected)} AccessPolicies",
                        generation,
                        old_status.get("conditions"),
                    )
                ],
            }
            await self._write_status(api, CONNECTIONS, conn, status)
        # the policies that select this connection and do not list it yet were waiting for it
        # (only those: refreshing every policy from every reconcile is connections x policies)
        waiting = [p for p in raw_policies if _waits_for(p, name)]
        if waiting:
            await self.refresh_policy_statuses(namespace, waiting)

    # ------------------------------------------------------------------------------ policy
    async def reconcile_policy(
        self, policy: Obj, *, deleting: bool = False, logger: Log | None = None
    ) -> None:
        log = logger or _log
        meta = policy["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        api = await self.api()
        connections = {
            c["metadata"]["name"]: c
            for c in await api.list(API_VERSION, CONNECTIONS, namespace)
            if not _deleting(c)
        }
        spec: AccessPolicySpec | None
        try:
            spec = AccessPolicySpec.model_validate(policy.get("spec") or {})
            error = None
        except ValidationError as e:
            spec, error = None, validation_message(e)
            log.warning("AccessPolicy %s/%s: invalid spec: %s", namespace, name, error)
            kopf.warn(
                kopf.Body(cast("kopf.RawBody", policy)), reason=INVALID_SPEC, message=error[:1024]
            )
        selected = (
            [] if spec is None or deleting else sorted(n for n in connections if spec.selects(n))
        )
        before = set((policy.get("status") or {}).get("connections") or [])
        for conn_name in sorted((before | set(selected)) & connections.keys()):
            await self.reconcile_connection(connections[conn_name], logger=log)
        if deleting:
            return
        fresh = await api.get(API_VERSION, POLICIES, namespace, name)
        if fresh is not None:
            await self._write_policy_status(api, fresh, set(connections), error)

    async def refresh_policy_statuses(self, namespace: str, raw_policies: list[Obj]) -> None:
        """Bring the policies' status.connections and ConnectionsResolved up to date after a
        connection appeared (only status writes; the ConfigMaps are already right)."""
        api = await self.api()
        names = {
            c["metadata"]["name"]
            for c in await api.list(API_VERSION, CONNECTIONS, namespace)
            if not _deleting(c)
        }
        for policy in raw_policies:
            if _deleting(policy):
                continue
            try:
                AccessPolicySpec.model_validate(policy.get("spec") or {})
            except ValidationError:
                continue
            await self._write_policy_status(api, policy, names, None)

    async def _write_policy_status(
        self, api: Api, policy: Obj, connection_names: set[str], error: str | None
    ) -> None:
        generation = policy["metadata"].get("generation")
        previous = (policy.get("status") or {}).get("conditions")
        if error is not None:
            status: Obj = {
                "observedGeneration": generation,
                "connections": [],
                "conditions": [
                    condition(VALID, False, INVALID_SPEC, error, generation, previous),
                    condition(
                        RESOLVED,
                        False,
                        INVALID_SPEC,
                        "an invalid policy selects nothing",
                        generation,
                        previous,
                    ),
                ],
            }
            await self._write_status(api, POLICIES, policy, status)
            return
        spec = AccessPolicySpec.model_validate(policy.get("spec") or {})
        selected = sorted(n for n in connection_names if spec.selects(n))
        missing = sorted(n for n in set(spec.connections) - {"*"} if n not in connection_names)
        if missing:
            ok, reason = False, "MissingConnection"
            message = (
                "no DatabaseConnection named "
                + ", ".join(missing)
                + f" in namespace {policy['metadata']['namespace']}"
            )
        elif not selected:
            ok, reason = False, "NoConnection"
            message = "selects no DatabaseConnection"
        else:
            ok, reason, message = True, "Resolved", "selects " + ", ".join(selected)
        status = {
            "observedGeneration": generation,
            "connections": selected,
            "conditions": [
                condition(VALID, True, "Valid", "", generation, previous),
                condition(RESOLVED, ok, reason, message, generation, previous),
            ],
        }
        await self._write_status(api, POLICIES, policy, status)

    # ------------------------------------------------------------------------------ status
    async def _write_status(self, api: Api, kind_plural: str, obj: Obj, status: Obj) -> None:
        """Patch the status subresource, unless it already says exactly this."""
        live = obj.get("status") or {}
        if is_subset(status, live) and len(live.get("conditions") or []) == len(
            status.get("conditions") or []
        ):
            return
        meta = obj["metadata"]
        await api.patch_status(API_VERSION, kind_plural, meta["namespace"], meta["name"], status)


def make_registry(op: Operator) -> kopf.OperatorRegistry:
    """A registry with the pgwarden handlers bound to `op`."""
    registry = kopf.OperatorRegistry()
    keeper = approvals.ApprovalKeeper(op)

    @kopf.on.startup(id="startup", registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo:
        return op.login(**kwargs)

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(**_: Any) -> None:
        await keeper.stop()
        await op.close()

    @kopf.on.resume(GROUP, VERSION, CONNECTIONS, id="connection", registry=registry)
    @kopf.on.create(GROUP, VERSION, CONNECTIONS, id="connection", registry=registry)
    @kopf.on.update(GROUP, VERSION, CONNECTIONS, id="connection", registry=registry)
    async def connection(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        await op.reconcile_connection(_raw(body), logger=logger)

    @kopf.on.resume(GROUP, VERSION, POLICIES, id="policy", registry=registry)
    @kopf.on.create(GROUP, VERSION, POLICIES, id="policy", registry=registry)
    @kopf.on.update(GROUP, VERSION, POLICIES, id="policy", registry=registry)
    async def policy(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        await op.reconcile_policy(_raw(body), logger=logger)

    @kopf.on.delete(GROUP, VERSION, POLICIES, id="policy-deleted", registry=registry)
    async def policy_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        # the policy still exists (our finalizer holds it) but no longer counts: re-render
        await op.reconcile_policy(_raw(body), deleting=True, logger=logger)

    # ApprovalRequests: expiry, events, cleanup after the retention (approvals.py; no finalizer)
    approvals.register(registry, keeper)
    return registry
