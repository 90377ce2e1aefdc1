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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
from pgwarden_operator import approvals, builders, config, rbac
from pgwarden_operator.coalesce import Coalescer
from pgwarden_operator.k8s import Api, ApiPermanentError, Obj, is_subset

IMAGE_ENV = "PGWARDEN_IMAGE"
# renders and policy-status writes in flight at once: a burst of events queues here instead of
# in the API client's connection pool (where a request's timeout would run out while it waits)
RENDER_CONCURRENCY = 8
STATUS_CONCURRENCY = 8
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
APPLY_REJECTED = "ApplyRejected"  # the API server refused a manifest (a permanent error)

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


def _waits_for(policy: IndexedPolicy, connection: str) -> bool:
    """A policy that selects `connection` but whose status does not list it."""
    if not policy.counts or policy.spec is None or not policy.spec.selects(connection):
        return False
    return connection not in ((policy.raw.get("status") or {}).get("connections") or [])


def _applied(conn: Obj, digest: str) -> bool:
    """Were this generation's objects (not only its bundle) applied? Ready, observed and with
    the spec hash of what would be applied now."""
    status = conn.get("status") or {}
    ready = any(
        isinstance(c, Mapping) and c.get("type") == READY and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    return (
        ready
        and status.get("observedGeneration") == conn["metadata"].get("generation")
        and status.get("specHash") == digest
    )


def _where(body: kopf.Body) -> tuple[str, str]:
    """(namespace, name) of a namespaced object."""
    return str(body.metadata.namespace), str(body.metadata.name)


def _deleting(obj: Obj) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


@dataclass(frozen=True)
class IndexedPolicy:
    """An AccessPolicy as the index holds it: the object, and its spec parsed once per change
    (None with `error` when invalid)."""

    raw: Obj
    spec: AccessPolicySpec | None
    error: str | None

    @property
    def name(self) -> str:
        return str(self.raw["metadata"]["name"])

    @property
    def counts(self) -> bool:
        """Valid and not being deleted: it shapes bundles."""
        return self.spec is not None and not _deleting(self.raw)


def index_policy(body: Mapping[str, Any]) -> IndexedPolicy:
    raw = _raw(body)
    try:
        return IndexedPolicy(raw, AccessPolicySpec.model_validate(raw.get("spec") or {}), None)
    except ValidationError as e:
        return IndexedPolicy(raw, None, validation_message(e))


class Operator:
    """What the handlers of one running operator share: the image, the API credentials (from
    kopf's login), the client (created in the operator's event loop), the in-memory indices of
    policies and connections (kopf keeps them from its watches; handlers start only once they
    are filled) and the coalesced work queues."""

    def __init__(
        self,
        *,
        image: str | None = None,
        server: str | None = None,
        token: str | None = None,
        defaults: config.OperatorDefaults | None = None,
    ) -> None:
        """`server` (and `token`): talk to this API server instead of logging in with the
        pod's service account or a kubeconfig (for tests). `defaults`: for connections that
        leave out auth or the recording sink (else from the environment, see config.py)."""
        self.image = image or os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE
        self.defaults = defaults if defaults is not None else config.load_defaults()
        self._server = server
        self._token = token
        self._info: kopf.ConnectionInfo | None = None
        self._api: Api | None = None
        self._api_info: kopf.ConnectionInfo | None = None
        self._policy_index: Mapping[str, Iterable[IndexedPolicy]] = {}
        self._connection_index: Mapping[str, Iterable[Obj]] = {}
        # created in the operator's event loop (attach)
        self._renders: Coalescer[tuple[str, str]] | None = None
        self._statuses: Coalescer[tuple[str, str]] | None = None

    def attach(
        self,
        policies: Mapping[str, Iterable[IndexedPolicy]],
        connections: Mapping[str, Iterable[Obj]],
    ) -> None:
        """At startup: kopf's indices, and the work queues of this event loop."""
        self._policy_index, self._connection_index = policies, connections
        self._renders = Coalescer(self._render, RENDER_CONCURRENCY)
        self._statuses = Coalescer(self._refresh_policy_status, STATUS_CONCURRENCY)

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

    # ------------------------------------------------------------------------------ reads
    def policies(self, namespace: str) -> list[IndexedPolicy]:
        """The namespace's AccessPolicies as of the latest watch event, by name."""
        found = self._policy_index.get(namespace, ())
        return sorted(found, key=lambda p: p.name)

    def connection_names(self, namespace: str) -> set[str]:
        """The namespace's DatabaseConnections that are not being deleted."""
        found = self._connection_index.get(namespace, ())
        return {c["metadata"]["name"] for c in found if not _deleting(c)}

    def _queues(self) -> tuple[Coalescer[tuple[str, str]], Coalescer[tuple[str, str]]]:
        if self._renders is None or self._statuses is None:
            raise kopf.TemporaryError("the operator is still starting", delay=1)
        return self._renders, self._statuses

    # ------------------------------------------------------------------------------ connection
    async def reconcile_connection(self, namespace: str, name: str, *, full: bool = True) -> None:
        """Render the connection's objects (`full`) or only its bundle (a policy changed);
        requests that pile up while one waits are served by one render."""
        renders, statuses = self._queues()
        await renders.run((namespace, name), full)
        if not full:
            return
        # the policies that select this connection and do not list it yet were waiting for it
        # (only those: refreshing every policy from every reconcile is connections x policies)
        waiting = [p.name for p in self.policies(namespace) if _waits_for(p, name)]
        await asyncio.gather(*(statuses.run((namespace, p)) for p in waiting))

    async def _render(self, key: tuple[str, str], full: bool) -> None:
        namespace, name = key
        api = await self.api()
        # the latest version: the index may be a moment behind
        conn = await api.get(API_VERSION, CONNECTIONS, namespace, name)
        if conn is None or _deleting(conn):
            return
        generation = conn["metadata"].get("generation")
        old_status = conn.get("status") or {}
        policies = [(p.name, p.spec) for p in self.policies(namespace) if p.spec and p.counts]
        try:
            spec = DatabaseConnectionSpec.model_validate(conn.get("spec") or {})
            uid = conn["metadata"].get("uid", "")
            digest = builders.spec_hash(
                spec, name, namespace, spec.proxy.image or self.image, defaults=self.defaults
            )
            # a policy change touches only the bundle, unless this generation was never applied
            full = full or not _applied(conn, digest)
            if full:
                # the proxy's identity and its right to ApprovalRequests first: the Deployment
                # names the ServiceAccount
                manifests = rbac.proxy_rbac(name, namespace, uid) + builders.desired(
                    name, namespace, uid, spec, policies, self.image, defaults=self.defaults
                )
            else:
                bundle = builders.bundle(spec, name, namespace, policies, defaults=self.defaults)
                manifests = [builders.config_map(name, namespace, uid, bundle)]
        except (ValidationError, builders.InvalidSpec) as e:
            message = validation_message(e) if isinstance(e, ValidationError) else str(e)
            await self._not_ready(api, conn, INVALID_SPEC, message)
            return

        ready_replicas = int(old_status.get("readyReplicas") or 0)
        for manifest in manifests:
            try:
                action, live = await api.apply(manifest)
            except ApiPermanentError as e:  # e.g. a StatefulSet's claims cannot change
                await self._not_ready(api, conn, APPLY_REJECTED, str(e))
                return
            if action != "unchanged":
                _log.info(
                    "%s %s/%s %s", manifest["kind"], namespace, manifest["metadata"]["name"], action
                )
            if manifest["kind"] in builders.WORKLOAD_KINDS:
                ready_replicas = int((live.get("status") or {}).get("readyReplicas") or 0)
        if full:
            await self._remove_other_workload(api, conn, manifests)
        selected = sorted(n for n, p in policies if p.selects(name))
        status = {
            "observedGeneration": generation,
            "endpoint": f"{builders.proxy_name(name)}.{namespace}.svc:{spec.proxy.service.port}",
            "policies": selected,
            "readyReplicas": ready_replicas,
            "specHash": digest,
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

    async def _not_ready(self, api: Api, conn: Obj, reason: str, message: str) -> None:
        """Ready=False with what is wrong, a warning event; what runs stays as it is."""
        meta = conn["metadata"]
        generation = meta.get("generation")
        where = f"{meta['namespace']}/{meta['name']}"
        _log.warning("DatabaseConnection %s: %s: %s", where, reason, message)
        kopf.warn(kopf.Body(cast("kopf.RawBody", conn)), reason=reason, message=message[:1024])
        status = {
            "observedGeneration": generation,
            "conditions": [
                condition(
                    READY,
                    False,
                    reason,
                    message + " (the proxy keeps running its last valid configuration)",
                    generation,
                    (conn.get("status") or {}).get("conditions"),
                )
            ],
        }
        await self._write_status(api, CONNECTIONS, conn, status)

    async def _remove_other_workload(self, api: Api, conn: Obj, manifests: list[Obj]) -> None:
        """A Deployment replaced by a StatefulSet (spec.proxy.spoolVolume set) or the other way
        round: the old one goes, if this connection owns it (a same-named object of someone
        else's stays). The new one was applied first, so its pods start while the old drain."""
        meta = conn["metadata"]
        name = builders.proxy_name(meta["name"])
        current = {m["kind"] for m in manifests} & builders.WORKLOAD_KINDS
        for kind in builders.WORKLOAD_KINDS - current:
            plural = "deployments" if kind == "Deployment" else "statefulsets"
            old = await api.get("apps/v1", plural, meta["namespace"], name)
            if old is None:
                continue
            owners = old["metadata"].get("ownerReferences") or []
            if not any(o.get("uid") == meta.get("uid") for o in owners):
                continue
            await api.delete(
                "apps/v1", plural, meta["namespace"], name, uid=old["metadata"].get("uid")
            )
            _log.info("%s %s/%s deleted (replaced)", kind, meta["namespace"], name)

    async def track_replicas(self, namespace: str, deployment: Mapping[str, Any]) -> None:
        """A proxy Deployment's readyReplicas, copied to its connection's status (the printer
        column), without a render."""
        name = (deployment.get("metadata", {}).get("labels") or {}).get(builders.CONNECTION_LABEL)
        if not name:
            return
        ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
        api = await self.api()
        conn = await api.get(API_VERSION, CONNECTIONS, namespace, name)
        if conn is None or _deleting(conn):
            return
        if int((conn.get("status") or {}).get("readyReplicas") or 0) != ready:
            await api.patch_status(
                API_VERSION, CONNECTIONS, namespace, name, {"readyReplicas": ready}
            )

    # ------------------------------------------------------------------------------ policy
    async def reconcile_policy(
        self, policy: Obj, *, deleting: bool = False, logger: Log | None = None
    ) -> None:
        """Re-render the bundles of the connections the policy selects now or selected before
        (status.connections), then bring its status up to date."""
        log = logger or _log
        meta = policy["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        renders, statuses = self._queues()
        entry = index_policy(policy)
        if entry.error is not None:
            log.warning("AccessPolicy %s/%s: invalid spec: %s", namespace, name, entry.error)
            kopf.warn(
                kopf.Body(cast("kopf.RawBody", policy)),
                reason=INVALID_SPEC,
                message=entry.error[:1024],
            )
        names = self.connection_names(namespace)
        selected = (
            set() if entry.spec is None or deleting else {n for n in names if entry.spec.selects(n)}
        )
        before = set((policy.get("status") or {}).get("connections") or [])
        targets = sorted((before | selected) & names)
        await asyncio.gather(*(renders.run((namespace, c)) for c in targets))
        if not deleting:
            await statuses.run((namespace, name))

    async def refresh_policy_statuses(self, namespace: str, names: Iterable[str]) -> None:
        """Bring these policies' status.connections and ConnectionsResolved up to date (only
        status writes: after a connection appeared or went, or when the operator resumes)."""
        _, statuses = self._queues()
        await asyncio.gather(*(statuses.run((namespace, n)) for n in names))

    async def _refresh_policy_status(self, key: tuple[str, str], _full: bool) -> None:
        namespace, name = key
        entry = next((p for p in self.policies(namespace) if p.name == name), None)
        if entry is None or _deleting(entry.raw):
            return
        await self._write_policy_status(await self.api(), entry, self.connection_names(namespace))

    async def _write_policy_status(
        self, api: Api, entry: IndexedPolicy, connection_names: set[str]
    ) -> None:
        policy, spec, error = entry.raw, entry.spec, entry.error
        generation = policy["metadata"].get("generation")
        previous = (policy.get("status") or {}).get("conditions")
        if spec is None:
            status: Obj = {
                "observedGeneration": generation,
                "connections": [],
                "conditions": [
                    condition(VALID, False, INVALID_SPEC, error or "", generation, previous),
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

    # kopf keeps these from its watches and starts no handler before both are filled, so a
    # render reads policies from memory instead of listing them (that was connections x
    # policies objects parsed at every burst)
    @kopf.index(GROUP, VERSION, POLICIES, id="policy_index", registry=registry)
    # (async: kopf would run a plain function in its thread pool, a hop per watch event)
    async def policy_index(body: kopf.Body, **_: Any) -> dict[str, IndexedPolicy]:
        return {_where(body)[0]: index_policy(body)}

    @kopf.index(GROUP, VERSION, CONNECTIONS, id="connection_index", registry=registry)
    async def connection_index(body: kopf.Body, **_: Any) -> dict[str, Obj]:
        return {_where(body)[0]: {"metadata": _raw(body.metadata)}}

    @kopf.on.startup(id="startup", registry=registry)
    def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        configure(settings)
        # kopf passes every index to every handler, by the index handler's id
        op.attach(kwargs["policy_index"], kwargs["connection_index"])

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
    async def connection(body: kopf.Body, **_: Any) -> None:
        await op.reconcile_connection(*_where(body))

    # no finalizer (the children go by owner reference), so no on.delete: the watch's DELETED
    # event, after the index dropped the connection, updates the policies that listed it
    @kopf.on.event(GROUP, VERSION, CONNECTIONS, id="connection-gone", registry=registry)
    async def connection_gone(type: str, body: kopf.Body, **_: Any) -> None:
        if type != "DELETED":
            return
        namespace, name = _where(body)
        # by spec too: the status that lists it may not have reached the index yet
        concerned = [
            p.name
            for p in op.policies(namespace)
            if (p.spec is not None and p.spec.selects(name))
            or name in ((p.raw.get("status") or {}).get("connections") or [])
        ]
        await op.refresh_policy_statuses(namespace, concerned)

    @kopf.on.event(
        "apps",
        "v1",
        "deployments",
        id="proxy-replicas",
        labels={builders.CONNECTION_LABEL: kopf.PRESENT},
        registry=registry,
    )
    @kopf.on.event(
        "apps",
        "v1",
        "statefulsets",
        id="proxy-replicas",
        labels={builders.CONNECTION_LABEL: kopf.PRESENT},
        registry=registry,
    )
    async def proxy_replicas(type: str, body: kopf.Body, **_: Any) -> None:
        if type != "DELETED":
            await op.track_replicas(_where(body)[0], body)

    @kopf.on.create(GROUP, VERSION, POLICIES, id="policy", registry=registry)
    @kopf.on.update(GROUP, VERSION, POLICIES, id="policy", registry=registry)
    async def policy(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        await op.reconcile_policy(_raw(body), logger=logger)

    # on resume, the connections' own resume renders every bundle from the full index: a
    # policy only brings its status up to date
    @kopf.on.resume(GROUP, VERSION, POLICIES, id="policy-resumed", registry=registry)
    async def policy_resumed(body: kopf.Body, **_: Any) -> None:
        namespace, name = _where(body)
        await op.refresh_policy_statuses(namespace, [name])

    @kopf.on.delete(GROUP, VERSION, POLICIES, id="policy-deleted", registry=registry)
    async def policy_deleted(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
        # the policy still exists (our finalizer holds it) but no longer counts: re-render
        await op.reconcile_policy(_raw(body), deleting=True, logger=logger)

    # ApprovalRequests: expiry, events, cleanup after the retention (approvals.py; no finalizer)
    approvals.register(registry, keeper)
    return registry
