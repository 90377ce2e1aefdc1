"""The real kopf operator (in a thread, its own event loop) against kmock over HTTP on 127.0.0.1.

kmock (tests/kmockapi.py) runs in the test's event loop; the test writes objects through the
operator's own client (`pgwarden_operator.k8s.Api`) and reads the emulator's memory, polling
with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import kmock
import pytest
import yaml

from pgwarden.api.resources import (
    API_VERSION,
    AccessPolicyStatus,
    DatabaseConnectionStatus,
)
from pgwarden_operator import builders
from pgwarden_operator.config import OperatorDefaults
from pgwarden_operator.handlers import FINALIZER
from pgwarden_operator.k8s import Api, ApiPermanentError, ApiTemporaryError
from tests.kmockapi import ApiServer, OperatorThread, declare_crds

NS = "data"
IMAGE = "registry.example/pgwarden:test"
CONNECTIONS = f"{API_VERSION}/databaseconnections"
POLICIES = f"{API_VERSION}/accesspolicies"
T = TypeVar("T")

# kmock's load_bundled() reads its resource list with importlib.resources.read_binary
pytestmark = pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning")


def connection(name: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "host": "orders.db.example",
        "database": "orders",
        "credentialsSecretRef": {"name": f"{name}-credentials"},
        "tls": {"sslmode": "require"},
        "proxy": {"replicas": 2},
        "auth": {"oidc": {"issuer": "https://idp.example.com"}},
        **over,
    }
    return {
        "apiVersion": API_VERSION,
        "kind": "DatabaseConnection",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def access_policy(name: str, connections: list[str], **over: Any) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "connections": connections,
            "subjects": {"groups": ["analysts"]},
            "access": "read-only",
            **over,
        },
    }


class Cluster:
    def __init__(self, server: ApiServer, client: Api, operator: OperatorThread) -> None:
        self.server, self.client, self.operator = server, client, operator

    async def restart(self) -> None:
        await self.operator.stop()
        self.operator = self.operator.again()
        await self.operator.start()

    async def settle(self, quiet: float = 0.5, within: float = 10.0) -> None:
        """Wait until no write has reached the API server for `quiet` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within

        def writes() -> int:
            return sum(1 for r in list(self.server) if r.method in ("POST", "PATCH", "DELETE"))

        count, since = writes(), loop.time()
        while loop.time() - since < quiet:
            assert loop.time() < deadline, "the operator keeps writing"
            await asyncio.sleep(0.05)
            if (now := writes()) != count:
                count, since = now, loop.time()

    def get(self, resource: str, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), NS, name)
        if key not in self.server.objects or self.server.objects[key].deleted:
            return None
        return self.server.objects[key].raw

    def versions(self, resource: str, name: str) -> int:
        return len(self.server.objects[kmock.resource(resource), NS, name].history)

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.client.create(obj)

    async def patch(self, resource: str, name: str, patch: dict[str, Any]) -> None:
        group_version, plural = resource.rsplit("/", 1)
        await self.client.patch(group_version, plural, NS, name, patch)

    async def delete(self, resource: str, name: str) -> None:
        group_version, plural = resource.rsplit("/", 1)
        base = "/api" if "/" not in group_version else "/apis"
        async with self.server.delete(f"{base}/{group_version}/namespaces/{NS}/{plural}/{name}"):
            pass

    async def eventually(self, check: Callable[[], T | None], what: str, within: float = 10.0) -> T:
        """Poll `check` until it returns something truthy (or the deadline passes)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        last: BaseException | None = None
        while True:
            assert self.operator.alive(), f"the operator died: {self.operator.error!r}"
            try:
                result = check()
                if result:
                    return result
            except (KeyError, AssertionError, TypeError) as e:
                last = e
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
            await asyncio.sleep(0.05)

    def status(self, resource: str, name: str) -> dict[str, Any]:
        return dict((self.get(resource, name) or {}).get("status") or {})

    def annotations(self, resource: str, name: str) -> dict[str, str]:
        return dict((self.get(resource, name) or {}).get("metadata", {}).get("annotations") or {})

    def is_true(self, resource: str, name: str, type_: str) -> bool:
        cond = self.condition(resource, name, type_)
        return cond is not None and cond["status"] == "True"

    def condition(self, resource: str, name: str, type_: str) -> dict[str, Any] | None:
        for cond in self.status(resource, name).get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return None


@contextlib.asynccontextmanager
async def running_cluster(defaults: OperatorDefaults | None = None) -> AsyncIterator[Cluster]:
    """The emulated API server with pgwarden's CRDs, a client, and the operator running."""
    async with ApiServer() as server, kmock.Server(server):
        declare_crds(server)
        url = str(server.url)
        async with Api(url) as client:
            operator = OperatorThread(url, NS, IMAGE, defaults=defaults)
            await operator.start()
            c = Cluster(server, client, operator)
            try:
                yield c
            finally:
                await c.operator.stop()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with running_cluster() as c:
        yield c


def bundle_policies(cm: dict[str, Any] | None) -> list[str] | None:
    if cm is None:
        return None
    config = yaml.safe_load(cm["data"][builders.BUNDLE_KEY])
    return [p["name"] for p in config.get("policies") or []]


def template_hash(deploy: dict[str, Any] | None) -> str | None:
    if deploy is None:
        return None
    annotations = deploy["spec"]["template"]["metadata"]["annotations"]
    return str(annotations[builders.SPEC_HASH_ANNOTATION])


async def test_connection_renders_its_proxy_and_follows_changes(cluster: Cluster) -> None:
    await cluster.create(access_policy("analysts", ["orders"]))
    created = await cluster.create(connection("orders"))
    uid = created["metadata"]["uid"]

    await cluster.eventually(
        lambda: cluster.is_true(CONNECTIONS, "orders", "Ready"), "DatabaseConnection Ready=True"
    )
    conn = cluster.get(CONNECTIONS, "orders")
    assert conn is not None
    status = DatabaseConnectionStatus.model_validate(conn["status"])  # the CRD's shape
    assert status.endpoint == "orders-proxy.data.svc:5432"
    assert status.policies == ["analysts"]
    assert status.observed_generation == 1
    assert status.conditions[0].reason == "Reconciled"

    cm = cluster.get("v1/configmaps", "orders-proxy")
    deploy = cluster.get("apps/v1/deployments", "orders-proxy")
    svc = cluster.get("v1/services", "orders-proxy")
    pdb = cluster.get("policy/v1/poddisruptionbudgets", "orders-proxy")
    # the proxy's service account and its right to ApprovalRequests, which the pods need
    assert cluster.get("v1/serviceaccounts", "orders-proxy") is not None
    role = cluster.get("rbac.authorization.k8s.io/v1/roles", "orders-proxy")
    assert role is not None
    assert {r for rule in role["rules"] for r in rule["resources"]} == {
        "approvalrequests",
        "approvalrequests/status",
    }
    assert cluster.get("rbac.authorization.k8s.io/v1/rolebindings", "orders-proxy") is not None
    assert cm is not None
    assert deploy is not None
    assert svc is not None
    assert pdb is not None
    assert bundle_policies(cm) == ["analysts"]
    for child in (cm, deploy, svc, pdb):
        (owner,) = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("DatabaseConnection", "orders", uid)
    first_hash = template_hash(deploy)
    assert first_hash == status.spec_hash
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert svc["spec"]["ports"][0]["port"] == 5432
    assert pdb["spec"] == {
        "minAvailable": 1,
        "selector": {"matchLabels": builders.selector_labels("orders")},
    }

    # kopf's marks are under pgwarden.io; the connection needs no finalizer (owner references)
    def kopf_done() -> dict[str, str] | None:
        a = cluster.annotations(CONNECTIONS, "orders")
        return a if "pgwarden.io/last-handled-configuration" in a else None

    annotations = await cluster.eventually(kopf_done, "kopf's diff-base annotation")
    conn = cluster.get(CONNECTIONS, "orders")
    assert conn is not None
    assert not any(k.startswith("kopf.zalando.org") for k in annotations)
    assert FINALIZER not in conn["metadata"].get("finalizers", [])

    # a restart-only change (the database host): a new spec hash rolls the pods
    await cluster.patch(CONNECTIONS, "orders", {"spec": {"host": "orders-2.db.example"}})

    def new_hash() -> str | None:
        h = template_hash(cluster.get("apps/v1/deployments", "orders-proxy"))
        return h if h != first_hash else None

    rolled = await cluster.eventually(new_hash, "a new spec hash on the Deployment")
    await cluster.eventually(
        lambda: (
            cluster.status(CONNECTIONS, "orders").items()
            >= {"specHash": rolled, "observedGeneration": 2}.items()
        ),
        "status.specHash and observedGeneration follow the spec",
    )
    cm = cluster.get("v1/configmaps", "orders-proxy")
    assert cm is not None
    assert "orders-2.db.example" in cm["data"][builders.BUNDLE_KEY]

    # a new policy: the bundle gains it, the pod template stays as it is (a live reload)
    deploy_before = cluster.get("apps/v1/deployments", "orders-proxy")
    assert deploy_before is not None
    deploy_versions = cluster.versions("apps/v1/deployments", "orders-proxy")
    await cluster.create(access_policy("auditors", ["*"]))
    both = ["analysts", "auditors"]
    await cluster.eventually(
        lambda: bundle_policies(cluster.get("v1/configmaps", "orders-proxy")) == both,
        "the ConfigMap's bundle with both policies",
    )
    await cluster.eventually(
        lambda: cluster.status(POLICIES, "auditors").get("connections") == ["orders"],
        "AccessPolicy status.connections",
    )
    await cluster.eventually(
        lambda: cluster.status(CONNECTIONS, "orders").get("policies") == both,
        "DatabaseConnection status.policies",
    )
    assert cluster.get("apps/v1/deployments", "orders-proxy") == deploy_before
    assert cluster.versions("apps/v1/deployments", "orders-proxy") == deploy_versions

    # deleting a policy (held by the operator's finalizer until the bundle is re-rendered)
    policy = cluster.get(POLICIES, "auditors")
    assert policy is not None
    assert FINALIZER in policy["metadata"]["finalizers"]
    await cluster.delete(POLICIES, "auditors")
    await cluster.eventually(
        lambda: cluster.get(POLICIES, "auditors") is None, "the policy gone (finalizer removed)"
    )
    assert bundle_policies(cluster.get("v1/configmaps", "orders-proxy")) == ["analysts"]


async def test_restart_and_replayed_events_change_nothing(cluster: Cluster) -> None:
    """A restarted operator resumes every object (and kmock replays each as ADDED): the
    handlers run again, read everything, and write nothing."""
    await cluster.create(access_policy("analysts", ["orders"]))
    await cluster.create(connection("orders"))
    await cluster.eventually(
        lambda: cluster.is_true(CONNECTIONS, "orders", "Ready"), "the first reconcile"
    )
    await cluster.eventually(
        lambda: cluster.condition(POLICIES, "analysts", "ConnectionsResolved"),
        "the policy's status",
    )
    await cluster.settle()
    watched = [
        (CONNECTIONS, "orders"),
        (POLICIES, "analysts"),
        ("v1/configmaps", "orders-proxy"),
        ("apps/v1/deployments", "orders-proxy"),
        ("v1/services", "orders-proxy"),
        ("policy/v1/poddisruptionbudgets", "orders-proxy"),
    ]
    before = [cluster.versions(k, n) for k, n in watched]

    await cluster.restart()
    # the resumed connection handler reads its children again: wait for that, then settle
    seen = len(list(cluster.server))
    await cluster.eventually(
        lambda: sum(
            1
            for r in list(cluster.server)[seen:]
            if r.method == "GET" and r.url.path.endswith("/poddisruptionbudgets/orders-proxy")
        ),
        "the resumed reconcile",
    )
    await cluster.settle()
    assert [cluster.versions(k, n) for k, n in watched] == before


async def test_invalid_connection_spec_is_reported_and_the_operator_lives_on(
    cluster: Cluster,
) -> None:
    await cluster.create(connection("broken", port=70000))
    cond = await cluster.eventually(
        lambda: cluster.condition(CONNECTIONS, "broken", "Ready"), "a Ready condition"
    )
    assert cond["status"] == "False"
    assert cond["reason"] == "InvalidSpec"
    assert "spec.port" in cond["message"]
    DatabaseConnectionStatus.model_validate(cluster.get(CONNECTIONS, "broken")["status"])  # type: ignore[index]
    assert cluster.get("apps/v1/deployments", "broken-proxy") is None
    # an event for people running kubectl describe
    await cluster.eventually(
        lambda: any(
            e["reason"] == "InvalidSpec" and e["involvedObject"]["name"] == "broken"
            for e in _events(cluster)
        ),
        "an InvalidSpec event",
    )
    # the operator still serves: a valid connection next to it gets its proxy
    await cluster.create(connection("orders"))
    await cluster.eventually(
        lambda: cluster.get("apps/v1/deployments", "orders-proxy"), "the valid one's Deployment"
    )
    # and fixing the spec makes it Ready
    await cluster.patch(CONNECTIONS, "broken", {"spec": {"port": 5433}})
    await cluster.eventually(
        lambda: cluster.is_true(CONNECTIONS, "broken", "Ready"), "Ready=True after the fix"
    )


def _events(cluster: Cluster) -> list[dict[str, Any]]:
    return [
        obj.raw
        for (res, _ns, _name), obj in cluster.server.objects.items()
        if res.plural == "events" and not obj.deleted
    ]


async def test_policy_naming_a_missing_connection_says_so(cluster: Cluster) -> None:
    await cluster.create(access_policy("analysts", ["ghost"]))
    cond = await cluster.eventually(
        lambda: cluster.condition(POLICIES, "analysts", "ConnectionsResolved"),
        "ConnectionsResolved",
    )
    assert cond["status"] == "False"
    assert cond["reason"] == "MissingConnection"
    assert "ghost" in cond["message"]
    status = AccessPolicyStatus.model_validate(cluster.get(POLICIES, "analysts")["status"])  # type: ignore[index]
    assert status.connections == []
    assert cluster.condition(POLICIES, "analysts", "Valid")["status"] == "True"  # type: ignore[index]

    # the connection appears: the policy's status catches up
    await cluster.create(connection("ghost"))
    await cluster.eventually(
        lambda: cluster.is_true(POLICIES, "analysts", "ConnectionsResolved"),
        "ConnectionsResolved=True once the connection exists",
    )
    assert bundle_policies(cluster.get("v1/configmaps", "ghost-proxy")) == ["analysts"]


async def test_invalid_policy_is_reported(cluster: Cluster) -> None:
    await cluster.create(access_policy("bad", ["*"], access="everything"))
    cond = await cluster.eventually(
        lambda: cluster.condition(POLICIES, "bad", "Valid"), "a Valid condition"
    )
    assert cond["status"] == "False"
    assert cond["reason"] == "InvalidSpec"
    assert "spec.access" in cond["message"]
    # an invalid policy grants nothing
    await cluster.create(connection("orders"))
    await cluster.eventually(
        lambda: bundle_policies(cluster.get("v1/configmaps", "orders-proxy")) == [],
        "a bundle without the invalid policy",
    )


async def test_client_classifies_errors_for_kopf() -> None:
    async with ApiServer() as server, kmock.Server(server):
        declare_crds(server)
        url = str(server.url)
        async with Api(url) as client:
            nameless = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"namespace": NS}}
            with pytest.raises(ApiPermanentError) as invalid:
                await client.create(nameless)
            assert invalid.value.status == 422
            cm = {**nameless, "metadata": {"namespace": NS, "name": "x"}, "data": {"a": "1"}}
            assert (await client.apply(cm))[0] == "created"
            assert (await client.apply(cm))[0] == "unchanged"
            with pytest.raises(ApiTemporaryError) as taken:
                await client.create(cm)
            assert taken.value.status == 409
            changed, live = await client.apply({**cm, "data": {"b": "2"}})
            assert changed == "patched"
            assert live["data"] == {"b": "2"}  # a key no longer rendered goes
            assert await client.get("v1", "configmaps", NS, "absent") is None
    # nothing listens there any more
    async with Api(url) as client:
        with pytest.raises(ApiTemporaryError) as down:
            await client.get("v1", "configmaps", NS, "x")
        assert down.value.status is None


async def test_ready_replicas_follow_the_proxy_deployment(cluster: Cluster) -> None:
    """The printer column READY comes from the Deployment's status, without a re-render."""
    await cluster.create(connection("orders"))
    await cluster.eventually(lambda: cluster.is_true(CONNECTIONS, "orders", "Ready"), "Ready")
    assert cluster.status(CONNECTIONS, "orders")["readyReplicas"] == 0
    configmap_versions = cluster.versions("v1/configmaps", "orders-proxy")
    await cluster.client.patch(
        "apps/v1",
        "deployments",
        NS,
        "orders-proxy",
        {"status": {"replicas": 2, "readyReplicas": 2}},
        subresource="status",
    )
    await cluster.eventually(
        lambda: cluster.status(CONNECTIONS, "orders").get("readyReplicas") == 2,
        "status.readyReplicas from the Deployment",
    )
    assert cluster.versions("v1/configmaps", "orders-proxy") == configmap_versions


async def test_deleted_connection_leaves_the_policy_statuses(cluster: Cluster) -> None:
    await cluster.create(connection("orders"))
    await cluster.create(access_policy("named", ["orders"]))
    await cluster.create(access_policy("everyone", ["*"]))
    for name in ("named", "everyone"):
        await cluster.eventually(
            lambda name=name: cluster.is_true(POLICIES, name, "ConnectionsResolved"),  # type: ignore[misc]
            f"{name} resolved",
        )
    await cluster.delete(CONNECTIONS, "orders")
    named = await cluster.eventually(
        lambda: (
            (c := cluster.condition(POLICIES, "named", "ConnectionsResolved"))
            and c["status"] == "False"
            and c
        ),
        "the named policy's status after the deletion",
    )
    assert named["reason"] == "MissingConnection"
    everyone = await cluster.eventually(
        lambda: (
            (c := cluster.condition(POLICIES, "everyone", "ConnectionsResolved"))
            and c["status"] == "False"
            and c
        ),
        "the * policy's status after the deletion",
    )
    assert everyone["reason"] == "NoConnection"
    assert cluster.status(POLICIES, "named")["connections"] == []


async def test_a_connection_without_auth_takes_the_operators_defaults() -> None:
    defaults = OperatorDefaults.model_validate(
        {
            "oidc": {"issuer": "https://default-idp.example.com", "audience": "pgwarden"},
            "recording": {"sink": {"file": {"dir": "/var/lib/pgwarden/recordings"}}},
        }
    )
    async with running_cluster(defaults) as cluster:
        bare = connection("orders")
        del bare["spec"]["auth"]
        await cluster.create(bare)
        await cluster.eventually(lambda: cluster.is_true(CONNECTIONS, "orders", "Ready"), "Ready")
        cm = cluster.get("v1/configmaps", "orders-proxy")
        assert cm is not None
        config = yaml.safe_load(cm["data"][builders.BUNDLE_KEY])
        assert config["auth"]["oidc"]["issuer"] == "https://default-idp.example.com"
        assert config["recording"]["sink"]["file"] == {"dir": "/var/lib/pgwarden/recordings"}
        # its own auth replaces the default as a whole
        await cluster.create(connection("billing"))
        await cluster.eventually(lambda: cluster.is_true(CONNECTIONS, "billing", "Ready"), "Ready")
        billing = cluster.get("v1/configmaps", "billing-proxy")
        assert billing is not None
        own = yaml.safe_load(billing["data"][builders.BUNDLE_KEY])
        assert own["auth"]["oidc"]["issuer"] == "https://idp.example.com"


async def test_a_connection_without_auth_and_no_default_says_what_to_set(cluster: Cluster) -> None:
    bare = connection("orders")
    del bare["spec"]["auth"]
    await cluster.create(bare)
    cond = await cluster.eventually(
        lambda: cluster.condition(CONNECTIONS, "orders", "Ready"), "a Ready condition"
    )
    assert (cond["status"], cond["reason"]) == ("False", "InvalidSpec")
    assert "spec.auth.oidc" in cond["message"]
    assert "defaults.oidc" in cond["message"]
    assert cluster.get("apps/v1/deployments", "orders-proxy") is None


async def test_a_spool_volume_swaps_the_deployment_for_a_stateful_set(cluster: Cluster) -> None:
    """Setting spec.proxy.spoolVolume moves the proxies to a StatefulSet (a claim per replica);
    the old Deployment goes once the StatefulSet is applied; removing it swaps back."""
    await cluster.create(connection("orders"))
    await cluster.eventually(
        lambda: cluster.get("apps/v1/deployments", "orders-proxy"), "the Deployment"
    )
    await cluster.patch(
        CONNECTIONS, "orders", {"spec": {"proxy": {"spoolVolume": {"size": "3Gi"}}}}
    )
    sts = await cluster.eventually(
        lambda: cluster.get("apps/v1/statefulsets", "orders-proxy"), "the StatefulSet"
    )
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"] == {
        "storage": "3Gi"
    }
    await cluster.eventually(
        lambda: cluster.get("apps/v1/deployments", "orders-proxy") is None,
        "the Deployment deleted",
    )
    await cluster.eventually(lambda: cluster.is_true(CONNECTIONS, "orders", "Ready"), "Ready")
    # back to an emptyDir spool
    await cluster.patch(CONNECTIONS, "orders", {"spec": {"proxy": {"spoolVolume": None}}})
    await cluster.eventually(
        lambda: cluster.get("apps/v1/deployments", "orders-proxy"), "the Deployment again"
    )
    await cluster.eventually(
        lambda: cluster.get("apps/v1/statefulsets", "orders-proxy") is None,
        "the StatefulSet deleted",
    )


async def test_a_workload_the_connection_does_not_own_is_left_alone(cluster: Cluster) -> None:
    """A same-named StatefulSet that someone else made is not the operator's to delete."""
    await cluster.create(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "orders-proxy", "namespace": NS},
            "spec": {
                "serviceName": "x",
                "selector": {"matchLabels": {"app": "x"}},
                "template": {"metadata": {"labels": {"app": "x"}}, "spec": {"containers": []}},
            },
        }
    )
    await cluster.create(connection("orders"))
    await cluster.eventually(lambda: cluster.is_true(CONNECTIONS, "orders", "Ready"), "Ready")
    await cluster.settle()
    assert cluster.get("apps/v1/statefulsets", "orders-proxy") is not None
