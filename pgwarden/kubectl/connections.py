"""`status` (DatabaseConnections as the operator reports them) and `token` (how an agent logs
in to one). Neither reads a Secret, so neither can print one."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from typing import Any

import yaml

from pgwarden.api.resources import API_VERSION, DATABASE_CONNECTION, ProxySpec
from pgwarden.display import printable, shorten
from pgwarden.kubectl.client import PluginError, as_list, calling, dump, open_api, table
from pgwarden.kubectl.kubeconfig import Login
from pgwarden_operator.k8s import Obj

PLURAL = DATABASE_CONNECTION.plural
READ_RBAC = "get and list on databaseconnections.pgwarden.io"
CRD_MISSING = "the API server has no databaseconnections.pgwarden.io: is pgwarden's CRD installed?"
MESSAGE_WIDTH = 60
TOKEN_DIR = "/var/run/secrets/pgwarden"
TOKEN_SECONDS = 3600  # the kubelet renews the projected token before it expires


def _dig(obj: Any, *keys: str) -> Any:
    """obj[k1][k2]...; None where a level is missing (a resource not reconciled yet)."""
    for key in keys:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _ready(obj: Obj) -> dict[str, Any]:
    for cond in _dig(obj, "status", "conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready":
            return cond
    return {}


async def _connections(login: Login, namespace: str | None, name: str | None) -> list[Obj]:
    where = "all namespaces" if namespace is None else f"namespace {namespace}"
    async with open_api(login) as api:
        if name is None:
            with calling(
                login, f"list databaseconnections in {where}", needs=READ_RBAC, missing=CRD_MISSING
            ):
                return await api.list(API_VERSION, PLURAL, namespace)
        with calling(login, f"read databaseconnection {name} in {where}", needs=READ_RBAC):
            obj = await api.get(API_VERSION, PLURAL, namespace, name)
    if obj is None:
        raise PluginError(f"databaseconnection {name} not found in {where}")
    return [obj]


async def status(args: argparse.Namespace, login: Login) -> int:
    namespace = None if args.all_namespaces else login.namespace
    objs = await _connections(login, namespace, args.name)
    objs.sort(key=lambda o: (str(o["metadata"].get("namespace")), str(o["metadata"]["name"])))
    if args.output:
        dump(objs[0] if args.name else as_list(objs), args.output)
        return 0
    if not objs:
        where = "any namespace" if namespace is None else f"namespace {namespace}"
        print(f"No database connections in {where}.", file=sys.stderr)
        return 0
    default_replicas = ProxySpec.model_fields["replicas"].default
    head = ["NAME", "ENDPOINT", "READY", "STATUS", "REASON", "POLICIES", "MESSAGE"]
    rows = [(["NAMESPACE"] if namespace is None else []) + head]
    for obj in objs:
        cond = _ready(obj)
        replicas = _dig(obj, "spec", "proxy", "replicas")
        rows.append(
            ([str(obj["metadata"].get("namespace"))] if namespace is None else [])
            + [
                str(obj["metadata"]["name"]),
                str(_dig(obj, "status", "endpoint") or "<none>"),
                f"{_dig(obj, 'status', 'readyReplicas') or 0}/"
                f"{default_replicas if replicas is None else replicas}",
                str(cond.get("status") or "Unknown"),
                str(cond.get("reason") or ""),
                ",".join(_dig(obj, "status", "policies") or []) or "<none>",
                shorten(printable(str(cond.get("message") or "")), MESSAGE_WIDTH),
            ]
        )
    print(table(rows))
    return 0


# ---------------------------------------------------------------------------------- token
def _pod_snippet(service_account: str, audience: str) -> str:
    pod = {
        "spec": {
            "serviceAccountName": service_account,
            "containers": [
                {
                    "name": "agent",
                    "volumeMounts": [
                        {"name": "pgwarden-token", "mountPath": TOKEN_DIR, "readOnly": True}
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "pgwarden-token",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": audience,
                                    "expirationSeconds": TOKEN_SECONDS,
                                    "path": "token",
                                }
                            }
                        ]
                    },
                }
            ],
        }
    }
    return yaml.safe_dump(pod, sort_keys=False)


async def token(args: argparse.Namespace, login: Login | None) -> int:
    """Help, never a token: where to connect, what to send as the password, how a pod gets it."""
    ns = args.namespace or "NAMESPACE"
    host, port, database = "HOST", "5432", "DATABASE"
    audience, issuer, service_accounts, tls = "pgwarden", "the connection's issuer", True, True
    lines: list[str] = []
    if login is None:
        lines += [
            "(name a DatabaseConnection for its endpoint, database and audience: "
            "kubectl pgwarden token NAME -n NAMESPACE)",
            "",
        ]
    else:
        ns = login.namespace
        obj = (await _connections(login, ns, args.connection))[0]
        spec = obj.get("spec") or {}
        endpoint = _dig(obj, "status", "endpoint")
        if endpoint:
            host, _, port = str(endpoint).rpartition(":")
        database = str(spec.get("database") or database)
        oidc = _dig(spec, "auth", "oidc") or {}
        audience = str(oidc.get("audience") or audience)
        issuer = str(oidc.get("issuer") or issuer)
        service_accounts = bool(oidc.get("serviceAccounts"))
        tls_secret = _dig(spec, "proxy", "tlsSecretRef", "name")
        tls = tls_secret is not None
        lines += [
            f"DatabaseConnection {args.connection} (namespace {ns})",
            f"  endpoint:  {endpoint or '<none>: not reconciled by the operator yet'}",
            f"  database:  {database}",
            f"  issuer:    {issuer}",
            f"  audience:  {audience}",
            "  TLS:       "
            + (
                f"yes (certificate from Secret {tls_secret})"
                if tls
                else "NO: no spec.proxy.tlsSecretRef, the proxy listens in plaintext and the "
                "token travels in clear"
            ),
            "",
        ]
        service = _dig(spec, "proxy", "service", "type")
        if service in ("LoadBalancer", "NodePort"):
            lines += [
                f"From outside the cluster: the address of Service {host.split('.')[0]} "
                f"(type {service}).",
                "",
            ]
    agent_ns = args.agent_namespace or ns
    account = args.service_account or "SERVICE_ACCOUNT"
    identity = f"system:serviceaccount:{agent_ns}:{account}"
    sslmode = "verify-full" if tls else "disable"
    conninfo = f"host={host} port={port} dbname={database} user=agent sslmode={sslmode}"
    lines += [
        "The password is an OIDC token; the user name is ignored (the identity comes from the",
        f"token). The token's audience must be {audience}.",
        "",
        "Agents in the cluster: a projected service-account token for that audience.",
    ]
    if not service_accounts:
        lines += [
            "  This connection does not accept them yet: set spec.auth.oidc.serviceAccounts: true",
            "  and the cluster's service-account issuer as spec.auth.oidc.issuer "
            "(docs/policies.md).",
        ]
    lines += [
        "Add to the pod spec:",
        "",
        textwrap.indent(_pod_snippet(account, audience), "  ").rstrip(),
        "",
        f"The agent is {identity}; an AccessPolicy selects it with",
        f"subjects.users: [{identity}] or subjects.groups: [system:serviceaccounts:{agent_ns}].",
        "The kubelet renews the token file: read it again for every new connection.",
        "",
        f'  PGPASSWORD="$(cat {TOKEN_DIR}/token)" psql {shlex.quote(conninfo)}',
        "",
    ]
    if tls:
        lines.append(
            "  (sslrootcert=FILE: the CA that signed the proxy's certificate, unless it is in "
            "~/.postgresql/root.crt)"
        )
    lines += [
        "",
        f"People and agents outside the cluster: a token from {issuer} with audience {audience},",
        'sent the same way: PGPASSWORD="$TOKEN" psql ... (never put it on the command line).',
    ]
    print("\n".join(lines))
    return 0
