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
from pgwarden.display import age, approval_details, printable, shorten

if TYPE_CHECKING:
    from pgwarden.api.approvals import ApprovalRequest
    from pgwarden.recording.reader import EventRecord, Recording, SessionSummary, StatementView
    from pgwarden.recording.store import Store
    from pgwarden.recording.verify import VerifyResult


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


def _approvals_table(requests: Sequence[ApprovalRequest], now: datetime) -> str:
    rows = [("NAME", "AGE", "STATE", "REQUESTER", "CONNECTION", "CLASSES", "STATEMENT")]
    for r in requests:
        rows.append(
            (
                r.name,
                age(r.created_at, now),
                r.status.state.value,
                printable(r.spec.requester.username),
                printable(r.spec.connection),
                ",".join(r.spec.classes),
                shorten(printable(r.spec.statement), 72),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
        for row in rows
    )


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
                print(approval_details(req, now))
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
        f"{printable(req.spec.connection)}, requested by {printable(req.spec.requester.username)}"
    )
    return 0


STORE_ENV = "PGWARDEN_STORE"


def _when(text: str | None, *, seconds: bool = False) -> str:
    """An event time for people: `2026-11-27 10:00:01.234` (UTC), or what it was."""
    from pgwarden.recording.reader import parse_time

    t = parse_time(text)
    if t is None:
        return printable(text or "-")
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if seconds else t.strftime("%Y-%m-%d %H:%M:%S")


def _span_s(start: str | None, end: str | None) -> str:
    from pgwarden.recording.reader import parse_time

    a, b = parse_time(start), parse_time(end)
    if a is None or b is None:
        return "-"
    s = (b - a).total_seconds()
    return f"{s:.1f}s" if s < 120 else f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _ms(ms: float | None) -> str:
    if ms is None:
        return ""
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _sessions_table(summaries: Sequence[SessionSummary]) -> str:
    rows = [("SESSION", "START (UTC)", "DURATION", "STMTS", "REFUSED", "CONNECTION", "IDENTITY")]
    ends = ["END"]
    for s in summaries:
        rows.append(
            (
                printable(s.session_id),
                _when(s.start),
                _span_s(s.start, s.end) if s.end else "open",
                str(s.statements),
                str(s.refused),
                printable(s.connection),
                printable(s.identity),
            )
        )
        reason = printable(s.end_reason or ("-" if s.end else "still open / not closed"))
        ends.append(reason + (" (recovered)" if s.recovered else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + "  " + end
        for row, end in zip(rows, ends, strict=True)
    )


def _value(v: object, width: int = 40) -> str:
    import json

    if v is None:
        return "NULL"
    return shorten(printable(v if isinstance(v, str) else json.dumps(v)), width)


def _rows_text(view: StatementView, indent: str) -> list[str]:
    """The recorded (masked) rows of a statement at level `results`, as an aligned table."""
    o = view.outcome
    if o is None or o.result is None:
        return []
    r = o.result
    table = [[_value(n) for n in r.column_names()]]
    table += [[_value(v) for v in row] for row in r.rows or []]
    ncol = max(len(row) for row in table)
    widths = [max(len(row[i]) if i < len(row) else 0 for row in table) for i in range(ncol)]
    out = [
        indent + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) for row in table
    ]
    if len(table) > 1:
        out.insert(1, indent + "-+-".join("-" * w for w in widths))
    total = f" of {r.total_rows}" if r.total_rows is not None else ""
    captured = r.captured_rows if r.captured_rows is not None else len(r.rows or [])
    out.append(f"{indent}({captured} rows recorded{total}{', capped' if r.truncated else ''})")
    return out


def _outcome_text(view: StatementView) -> str:
    o = view.outcome
    if o is None:
        return "no outcome recorded (the session ended before the answer)"
    parts = []
    if o.error is not None:
        parts.append(
            f"error {printable(o.error.sqlstate or '?')}: {printable(o.error.message or '')}"
        )
    if view.refused and not o.rows:  # nothing ran: rows and time say nothing
        return " · ".join(parts) or "refused"
    if o.rows is not None:
        parts.append(f"{o.rows} row{'' if o.rows == 1 else 's'}")
    if o.duration_ms is not None:
        parts.append(_ms(o.duration_ms))
    if o.command_tag:
        parts.append(printable(o.command_tag))
    return " · ".join(parts)


def _approval_text(a: EventRecord) -> str:
    text = f"approval {printable(a.request or '')}: {printable(a.state or '?')}"
    if a.decided_by:
        text += f" by {printable(a.decided_by)}"
    if a.comment:
        text += f" ({printable(a.comment)})"
    return text + f" → {printable(a.decision or '?')}"


def _verdict(result: VerifyResult) -> str:
    if result.ok:
        sig = {"valid": "signature valid", "unchecked": "signature not checked"}.get(
            result.signature, "not signed"
        )
        return f"intact ({result.events} events, {sig})"
    n = len(result.problems)
    first = f", first bad event {result.first_bad_seq}" if result.first_bad_seq else ""
    return f"NOT INTACT ({n} problem{'' if n == 1 else 's'}{first}): see pgwarden sessions verify"


def _show_text(rec: Recording, result: VerifyResult, *, color: bool) -> str:
    import json

    from pgwarden.recording.reader import parse_time

    red, off = ("\x1b[31;1m", "\x1b[0m") if color else ("", "")
    s = rec.summary()
    start = rec.start_event
    who = printable(rec.identity)
    lines = [f"session     {printable(rec.session_id)}"]
    if start is not None and start.groups:
        who += f"  (groups: {printable(', '.join(start.groups))})"
    if start is not None and start.actor:
        actor = start.actor if isinstance(start.actor, str) else json.dumps(start.actor)
        who += f"  acting for {printable(actor)}"
    lines.append(f"identity    {who}")
    conn = printable(rec.connection)
    if start is not None:
        client = printable(str(start.client or "?"))
        if start.application_name:
            client += f" ({printable(start.application_name)})"
        conn += f"   client {client}"
        if start.tls is not None:
            conn += f"   tls {printable(json.dumps(start.tls))}"
    lines.append(f"connection  {conn}")
    if start is not None and start.policies:
        names = [p.get("name", p) if isinstance(p, dict) else p for p in start.policies]
        lines.append(f"policies    {printable(', '.join(str(n) for n in names))}")
    when = f"{_when(s.start, seconds=True)} UTC"
    if s.end:
        when += f"  to {_when(s.end, seconds=True)} ({_span_s(s.start, s.end)})"
        when += f": {printable(s.end_reason or '?')}"
        if s.recovered:
            when += " (closed by a restarted proxy)"
    else:
        when += "  still open (or not closed)"
    lines.append(f"time        {when}")
    refused = f"{red}{s.refused} refused{off}" if s.refused else "none refused"
    lines.append(f"statements  {s.statements}, {refused}   level {printable(s.level or '?')}")
    verdict = _verdict(result)
    lines.append(f"recording   {verdict if result.ok else red + verdict + off}")
    lines.append("")
    t0 = parse_time(rec.start)
    pad = " " * 42  # under the statement
    present = {line.event.seq for line in rec.lines if line.event is not None}
    last_seq = 0
    for entry in rec.timeline():
        e, view = entry.event, entry.statement
        gone = [q for q in range(last_seq + 1, e.seq) if q not in present]
        if gone:
            span = f"{gone[0]}-{gone[-1]}" if len(gone) > 1 else str(gone[0])
            lines.append(red + f"{'':>5}  ... event(s) {span} missing from the recording" + off)
        last_seq = max(last_seq, e.seq)
        t = e.when
        offset = f"+{(t - t0).total_seconds():.3f}s" if t and t0 else ""
        clock = t.strftime("%H:%M:%S.%f")[:-3] if t else "?"
        head = f"{e.seq:>5}  {clock:<12}  {offset:>10}  "
        if view is not None:
            label = view.final_decision
            if view.refused:
                label = "REFUSED"
            elif view.initial_decision == "hold" and view.approval is None:
                label = "held"
            text = f"{label:<8} {printable(e.statement or '')}"
            lines.append(head + (red + text + off if view.refused else text))
            info = []
            if e.classes:
                info.append(", ".join(e.classes))
            if e.policy:
                info.append(f"policy {printable(e.policy)}")
            outcome = _outcome_text(view)
            if outcome:
                info.append(outcome)
            lines.append(pad + " · ".join(info))
            if e.parameters is not None:
                shown = ", ".join(
                    f"${i}=" + ("NULL" if p is None else repr(printable(p)))
                    for i, p in enumerate(e.parameters, 1)
                )
                lines.append(pad + f"parameters {shown or '(none)'}")
            if view.outcome is not None and view.outcome.result is not None:
                r = view.outcome.result
                n = r.captured_rows if r.captured_rows is not None else len(r.rows or [])
                lines.append(pad + f"{n} result rows recorded (see replay or export)")
        elif e.type == "session_start":
            lines.append(head + f"{'start':<8} session start, level {printable(e.level or '?')}")
        elif e.type == "session_end":
            lines.append(head + f"{'end':<8} session end: {printable(e.reason or '?')}")
        elif e.type == "approval":
            text = _approval_text(e).removeprefix("approval ")
            lines.append(head + f"{'approval':<8} {text} (for event {e.ref})")
        else:
            lines.append(head + f"{printable(e.type):<8} (event {e.ref})")
    return "\n".join(lines)


def _sessions_list(store: Store, args: argparse.Namespace, me: str) -> int:
    import json

    from pgwarden.recording.reader import list_sessions

    found = list_sessions(
        store,
        identity=args.identity,
        connection=args.connection,
        since=args.since,
        until=args.until,
        statement_contains=args.statement_contains,
        decision=args.decision,
    )
    if args.json:
        for s in found:
            print(json.dumps(s.as_json()))
    elif not found:
        print(f"no matching sessions in {store.url}", file=sys.stderr)
    else:
        print(_sessions_table(found))
    return 0


def _sessions_show(store: Store, args: argparse.Namespace, me: str) -> int:
    import json

    from pgwarden.recording.reader import load_session, timeline_json
    from pgwarden.recording.verify import verify_recording

    rec = load_session(store, args.id)
    if args.raw:
        tty = sys.stdout.isatty()
        sys.stdout.flush()
        for line in rec.lines:
            if tty:
                print(printable(line.raw.decode("utf-8", "replace"), lines=True), flush=True)
            else:
                sys.stdout.buffer.write(line.raw + b"\n")
        sys.stdout.flush()
        return 0
    if args.json:
        for obj in timeline_json(rec):
            print(json.dumps(obj))
        return 0
    result = verify_recording(rec, args.public_key)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    print(_show_text(rec, result, color=color))
    return 0


def _sessions_replay(store: Store, args: argparse.Namespace, me: str) -> int:
    import time

    from pgwarden.recording.reader import load_session, parse_time, replay_steps

    if args.speed < 0 or args.max_gap < 0:
        print(f"{me}: --speed and --max-gap cannot be negative", file=sys.stderr)
        return 2
    rec = load_session(store, args.id)
    t0 = parse_time(rec.start)
    for wait, e, view in replay_steps(rec, speed=args.speed, max_gap=args.max_gap):
        if wait > 0:
            time.sleep(wait)
        t = e.when
        at = f"[+{(t - t0).total_seconds():8.3f}s]" if t and t0 else "[         ?]"
        indent = " " * (len(at) + 1)
        if e.type == "session_start":
            client = printable(str(e.client or "?"))
            out = [
                f"{at} session {printable(rec.session_id)}: {printable(rec.identity)} on "
                f"{printable(rec.connection)} from {client}, level {printable(e.level or '?')}"
            ]
        elif e.type == "statement":
            decision = (e.decision or "?").upper() if e.decision == "refuse" else e.decision
            out = [f"{at} {decision or '?'}: {printable(e.statement or '')}"]
            if e.parameters is not None:
                shown = ", ".join(
                    f"${i}=" + ("NULL" if p is None else repr(printable(p)))
                    for i, p in enumerate(e.parameters, 1)
                )
                out.append(f"{indent}parameters {shown or '(none)'}")
            if view is not None and view.outcome is None:
                out.append(f"{indent}{_outcome_text(view)}")
        elif e.type == "approval":
            out = [f"{at} {_approval_text(e)}"]
        elif e.type == "outcome" and view is not None:
            final = "REFUSED" if view.refused else view.final_decision
            out = [f"{at} → {final}: {_outcome_text(view)}"]
            out += _rows_text(view, indent)
        elif e.type == "session_end":
            out = [f"{at} session end: {printable(e.reason or '?')}"]
        else:
            out = [f"{at} {printable(e.type)} (event {e.seq})"]
        print("\n".join(out), flush=True)
    return 0


def _sessions_verify(store: Store, args: argparse.Namespace, me: str) -> int:
    import json

    from pgwarden.recording.verify import verify_all, verify_session

    if args.all == (args.id is not None):
        print(f"{me}: give a session id or --all", file=sys.stderr)
        return 2
    if args.id is not None and any(
        v is not None for v in (args.identity, args.connection, args.since, args.until)
    ):
        print(f"{me}: --identity/--connection/--since/--until go with --all", file=sys.stderr)
        return 2
    if args.all:
        results = verify_all(
            store,
            public_key=args.public_key,
            identity=args.identity,
            connection=args.connection,
            since=args.since,
            until=args.until,
        )
        if not results:
            print(f"no matching sessions in {store.url}", file=sys.stderr)
    else:
        results = [verify_session(store, args.id, args.public_key)]
    for r in results:
        if args.json:
            print(json.dumps(r.as_json()))
            continue
        sid = printable(r.session_id)
        if r.ok:
            sig = {"valid": ", signature valid", "unchecked": ", signature not checked"}
            print(f"{sid}  ok ({r.events} events{sig.get(r.signature, '')})")
        else:
            first = f": first bad event {r.first_bad_seq}" if r.first_bad_seq is not None else ""
            print(f"{sid}  NOT INTACT{first}")
            for problem in r.problems:
                print(f"    - {printable(problem)}")
    bad = sum(not r.ok for r in results)
    if args.all and not args.json and results:
        print(f"{len(results)} sessions: {len(results) - bad} intact, {bad} NOT INTACT")
    return 1 if bad else 0


def _sessions_export(store: Store, args: argparse.Namespace, me: str) -> int:
    from pgwarden.recording.html import export_html
    from pgwarden.recording.reader import load_session
    from pgwarden.recording.verify import verify_recording

    rec = load_session(store, args.id)
    page = export_html(rec, verify_recording(rec, args.public_key))
    if args.out is None:
        sys.stdout.write(page)
        return 0
    try:
        Path(args.out).write_text(page, encoding="utf-8")
    except OSError as e:
        print(f"{me}: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _cmd_sessions(args: argparse.Namespace) -> int:
    from pgwarden.recording.reader import parse_since, parse_until
    from pgwarden.recording.store import StoreError, open_store
    from pgwarden.recording.verify import load_public_key

    me = f"{args.sessions_prog} {args.action}"
    url = args.store or os.environ.get(STORE_ENV)
    if not url:
        print(
            f"{me}: give --store URL or set {STORE_ENV} (file:///dir or s3://bucket/prefix)",
            file=sys.stderr,
        )
        return 2
    try:
        for name, parse in (("since", parse_since), ("until", parse_until)):
            if getattr(args, name, None) is not None:
                setattr(args, name, parse(getattr(args, name)))
        if getattr(args, "public_key", None) is not None:
            args.public_key = load_public_key(Path(args.public_key))
        store = open_store(url)
    except (ValueError, ImportError) as e:
        print(f"{me}: {e}", file=sys.stderr)
        return 2
    actions = {
        "list": _sessions_list,
        "show": _sessions_show,
        "replay": _sessions_replay,
        "verify": _sessions_verify,
        "export": _sessions_export,
    }
    try:
        return actions[args.action](store, args, me)
    except StoreError as e:  # unreachable store, unknown session (NotFound)
        print(f"{me}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `| head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _cmd_crds(args: argparse.Namespace) -> int:
    from pgwarden import crds

    if args.out is None:
        sys.stdout.write(crds.stream())
        return 0
    try:
        written = crds.write(Path(args.out))
    except OSError as e:
        print(f"pgwarden crds: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for path in written:
        print(path, file=sys.stderr)
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    logs.configure("info")
    from pgwarden_operator.main import run

    return run(args.namespace or [], args.all_namespaces, args.liveness)


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
    scope.add_argument(
        "--namespace",
        action="append",
        metavar="NS",
        help="watch this namespace (repeat for several; default: the pod's own)",
    )
    scope.add_argument("--all-namespaces", action="store_true")
    op.add_argument(
        "--liveness",
        metavar="URL",
        help="serve kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    op.set_defaults(func=_cmd_operator)

    crds = sub.add_parser("crds", help="write the CRD YAML generated from the models")
    crds.add_argument(
        "--out", help="write one file per CRD into this directory (default: all to stdout)"
    )
    crds.set_defaults(func=_cmd_crds)

    sessions = sub.add_parser(
        "sessions", help="list, show, replay, verify or export recorded sessions"
    )
    add_sessions_commands(sessions)

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


def add_sessions_commands(sessions: argparse.ArgumentParser) -> None:
    """The `sessions` actions and their options under `sessions`; `pgwarden sessions` and
    `kubectl pgwarden sessions` share this one definition (messages name `sessions.prog`)."""
    sactions = sessions.add_subparsers(dest="action", required=True)
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store",
        help=f"where recordings are: file:///dir or s3://bucket/prefix (default: ${STORE_ENV})",
    )
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--identity", help="sessions of this identity")
    filters.add_argument("--connection", help="sessions on this connection")
    filters.add_argument(
        "--since", help="started at or after: ISO date or datetime (UTC when no zone)"
    )
    filters.add_argument(
        "--until", help="started at or before: ISO datetime, or a date (to its end); UTC default"
    )
    key = argparse.ArgumentParser(add_help=False)
    key.add_argument(
        "--public-key", help="Ed25519 public key (PEM) to check manifest signatures with"
    )
    sls = sactions.add_parser("list", parents=[store, filters], help="sessions, oldest first")
    sls.add_argument(
        "--statement-contains", help="with a statement containing this text (any case)"
    )
    sls.add_argument(
        "--decision",
        choices=["allow", "refuse", "hold", "approved"],
        help="with a statement decided so",
    )
    sls.add_argument("--json", action="store_true", help="one JSON object per line per session")
    sshow = sactions.add_parser("show", parents=[store, key], help="one session's timeline")
    sshow.add_argument("id", help="session id")
    view = sshow.add_mutually_exclusive_group()
    view.add_argument(
        "--json", action="store_true", help="one JSON object per event (outcomes joined)"
    )
    view.add_argument("--raw", action="store_true", help="the stored event lines as they are")
    sreplay = sactions.add_parser(
        "replay", parents=[store], help="play a session back in its original rhythm"
    )
    sreplay.add_argument("id", help="session id")
    sreplay.add_argument(
        "--speed", type=float, default=1.0, help="faster (2) or slower (0.5); 0: no waiting"
    )
    sreplay.add_argument(
        "--max-gap", type=float, default=5.0, help="longest wait between events, seconds"
    )
    sverify = sactions.add_parser(
        "verify",
        parents=[store, filters, key],
        help="is a recording intact? exit 0 only when it is",
    )
    sverify.add_argument("id", nargs="?", help="session id (or --all)")
    sverify.add_argument("--all", action="store_true", help="every session in the store")
    sverify.add_argument("--json", action="store_true", help="one JSON object per session")
    sexport = sactions.add_parser(
        "export", parents=[store, key], help="one session as a self-contained page"
    )
    sexport.add_argument("id", help="session id")
    sexport.add_argument("--format", choices=["html"], default="html")
    sexport.add_argument("--out", help="file to write (default: standard output)")
    sessions.set_defaults(func=_cmd_sessions, sessions_prog=sessions.prog)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
