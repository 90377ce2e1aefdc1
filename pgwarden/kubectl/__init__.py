"""`kubectl pgwarden`: the console script `kubectl-pgwarden`, which kubectl runs as a plugin.

`status` of DatabaseConnections, `approvals` (pending ApprovalRequests), `approve` / `deny`
(the caller's identity from the API server), `sessions` (the same commands as `pgwarden
sessions`), `token` (how an agent logs in). Cluster access follows kubectl's conventions
(kubeconfig.py). Expected failures are one line on stderr and exit code 1; usage errors exit 2.
See docs/kubectl.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from pgwarden.cli import add_sessions_commands
from pgwarden.kubectl import approvals, connections
from pgwarden.kubectl.client import PluginError
from pgwarden.kubectl.kubeconfig import KubeconfigError, Login, load

PROG = "kubectl pgwarden"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="pgwarden for kubectl: connections, approvals, recorded sessions, agent login.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    # on each command rather than the top level, so `kubectl pgwarden approvals -n data` works
    kube = argparse.ArgumentParser(add_help=False)
    kube.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    kube.add_argument("--context", help="kubeconfig context (default: the current context)")
    kube.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    listing = argparse.ArgumentParser(add_help=False)
    listing.add_argument(
        "-A", "--all-namespaces", action="store_true", help="list in every namespace"
    )
    listing.add_argument("-o", "--output", choices=["json", "yaml"], help="the objects as such")

    status = sub.add_parser(
        "status", parents=[kube, listing], help="DatabaseConnections: endpoint, readiness, policies"
    )
    status.add_argument("name", nargs="?", help="one DatabaseConnection")
    status.set_defaults(run=connections.status, parser=status)

    ls = sub.add_parser(
        "approvals",
        parents=[kube, listing],
        help="pending ApprovalRequests: requester, classes, statement (NAME: one in full)",
    )
    ls.add_argument("name", nargs="?", help="one ApprovalRequest, statement in full")
    ls.add_argument("--all", action="store_true", help="also decided and expired requests")
    ls.set_defaults(run=approvals.list_approvals, parser=ls)

    for verb in ("approve", "deny"):
        decide = sub.add_parser(
            verb, parents=[kube], help=f"{verb} a pending ApprovalRequest, as yourself"
        )
        decide.add_argument("name", help="the ApprovalRequest")
        decide.add_argument("--comment", help="a note kept with the decision")
        decide.set_defaults(run=approvals.decide)

    sessions = sub.add_parser(
        "sessions", help="list, show, replay, verify or export recorded sessions"
    )
    add_sessions_commands(sessions)

    token = sub.add_parser(
        "token",
        parents=[kube],
        help="how an agent logs in (OIDC or service-account token); prints no secret",
    )
    token.add_argument(
        "connection", nargs="?", help="a DatabaseConnection: its endpoint, database, audience"
    )
    token.add_argument("--service-account", help="the agent's service account (for the snippet)")
    token.add_argument(
        "--agent-namespace", help="the agent pod's namespace (default: the connection's)"
    )
    token.set_defaults(run=connections.token)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "run", None)
    if run is None:  # sessions: pgwarden's own command functions
        rc: int = args.func(args)
        return rc
    if getattr(args, "all_namespaces", False) and args.name is not None:
        args.parser.error("NAME needs one namespace, not --all-namespaces")
    me = f"{PROG} {args.command}"
    try:
        login: Login | None = None
        if args.command != "token" or args.connection is not None:
            login = load(args.kubeconfig, args.context, args.namespace)
        rc = asyncio.run(run(args, login))
    except (KubeconfigError, PluginError) as e:
        print(f"{me}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `| head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
