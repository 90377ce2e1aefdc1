"""The operator at scale: N DatabaseConnections and M AccessPolicies in one namespace.

    .venv/bin/python bench/operator.py [--connections 200] [--policies 500] [--json FILE]

The real kopf operator (pgwarden's registry) runs in a thread with its own event loop against
kmock extended as an API server (tests/kmockapi.py) on 127.0.0.1, as in
tests/integration/test_operator.py. Both are in this one process: the API server, the
operator and this script's polling share the GIL and, on a small machine, the cores.

Policies select connections by name: most select 2 or 3 named connections (chosen with a fixed
seed), `--star` of them select "*". Phases:

1. create the connections, then the policies; measure the time until every connection is
   Ready=True with status.policies and its ConfigMap bundle holding exactly the policies that
   select it (checked for all), then until every policy's status.connections is right, then
   until the operator stops writing; count the API writes;
2. add a denied statement class to a policy that selects "*": the time until every bundle has it;
3. the same for a policy that selects 3 connections;

and the Deployment writes during 2 and 3 (policies are live-reloaded: must be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import logging
import random
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# this file shadows the standard library's `operator` for anything imported from bench/
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.kmockapi

import kmock  # noqa: E402
import yaml  # noqa: E402

from pgwarden.api.resources import API_VERSION  # noqa: E402
from pgwarden_operator import builders  # noqa: E402
from pgwarden_operator.k8s import Api  # noqa: E402
from tests.kmockapi import ApiServer, OperatorThread, declare_crds  # noqa: E402

NS = "bench"
IMAGE = "registry.example/pgwarden:bench"
CONNECTIONS = kmock.resource(f"{API_VERSION}/databaseconnections")
POLICIES = kmock.resource(f"{API_VERSION}/accesspolicies")
CONFIGMAPS = kmock.resource("v1/configmaps")
WRITES = ("POST", "PATCH", "PUT", "DELETE")
NOOP_WRITES = tuple(f"NOOP-{m}" for m in WRITES)
_BUMPED: contextvars.ContextVar[list[bool]] = contextvars.ContextVar("bumped")
Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def is_write(method: str) -> bool:
    """POST, PATCH, PUT, DELETE; `NOOP-PATCH`: a write request that changed nothing."""
    return method in WRITES or method in NOOP_WRITES


def connection(name: str) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "DatabaseConnection",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "host": f"{name}.db.example",
            "database": "app",
            "credentialsSecretRef": {"name": f"{name}-credentials"},
            "tls": {"sslmode": "require"},
            "proxy": {"replicas": 2},
            "auth": {"oidc": {"issuer": "https://idp.example.com"}},
        },
    }


def access_policy(name: str, connections: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "AccessPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "connections": connections,
            "subjects": {"groups": [f"team-{name}"]},
            "access": "read-only",
            "guardrails": {"deny": ["drop", "truncate"], "maxRows": 10000},
            "masking": [{"columns": ["*.email"], "strategy": "redact"}],
        },
    }


def plan(n: int, m: int, star: int, seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """Connection names, and each policy's spec.connections (`star` of them "*", spread out)."""
    rng = random.Random(seed)
    conns = [f"db-{i:04d}" for i in range(n)]
    stars = {round(k * m / star) for k in range(star)} if star else set()
    policies: dict[str, list[str]] = {}
    for j in range(m):
        name = f"policy-{j:04d}"
        if j in stars:
            policies[name] = ["*"]
        else:
            policies[name] = sorted(rng.sample(conns, min(n, rng.choice((2, 3)))))
    return conns, policies


class BenchServer(ApiServer):
    """ApiServer that keeps its own log of (method, plural[/subresource]) and forgets a request
    once answered. kmock matches each request against its reactions by iterating over every
    request served so far (`request in payload._source`), so a long run slows quadratically:
    with the full log, 10 connections and 25 policies already took ~10 s per reconcile."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    async def _handle(self, request: kmock.Request) -> Any:
        what = str(request.resource.plural if request.resource is not None else request.url.path)
        if request.subresource:
            what += "/" + request.subresource
        method = str(request.method.value)
        bumped: list[bool] = []
        _BUMPED.set(bumped)  # each request is served in its own task
        try:
            return await super()._handle(request)
        finally:
            # a write that changed nothing (no new resourceVersion) is logged as `NOOP-PATCH`
            if method in WRITES and not bumped:
                method = f"NOOP-{method}"
            self.log.append((method, what))
            for i, r in enumerate(self._requests):
                if r is request:
                    del self._requests[i]
                    break

    def _next_version(self) -> str:
        _BUMPED.get([]).append(True)
        return super()._next_version()


class Bench:
    def __init__(self, server: BenchServer, client: Api, operator: OperatorThread) -> None:
        self.server, self.client, self.operator = server, client, operator
        self._bundles: dict[str, tuple[str, dict[str, Any]]] = {}  # name -> (rv, policies)
        self._counted = self._counted_writes = 0

    # ------------------------------------------------------------------------------ reads
    def obj(self, resource: Any, name: str) -> dict[str, Any] | None:
        key = (resource, NS, name)
        if key not in self.server.objects or self.server.objects[key].deleted:
            return None
        raw: dict[str, Any] = self.server.objects[key].raw
        return raw

    def bundle(self, conn: str) -> dict[str, Any] | None:
        """policy name -> spec in the connection's ConfigMap (parsed once per version)."""
        cm = self.obj(CONFIGMAPS, builders.proxy_name(conn))
        if cm is None:
            return None
        rv = cm["metadata"]["resourceVersion"]
        cached = self._bundles.get(conn)
        if cached is None or cached[0] != rv:
            config = yaml.load(cm["data"][builders.BUNDLE_KEY], Loader=Loader)
            cached = (rv, {p["name"]: p["spec"] for p in config.get("policies") or []})
            self._bundles[conn] = cached
        return cached[1]

    def connection_ok(self, conn: str, expected: list[str]) -> bool:
        obj = self.obj(CONNECTIONS, conn)
        status = (obj or {}).get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        if not ready or status.get("policies") != expected:
            return False
        bundle = self.bundle(conn)
        return bundle is not None and sorted(bundle) == expected

    def policy_ok(self, name: str, expected: list[str]) -> bool:
        status = (self.obj(POLICIES, name) or {}).get("status") or {}
        resolved = any(
            c.get("type") == "ConnectionsResolved" and c.get("status") == "True"
            for c in status.get("conditions") or []
        )
        return resolved and status.get("connections") == expected

    # ------------------------------------------------------------------------------ writes
    def mark(self) -> int:
        return len(self.server.log)

    def writes(self, since: int, until: int | None = None) -> Counter[str]:
        """API writes by `METHOD plural[/subresource]` between two marks."""
        return Counter(f"{m} {what}" for m, what in self.server.log[since:until] if is_write(m))

    def reads(self, since: int, until: int | None = None) -> Counter[str]:
        return Counter(f"{m} {what}" for m, what in self.server.log[since:until] if not is_write(m))

    # ------------------------------------------------------------------------------ waiting
    async def until(
        self, what: str, pending: Callable[[], int], total: int, t0: float, limit: float
    ) -> float | None:
        """Seconds from t0 until `pending()` (the number of objects not yet right) is 0;
        None after `limit` seconds. Progress to stderr every 10 s."""
        last_report = time.monotonic()
        while True:
            if self.operator.error is not None or not self.operator.thread.is_alive():
                raise RuntimeError(f"the operator died: {self.operator.error!r}")
            left = pending()
            now = time.monotonic()
            if left == 0:
                return now - t0
            if now - t0 > limit:
                print(f"  {what}: gave up after {limit:.0f} s, {left}/{total} left", flush=True)
                return None
            if now - last_report > 10:
                print(
                    f"  {what}: {now - t0:6.1f} s, {total - left}/{total} done, "
                    f"{self.mark()} requests so far",
                    file=sys.stderr,
                    flush=True,
                )
                last_report = now
            await asyncio.sleep(0.25)

    async def settle(self, t0: float, quiet: float, limit: float) -> float | None:
        """Seconds from t0 until the last write before `quiet` seconds without one."""
        count, since = self._write_count(), time.monotonic()
        while time.monotonic() - since < quiet:
            if time.monotonic() - t0 > limit:
                return None
            await asyncio.sleep(0.1)
            if (now := self._write_count()) != count:
                count, since = now, time.monotonic()
        return since - t0

    def _write_count(self) -> int:
        self._counted_writes += sum(1 for m, _ in self.server.log[self._counted :] if is_write(m))
        self._counted = len(self.server.log)
        return self._counted_writes


def pending_connections(
    bench: Bench, conns: list[str], expected: dict[str, list[str]]
) -> Callable[[], int]:
    left = set(conns)

    def check() -> int:
        left.difference_update([c for c in left if bench.connection_ok(c, expected[c])])
        return len(left)

    return check


async def create_all(client: Api, objs: list[dict[str, Any]], concurrency: int = 8) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(obj: dict[str, Any]) -> None:
        async with sem:
            await client.create(obj)

    await asyncio.gather(*(one(o) for o in objs))


async def change_policy(
    bench: Bench, name: str, conns: list[str], denied: str, limit: float, quiet: float
) -> dict[str, Any]:
    """Add `denied` to the policy's guardrails.deny; the time until the bundles of `conns` all
    have it, and until the operator is quiet again."""
    spec = (bench.obj(POLICIES, name) or {})["spec"]
    deny = [*spec["guardrails"]["deny"], denied]
    before_cms = {c: bench.obj(CONFIGMAPS, builders.proxy_name(c)) for c in conns}
    other_cm_versions = {
        key[2]: len(obj.history)
        for key, obj in bench.server.objects.items()
        if key[0] == CONFIGMAPS and key[2] not in {builders.proxy_name(c) for c in conns}
    }
    m0 = bench.mark()
    t0 = time.monotonic()
    await bench.client.patch(
        API_VERSION, "accesspolicies", NS, name, {"spec": {"guardrails": {"deny": deny}}}
    )
    left = set(conns)

    def pending() -> int:
        for c in list(left):
            b = bench.bundle(c)
            if b is not None and denied in b.get(name, {}).get("guardrails", {}).get("deny", []):
                left.discard(c)
        return len(left)

    reflected = await bench.until(f"change {name}", pending, len(conns), t0, limit)
    quiet_at = await bench.settle(t0, quiet, limit)
    writes = bench.writes(m0)
    others_written = sum(
        1
        for key, obj in bench.server.objects.items()
        if key[0] == CONFIGMAPS
        and key[2] in other_cm_versions
        and len(obj.history) != other_cm_versions[key[2]]
    )
    assert all(before_cms.values())
    return {
        "policy": name,
        "connections": len(conns),
        "reflected_s": reflected,
        "quiet_s": quiet_at,
        "writes": dict(sorted(writes.items())),
        "configmap_writes": sum(v for k, v in writes.items() if k.endswith(" configmaps")),
        "deployment_writes": sum(v for k, v in writes.items() if k.endswith(" deployments")),
        "other_configmaps_written": others_written,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    conns, policies = plan(args.connections, args.policies, args.star, args.seed)
    expected = {
        c: sorted(p for p, sel in policies.items() if "*" in sel or c in sel) for c in conns
    }
    expected_policies = {p: conns if "*" in sel else sel for p, sel in policies.items()}
    result: dict[str, Any] = {
        "connections": len(conns),
        "policies": len(policies),
        "star_policies": sum(1 for s in policies.values() if "*" in s),
        "policies_per_connection": round(sum(map(len, expected.values())) / len(conns), 2),
    }
    async with BenchServer() as server, kmock.Server(server):
        declare_crds(server)
        url = str(server.url)
        async with Api(url) as client:
            operator = OperatorThread(url, NS, IMAGE, timeout=30)
            await operator.start()
            bench = Bench(server, client, operator)
            try:
                # 1. everything created -------------------------------------------------
                m0 = bench.mark()
                t0 = time.monotonic()
                await create_all(client, [connection(c) for c in conns])
                result["connections_created_s"] = time.monotonic() - t0
                await create_all(client, [access_policy(p, s) for p, s in policies.items()])
                result["all_created_s"] = time.monotonic() - t0
                print(f"created in {result['all_created_s']:.1f} s", file=sys.stderr)
                result["converged_s"] = await bench.until(
                    "connections",
                    pending_connections(bench, conns, expected),
                    len(conns),
                    t0,
                    args.timeout,
                )
                left_p = set(policies)

                def pending_policies() -> int:
                    left_p.difference_update(
                        [p for p in left_p if bench.policy_ok(p, expected_policies[p])]
                    )
                    return len(left_p)

                result["policy_statuses_s"] = await bench.until(
                    "policy statuses", pending_policies, len(policies), t0, args.timeout
                )
                result["quiet_s"] = await bench.settle(t0, args.quiet, args.timeout)
                writes = bench.writes(m0)
                result["create_writes_by_us"] = len(conns) + len(policies)
                result["writes"] = dict(sorted(writes.items()))
                result["writes_total"] = sum(writes.values())
                result["writes_noop"] = sum(v for k, v in writes.items() if k.startswith("NOOP-"))
                result["requests_total"] = bench.mark() - m0
                result["reads"] = dict(bench.reads(m0).most_common(12))
                result["reads_total"] = result["requests_total"] - result["writes_total"]
                # every connection checked once more, after the quiet period
                bad = [c for c in conns if not bench.connection_ok(c, expected[c])]
                result["connections_wrong_at_end"] = bad
                # 2. and 3. policy changes (on a converged cluster only) -------------------
                if result["converged_s"] is not None and result["quiet_s"] is not None:
                    star = next(p for p, s in policies.items() if "*" in s)
                    three = next(p for p, s in policies.items() if len(s) == 3)
                    result["change_star"] = await change_policy(
                        bench, star, conns, "ddl", args.timeout, args.quiet
                    )
                    result["change_three"] = await change_policy(
                        bench, three, policies[three], "ddl", args.timeout, args.quiet
                    )
            finally:
                await operator.stop()
            if operator.error is not None:
                result["operator_error"] = repr(operator.error)
    return result


def fmt(v: Any) -> str:
    if v is None:
        return "timed out"
    if isinstance(v, float):
        return f"{v:.1f} s"
    return str(v)


def report(r: dict[str, Any]) -> None:
    print()
    print(
        f"{r['connections']} connections, {r['policies']} policies "
        f"({r['star_policies']} select *; {r['policies_per_connection']} per connection)"
    )
    print()
    print("| what | figure |")
    print("| --- | ---: |")
    rows = [
        ("objects created (client)", fmt(r["all_created_s"])),
        ("every connection Ready, bundle and status.policies right", fmt(r["converged_s"])),
        ("every policy's status right", fmt(r["policy_statuses_s"])),
        ("last write (then quiet)", fmt(r["quiet_s"])),
        ("API write requests until quiet", str(r["writes_total"])),
        ("  ... of which changed nothing", str(r["writes_noop"])),
        ("API requests until quiet", str(r["requests_total"])),
        ("connections wrong after quiet", str(len(r["connections_wrong_at_end"]))),
    ]
    for key, label in (("change_star", "*"), ("change_three", "3 connections")):
        if key not in r:
            rows.append((f"change to a policy selecting {label}", "not run (not converged)"))
            continue
        c = r[key]
        rows += [
            (f"change to a policy selecting {label}: every bundle has it", fmt(c["reflected_s"])),
            ("  ... last write (then quiet)", fmt(c["quiet_s"])),
            ("  ... ConfigMap writes", str(c["configmap_writes"])),
            ("  ... other ConfigMaps written", str(c["other_configmaps_written"])),
            ("  ... all API writes", str(sum(c["writes"].values()))),
            ("  ... Deployment writes", str(c["deployment_writes"])),
        ]
    for label, value in rows:
        print(f"| {label} | {value} |")
    print()
    print("writes until quiet, by kind:")
    for k, v in sorted(r["writes"].items(), key=lambda kv: -kv[1]):
        print(f"  {v:7d}  {k}")
    for key in ("change_star", "change_three"):
        if key not in r:
            continue
        print(f"writes after the change to {r[key]['policy']}:")
        for k, v in sorted(r[key]["writes"].items(), key=lambda kv: -kv[1]):
            print(f"  {v:7d}  {k}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=200)
    ap.add_argument("--policies", type=int, default=500)
    ap.add_argument("--star", type=int, default=3, help='policies that select "*"')
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600, help="per phase, seconds")
    ap.add_argument("--quiet", type=float, default=6.0, help="seconds without a write: settled")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = asyncio.run(run(args))
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    failed = (
        result.get("operator_error")
        or result["connections_wrong_at_end"]
        or result["converged_s"] is None
        or "change_star" not in result
        or result["change_star"]["deployment_writes"]
        or result["change_three"]["deployment_writes"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
