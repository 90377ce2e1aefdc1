"""`pgwarden operator`: run the kopf operator for DatabaseConnections and AccessPolicies."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import kopf

from pgwarden_operator import config
from pgwarden_operator.handlers import Operator, make_registry

# the pod's own namespace, when neither --namespace nor --all-namespaces is given
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
POD_NAMESPACE_ENV = "POD_NAMESPACE"


def default_namespace() -> str | None:
    if os.environ.get(POD_NAMESPACE_ENV):
        return os.environ[POD_NAMESPACE_ENV]
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def run(namespaces: Sequence[str], all_namespaces: bool, liveness: str | None = None) -> int:
    """Serve `namespaces` (none given: the pod's own) or, with `all_namespaces`, the whole
    cluster; `liveness`: kopf's health endpoint (`http://0.0.0.0:8080/healthz`). Blocks until
    SIGINT/SIGTERM; returns the exit status."""
    watched = sorted(set(namespaces))
    if not all_namespaces and not watched:
        own = default_namespace()
        if own is None:
            print(
                "pgwarden operator: which namespace? Pass --namespace NS or --all-namespaces "
                f"(or set ${POD_NAMESPACE_ENV})",
                file=sys.stderr,
            )
            return 2
        watched = [own]
    try:  # a bad default fails the start, not every reconcile
        defaults = config.load_defaults()
    except config.ConfigError as e:
        print(f"pgwarden operator: {e}", file=sys.stderr)
        return 2
    op = Operator(defaults=defaults)
    try:  # fail now, not in kopf's login retry loop, when there are no credentials at all
        op.login(settings=kopf.OperatorSettings())
    except kopf.LoginError as e:
        print(f"pgwarden operator: {e}", file=sys.stderr)
        return 2
    registry = make_registry(op)
    try:
        kopf.run(
            registry=registry,
            clusterwide=all_namespaces,
            namespaces=[] if all_namespaces else watched,
            liveness_endpoint=liveness,
            # one replica: no KopfPeering CRDs needed (a second replica would double the work,
            # not break it: every handler is idempotent)
            standalone=True,
        )
    except kopf.LoginError as e:
        print(f"pgwarden operator: {e}", file=sys.stderr)
        return 2
    return 0
