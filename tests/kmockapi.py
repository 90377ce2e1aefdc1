"""kmock 0.8 made to behave like an API server where pgwarden's operator (and kopf) rely on it.

kmock's `KubernetesEmulator` stores objects and serves discovery, list, get and watch; left as it
is, it assigns no uid, resourceVersion, generation or creationTimestamp, does not take
metadata.namespace from the URL, answers 200 to a create, ignores the status subresource and
fails a JSON patch's `test` with a 500. kopf needs resourceVersions (its finalizer patches test
them), the operator needs uids (owner references) and generations (observedGeneration), and the
CRDs have a status subresource. `ApiServer` therefore serves the three writes itself:

- POST (create): namespace from the URL; `generateName` (kopf's events); uid, resourceVersion,
  generation 1, creationTimestamp; status dropped where the kind has a status subresource; 409
  when the name is taken; 201.
- PATCH: JSON merge patch (RFC 7386) or JSON patch (with `test`: a failed test is a 422, as
  kopf expects); `/status` changes only the status, the main resource never does (where the
  kind has the subresource); metadata identity fields are immutable; a merge patch naming an
  outdated metadata.resourceVersion is a 409; a change bumps resourceVersion, and a change
  outside metadata and status bumps generation; a patch that changes nothing changes nothing
  (no new version, no watch event), as on a real API server.
- DELETE: with finalizers, sets deletionTimestamp (MODIFIED); the object goes (DELETED) when
  the last finalizer is removed, or at once without finalizers. DeleteOptions'
  `preconditions` (uid, resourceVersion) are checked: a mismatch is a 409.
- `?dryRun=All` on POST/PATCH: validated and answered, not stored.
- list and watch: a list returns the current resourceVersion, and a watch from it streams the
  events after it (kmock: "..." and every object replayed as ADDED, with the writes between
  the replay and its subscription lost); a watch without one starts with every object as
  ADDED, as on an API server.
- SelfSubjectReview (POST /apis/authentication.k8s.io/v1/selfsubjectreviews, "who am I",
  Kubernetes >= 1.28): answers `ApiServer.user_info` (a test sets the user it is; the API
  server does not authenticate here, whatever credentials the client sends), nothing stored;
  `user_info = None` answers 404, as an API server without that API.

Not emulated (the operator does not rely on them): labelSelector and fieldSelector (lists are
unfiltered), PUT, server-side apply, 410 Gone for an expired resourceVersion, bookmarks,
garbage collection through ownerReferences, schema validation and defaulting, the cluster-wide
`/api/v1/namespaces` (kmock cannot parse the path; the tests turn kopf's scanning off).

`declare_crds` declares the pgwarden.io kinds from crds/*.yaml next to the bundled built-in
kinds (kopf only watches what discovery lists).
"""

from __future__ import annotations

import asyncio
import copy
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
import kopf
import yaml

from pgwarden_operator.config import OperatorDefaults
from pgwarden_operator.handlers import Operator, make_registry

CRD_DIR = Path(__file__).resolve().parent.parent / "crds"
SELF_SUBJECT_REVIEWS = kmock.resource("authentication.k8s.io/v1/selfsubjectreviews")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: dicts merge recursively, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _without(obj: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in keys}


def _error(status: int, reason: str, message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details={})


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator with the writes of an API server (see the module docstring)."""

    _resource_version: int = attrs.field(default=0, init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _event_log: list[tuple[int, Any, dict[str, Any]]] = attrs.field(factory=list, init=False)
    # status.userInfo of a SelfSubjectReview: who the caller is (None: the API is absent)
    user_info: dict[str, Any] | None = attrs.field(
        factory=lambda: {"username": "kubernetes-admin", "groups": ["system:authenticated"]}
    )

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource == SELF_SUBJECT_REVIEWS and request.action == kmock.action.CREATE:
            return self._self_subject_review(request)
        writes = {kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE}
        if request.resource is None or request.action not in writes:
            return await super()._handle(request)  # discovery, list, get, watch: kmock's own
        if request.resource not in self._get_resources():
            raise kmock.KubernetesResourceNotFoundError()
        async with self._write_lock:
            if request.action == kmock.action.CREATE:
                return await self._create(request)
            if request.action == kmock.action.UPDATE:
                return await self._patch(request)
            return await self._delete(request)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """kmock's list, with the current resourceVersion (kmock says "...")."""
        version = str(self._resource_version)
        result = await super()._serve_list(request)
        assert isinstance(result, dict)
        result["metadata"]["resourceVersion"] = version
        return result

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """A watch as on an API server: from `resourceVersion` (the one the list returned),
        the events after it; without, every object as ADDED, then the events. kmock replays
        every object as ADDED even after a list, and subscribes to the events only after
        streaming them, so it loses the writes in between; kopf then handles an object twice
        with the same resourceVersion, its second finalizer patch fails its `test`, and it
        waits for an event that never comes."""
        yield b""  # send the headers now (kmock's convention for an open stream)
        assert request.resource is not None
        bus = self._buses[request.resource]
        since = request.params.get("resourceVersion", "")
        async with self._write_lock:  # no write in flight: the log and the bus agree
            marker = await bus.mark()
            if since.isdigit() and int(since) > 0:
                backlog = [
                    copy.deepcopy(event)
                    for version, resource, event in self._event_log
                    if resource == request.resource and version > int(since)
                ]
            else:
                backlog = [
                    {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                    for (resource, _, _), obj in self.objects.items()
                    if resource == request.resource and not obj.deleted
                ]
        try:
            for event in backlog:
                if self._in_namespace(request, event):
                    yield event
            async for event in bus.stream(since=marker):
                if self._in_namespace(request, event):
                    yield event
        finally:
            await bus.unmark(marker)

    @staticmethod
    def _in_namespace(request: kmock.Request, event: Mapping[str, Any]) -> bool:
        ns = event.get("object", {}).get("metadata", {}).get("namespace")
        return request.namespace in (None, ns)

    def _self_subject_review(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if self.user_info is None:
            raise kmock.KubernetesResourceNotFoundError()
        review = dict(request.data) if isinstance(request.data, Mapping) else {}
        review.update(
            apiVersion="authentication.k8s.io/v1",
            kind="SelfSubjectReview",
            metadata={"creationTimestamp": None},
            status={"userInfo": copy.deepcopy(self.user_info)},
        )
        return aiohttp.web.json_response(review, status=201)

    # ------------------------------------------------------------------------------ helpers
    def _next_version(self) -> str:
        self._resource_version += 1
        return str(self._resource_version)

    def _has_status(self, request: kmock.Request) -> bool:
        assert request.resource is not None
        return (
            request.resource in self.resources
            and "status" in self.resources[request.resource].subresources
        )

    def _key(self, request: kmock.Request, name: str | None = None) -> Any:
        return (request.resource, request.namespace, name or request.name)

    def _live(self, key: Any) -> dict[str, Any]:
        if key not in self.objects or self.objects[key].deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return copy.deepcopy(self.objects[key].raw)

    async def _emit(self, request: kmock.Request, type_: str, obj: dict[str, Any]) -> None:
        assert request.resource is not None
        event = {"type": type_, "object": copy.deepcopy(obj)}
        version = int(obj["metadata"]["resourceVersion"])
        self._event_log.append((version, request.resource, event))  # before any await
        await self._buses[request.resource].put(event)

    # ------------------------------------------------------------------------------ verbs
    async def _create(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if not isinstance(request.data, Mapping):
            raise _error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(dict(request.data))
        meta = obj.setdefault("metadata", {})
        if request.namespace is not None:
            if meta.get("namespace") not in (None, request.namespace):
                raise _error(400, "BadRequest", "metadata.namespace does not match the URL")
            meta["namespace"] = request.namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        if not meta.get("name"):
            raise _error(422, "Invalid", "metadata.name: Required value")
        key = self._key(request, meta["name"])
        if key in self.objects and not self.objects[key].deleted:
            raise _error(409, "AlreadyExists", f"{meta['name']!r} already exists")
        if self._has_status(request):
            obj.pop("status", None)
        meta.update(
            uid=str(uuid.uuid4()),
            resourceVersion=self._next_version(),
            generation=1,
            creationTimestamp=_now(),
        )
        if "dryRun" not in request.params:
            if key in self.objects:
                self.objects[key].create(obj)
            else:
                self.objects[key] = obj
            await self._emit(request, "ADDED", obj)
        return aiohttp.web.json_response(obj, status=201)

    async def _patch(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        key = self._key(request)
        live = self._live(key)
        patch = request.data
        try:
            if isinstance(patch, list):
                new = jsonpatch.apply_patch(live, patch, in_place=False)
            elif isinstance(patch, Mapping):
                wanted = (patch.get("metadata") or {}).get("resourceVersion")
                if wanted is not None and wanted != live["metadata"].get("resourceVersion"):
                    raise _error(409, "Conflict", "the object has been modified")
                new = merge_patch(live, patch)
            else:
                raise _error(400, "BadRequest", "not a JSON patch or merge patch")
        except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as e:
            raise _error(422, "Invalid", f"the patch cannot be applied: {e}") from e
        if self._has_status(request):
            if request.subresource == "status":
                new = {**live, "status": new.get("status")}
            else:
                new = _without(new, "status")
                if "status" in live:
                    new["status"] = live["status"]
        elif request.subresource is not None:
            raise kmock.KubernetesNotFoundError()
        if new.get("status") is None:
            new.pop("status", None)
        meta = new.setdefault("metadata", {})
        for field in ("name", "namespace", "uid", "creationTimestamp", "generation"):
            if field in live["metadata"]:
                meta[field] = live["metadata"][field]
        meta["resourceVersion"] = live["metadata"].get("resourceVersion")
        if new == live:  # nothing changed: no new version, no event
            return aiohttp.web.json_response(live)
        if _without(new, "metadata", "status") != _without(live, "metadata", "status"):
            meta["generation"] = int(live["metadata"].get("generation") or 0) + 1
        meta["resourceVersion"] = self._next_version()
        if "dryRun" in request.params:
            return aiohttp.web.json_response(new)
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.objects[key].delete()  # the last finalizer went: the object goes
            await self._emit(request, "DELETED", new)
        else:
            self.objects[key].history.append(new)
            await self._emit(request, "MODIFIED", new)
        return aiohttp.web.json_response(new)

    async def _delete(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        key = self._key(request)
        live = self._live(key)
        meta = live["metadata"]
        options = request.data if isinstance(request.data, Mapping) else {}
        for field, wanted in (options.get("preconditions") or {}).items():
            if field in ("uid", "resourceVersion") and wanted != meta.get(field):
                raise _error(409, "Conflict", f"precondition failed: {field} is not {wanted}")
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                meta.update(
                    deletionTimestamp=_now(),
                    deletionGracePeriodSeconds=0,
                    resourceVersion=self._next_version(),
                )
                self.objects[key].history.append(live)
                await self._emit(request, "MODIFIED", live)
            return aiohttp.web.json_response(live)
        meta["resourceVersion"] = self._next_version()
        self.objects[key].delete()
        await self._emit(request, "DELETED", live)
        return aiohttp.web.json_response(live)


def declare_crds(api: kmock.KubernetesEmulator, crd_dir: Path = CRD_DIR) -> None:
    """The bundled built-in kinds, and every served version of the CRDs in `crd_dir`."""
    api.resources.load_bundled()
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            api.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = (
                kmock.ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular"),
                    namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                    verbs={
                        "create",
                        "delete",
                        "deletecollection",
                        "get",
                        "list",
                        "patch",
                        "update",
                        "watch",
                    },
                    shortnames=set(names.get("shortNames", [])),
                    categories=set(names.get("categories", [])),
                    subresources=set(version.get("subresources", {})),
                )
            )


class OperatorThread:
    """The real operator: `kopf.operator()` with pgwarden's registry, watching one namespace, in
    a thread with its own event loop (the tests and bench/operator.py run it this way)."""

    def __init__(
        self,
        server: str,
        namespace: str,
        image: str,
        timeout: float = 15,
        defaults: OperatorDefaults | None = None,
    ) -> None:
        self.server = server
        self.namespace = namespace
        self.image = image
        self.timeout = timeout
        self.defaults = defaults or OperatorDefaults()
        self.op = Operator(server=server, image=image, defaults=self.defaults)
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kopf", daemon=True)

    def again(self) -> OperatorThread:
        """A new operator for the same API (a restart)."""
        return OperatorThread(self.server, self.namespace, self.image, self.timeout, self.defaults)

    def _run(self) -> None:
        settings = kopf.OperatorSettings()
        # kmock 0.8 cannot parse /api/v1/namespaces (it takes "namespaces" for the start of
        # /namespaces/{ns}/...), which kopf's namespace and CRD scanning lists and watches;
        # with one fixed namespace and the CRDs declared up front, scanning has nothing to find
        settings.scanning.disabled = True
        try:
            asyncio.run(
                kopf.operator(
                    settings=settings,
                    registry=make_registry(self.op),
                    namespaces=[self.namespace],
                    standalone=True,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                )
            )
        except BaseException as e:  # reported by start() and stop()
            self.error = e

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    async def start(self) -> None:
        self.thread.start()
        loop = asyncio.get_running_loop()
        ready = await loop.run_in_executor(None, self.ready_flag.wait, self.timeout)
        assert ready, f"kopf did not start: {self.error!r}"

    async def stop(self) -> None:
        self.stop_flag.set()
        await asyncio.get_running_loop().run_in_executor(None, self.thread.join, self.timeout)
        assert not self.thread.is_alive(), "kopf did not stop"
        assert self.error is None, f"kopf failed: {self.error!r}"
