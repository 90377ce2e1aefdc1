"""The `pgwarden` command (a contract: see ARCHITECTURE.md)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pgwarden import logs

if TYPE_CHECKING:
    from pgwarden.api.approvals import ApprovalRequest


def _cmd_proxy(args: argparse.Namespace) -> int:
    from pgwarden.api.config import ConfigError, load_config

    try:
        config = load_config(Path(args.config))
    except ConfigError as e:
        print(f"pgwarden: {e}", file=sys.stderr)
        return 2
    logs.configure(config.logging.level)
    from pgwarden_proxy.main import run

    return run(config, Path(args.config))


def _cmd_demo(args: argparse.Namespace) -> int:
    from pgwarden.demo import main as demo

    return demo(keep_running=args.keep_running)


APPROVALS_DIR_ENV = "PGWARDEN_APPROVALS_DIR"


def _printable(text: str, *, lines: bool = False) -> str:
    """Text from an agent, safe for a terminal: control and format characters shown escaped.

    So a statement cannot hide part of itself from the approver (carriage return, ANSI escapes,
    bidirectional overrides). Without `lines`, all whitespace runs become one space.
    """
    import unicodedata

    if not lines:
        text = " ".join(text.split())
    out = []
    for ch in text:
        if ch in "\n\t" and lines:
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _age(since: datetime, now: datetime) -> str:
    s = max(int((now - since).total_seconds()), 0)
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _approvals_table(requests: Sequence[ApprovalRequest], now: datetime) -> str:
    rows = [("NAME", "AGE", "STATE", "REQUESTER", "CONNECTION", "CLASSES", "STATEMENT")]
    for r in requests:
        rows.append(
            (
                r.name,
                _age(r.created_at, now),
                r.status.state.value,
                _printable(r.spec.requester.username),
                _printable(r.spec.connection),
                ",".join(r.spec.classes),
                _shorten(_printable(r.spec.statement), 72),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    )


def _approval_details(r: ApprovalRequest, now: datetime) -> str:
    from pgwarden_proxy.approvals.backend import when

    spec, st = r.spec, r.status
    who = _printable(spec.requester.username)
    if spec.requester.groups:
        who += f" (groups: {_printable(', '.join(spec.requester.groups))})"
    lines = [
        f"name:        {r.name}",
        f"state:       {st.state.value}",
        f"connection:  {_printable(spec.connection)}",
        f"requester:   {who}",
        f"session:     {_printable(spec.session_id)}",
        f"policy:      {_printable(spec.policy)}",
        f"classes:     {', '.join(spec.classes)}",
        f"created:     {when(r.created_at)} ({_age(r.created_at, now)} ago)",
        f"expires:     {when(spec.expires_at)}",
    ]
    if st.decided_at is not None or st.decided_by is not None:
        by = f" by {_printable(st.decided_by)}" if st.decided_by else ""
        at = f" at {when(st.decided_at)}" if st.decided_at else ""
        lines.append(f"decided:    {by}{at}")
    if st.comment:
        lines.append(f"comment:     {_printable(st.comment)}")
    lines.append(f"fingerprint: {_printable(spec.fingerprint)}")
    if spec.parameters is not None:
        shown = ", ".join(
            f"${i}=" + ("NULL" if p is None else repr(_printable(p, lines=True)))
            for i, p in enumerate(spec.parameters, 1)
        )
        lines.append(f"parameters:  {shown or '(none)'}")
    lines.append("statement:")
    lines.extend("  " + line for line in _printable(spec.statement, lines=True).splitlines())
    return "\n".join(lines)


def _cmd_approvals(args: argparse.Namespace) -> int:
    import json

    from pgwarden.api.approvals import ApprovalState, is_valid_name, utcnow
    from pgwarden_proxy.approvals.backend import ApprovalError
    from pgwarden_proxy.approvals.files import FileApprovals

    me = f"pgwarden approvals {args.action}"
    where = args.dir or os.environ.get(APPROVALS_DIR_ENV)
    if not where:
        print(f"{me}: give --dir DIR or set {APPROVALS_DIR_ENV}", file=sys.stderr)
        return 2
    try:
        store = FileApprovals(Path(where), create=False)
    except ApprovalError as e:
        print(f"{me}: {e}", file=sys.stderr)
        return 2
    now = utcnow()
    if args.action == "list":
        found = store.list_requests(include_all=args.all)
        if args.json:
            print(json.dumps([r.model_dump(mode="json", by_alias=True) for r in found], indent=2))
        elif not found:
            print(
                f"no {'' if args.all else 'pending '}approval requests in {store.directory}",
                file=sys.stderr,
            )
        else:
            print(_approvals_table(found, now))
        return 0
    if not is_valid_name(args.name):
        print(
            f"{me}: {args.name!r} is not a request name (see pgwarden approvals list)",
            file=sys.stderr,
        )
        return 2
    try:
        if args.action == "show":
            req = store.get(args.name)
            if args.json:
                print(req.model_dump_json(by_alias=True, indent=2))
            else:
                print(_approval_details(req, now))
            return 0
        by = args.by
        if by is None:
            import getpass

            try:
                by = getpass.getuser()
            except (OSError, KeyError):
                print(f"{me}: cannot tell who you are; give --by", file=sys.stderr)
                return 2
        if not by.strip():
            print(f"{me}: --by cannot be empty", file=sys.stderr)
            return 2
        state = ApprovalState.APPROVED if args.action == "approve" else ApprovalState.DENIED
        req = store.decide(args.name, state, by=by.strip(), comment=args.comment)
    except ApprovalError as e:
        print(f"{me}: {e}", file=sys.stderr)
        return 1
    print(
        f"{state.lower()} {req.name}: {', '.join(req.spec.classes)} on "
        f"{_printable(req.spec.connection)}, requested by {_printable(req.spec.requester.username)}"
    )
    return 0


def _not_yet(name: str, issue: str) -> int:
    print(f"pgwarden {name}: not available in this version yet ({issue})", file=sys.stderr)
    return 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pgwarden", description="An access gateway for PostgreSQL (see README.md)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    proxy = sub.add_parser("proxy", help="run one proxy from a config file (the bundle)")
    proxy.add_argument("--config", required=True, help="path of the proxy config (YAML)")
    proxy.set_defaults(func=_cmd_proxy)

    op = sub.add_parser("operator", help="run the Kubernetes operator")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("--namespace")
    scope.add_argument("--all-namespaces", action="store_true")
    op.set_defaults(func=lambda a: _not_yet("operator", "the operator is planned"))

    crds = sub.add_parser("crds", help="write the CRD YAML generated from the models")
    crds.add_argument("--out")
    crds.set_defaults(func=lambda a: _not_yet("crds", "CRD generation comes with the operator"))

    sessions = sub.add_parser("sessions", help="read recorded sessions")
    sessions.add_argument("action", choices=["list", "show", "replay", "verify"])
    sessions.add_argument("id", nargs="?")
    sessions.add_argument("--store")
    sessions.set_defaults(func=lambda a: _not_yet("sessions", "recordings come with the recorder"))

    approvals = sub.add_parser(
        "approvals", help="list, show, approve or deny statements held for a person (file backend)"
    )
    actions = approvals.add_subparsers(dest="action", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", help=f"the approvals directory (default: ${APPROVALS_DIR_ENV})")
    ls = actions.add_parser("list", parents=[where], help="pending requests, oldest first")
    ls.add_argument("--all", action="store_true", help="also decided and expired requests")
    ls.add_argument("--json", action="store_true", help="the requests as JSON")
    show = actions.add_parser(
        "show", parents=[where], help="one request in full: statement and parameters"
    )
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="the request as JSON")
    for verb in ("approve", "deny"):
        decide = actions.add_parser(verb, parents=[where], help=f"{verb} a pending request")
        decide.add_argument("name")
        decide.add_argument("--by", help="who decides (default: your OS user name)")
        decide.add_argument("--comment", help="a note kept with the decision")
    approvals.set_defaults(func=_cmd_approvals)

    demo = sub.add_parser("demo", help="everything on one machine: database, issuer, proxy")
    demo.add_argument(
        "--keep-running",
        action="store_true",
        help="after the scripted session, keep the proxy up for your own psql",
    )
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
