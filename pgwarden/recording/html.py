"""One recorded session as a self-contained HTML page (`pgwarden sessions export --format html`).

No scripts, no external assets: inline CSS, and a Content-Security-Policy that forbids anything
else. Every string that came from an agent (statements, parameters, names, error messages,
result values) is escaped, with control and format characters (bidirectional overrides …)
shown as escapes, so the page shows what was sent and nothing can hide in it.
"""

from __future__ import annotations

import html
import json
from datetime import datetime
from typing import Any

from pgwarden.display import printable
from pgwarden.recording.reader import EventRecord, Recording, StatementView, parse_time
from pgwarden.recording.verify import VerifyResult, verify_recording

MAX_ROWS_SHOWN = 50  # recorded rows shown per statement
MAX_VALUE_CHARS = 200  # characters shown per value

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1d1d1f}
h1{font-size:20px;margin:0 0 12px}
table.meta td{padding:2px 12px 2px 0;vertical-align:top}
table.meta td:first-child{color:#666;white-space:nowrap}
.ok{color:#14632b;font-weight:600}.bad{color:#b00020;font-weight:600}
table.timeline{border-collapse:collapse;width:100%;margin-top:16px}
table.timeline th{text-align:left;border-bottom:2px solid #ccc;padding:4px 8px;font-size:12px;
color:#555}
table.timeline td{border-bottom:1px solid #eee;padding:4px 8px;vertical-align:top}
tr.refused td{background:#fdecee}tr.refused td.decision{color:#b00020;font-weight:700}
tr.held td{background:#fff8e1}tr.event td{color:#555;font-style:italic}
td.num{text-align:right;white-space:nowrap}td.time{white-space:nowrap;font-family:monospace}
pre{margin:0;white-space:pre-wrap;word-break:break-word;font:13px/1.35 ui-monospace,monospace}
.params,.note{color:#555;font-size:12px;margin-top:4px}
.err{color:#b00020}
table.rows{border-collapse:collapse;margin-top:6px;font:12px ui-monospace,monospace}
table.rows th,table.rows td{border:1px solid #ddd;padding:1px 6px;text-align:left}
table.rows th{background:#f4f4f4}
""".strip()


def esc(value: Any) -> str:
    """Any value as escaped HTML text (None as empty)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return html.escape(printable(value, lines=True), quote=True)


def _cap(text: str, n: int = MAX_VALUE_CHARS) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _clock(t: datetime | None) -> str:
    return t.strftime("%H:%M:%S.%f")[:-3] if t is not None else ""


def _offset(t: datetime | None, t0: datetime | None) -> str:
    if t is None or t0 is None:
        return ""
    return f"+{(t - t0).total_seconds():.3f}s"


def _duration(ms: float | None) -> str:
    if ms is None:
        return ""
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


def _decision(view: StatementView) -> str:
    first, final = view.initial_decision, view.final_decision
    if first == "hold" and view.approval is not None:
        return f"hold → {final}"
    return "refused" if final == "refuse" else final


def _result_table(view: StatementView) -> str:
    o = view.outcome
    if o is None or o.result is None:
        return ""
    r = o.result
    names = r.column_names()
    head = "".join(f"<th>{esc(_cap(n))}</th>" for n in names)
    body = []
    for row in (r.rows or [])[:MAX_ROWS_SHOWN]:
        cells = "".join(
            "<td>" + ("<i>NULL</i>" if v is None else esc(_cap(str(v)))) + "</td>" for v in row
        )
        body.append(f"<tr>{cells}</tr>")
    shown = min(len(r.rows or []), MAX_ROWS_SHOWN)
    captured = r.captured_rows if r.captured_rows is not None else len(r.rows or [])
    total = f" of {r.total_rows}" if r.total_rows is not None else ""
    note = f"{shown} shown, {captured} recorded{total} rows"
    if r.truncated:
        note += " (recording capped)"
    if r.digest:
        note += f"; digest {r.digest}"
    return (
        f'<table class="rows"><tr>{head}</tr>{"".join(body)}</table>'
        f'<div class="note">{esc(note)}</div>'
    )


def _statement_row(view: StatementView, t0: datetime | None) -> str:
    e, o = view.event, view.outcome
    t = e.when
    cls = "refused" if view.refused else ("held" if view.initial_decision == "hold" else "")
    cell = f"<pre>{esc(e.statement or '')}</pre>"
    if e.parameters is not None:
        shown = ", ".join(
            f"${i}=" + ("NULL" if p is None else repr(_cap(p)))
            for i, p in enumerate(e.parameters, 1)
        )
        cell += f'<div class="params">parameters: {esc(shown or "(none)")}</div>'
    if e.policy:
        cell += f'<div class="note">policy: {esc(e.policy)}</div>'
    if view.approval is not None:
        a = view.approval
        by = f" by {a.decided_by}" if a.decided_by else ""
        comment = f": {a.comment}" if a.comment else ""
        cell += (
            f'<div class="note">approval {esc(a.request or "")} {esc(a.state or "")}'
            f"{esc(by)}{esc(comment)}</div>"
        )
    if o is None:
        cell += '<div class="note">no outcome recorded (the session ended before the answer)</div>'
    cell += _result_table(view)
    err = ""
    if o is not None and o.error is not None:
        err = f'<span class="err">{esc(o.error.sqlstate or "")} {esc(o.error.message or "")}</span>'
    return (
        f'<tr class="{cls}"><td class="time">{_clock(t)}</td>'
        f'<td class="num">{_offset(t, t0)}</td>'
        f'<td class="decision">{esc(_decision(view))}</td>'
        f"<td>{esc(', '.join(e.classes or []))}</td>"
        f"<td>{cell}</td>"
        f'<td class="num">{_duration(o.duration_ms if o else None)}</td>'
        f'<td class="num">{esc(o.rows if o and o.rows is not None else "")}</td>'
        f"<td>{err}</td></tr>"
    )


def _event_row(e: EventRecord, t0: datetime | None) -> str:
    t = e.when
    if e.type == "session_start":
        text = f"session started by {e.identity or '?'} from {e.client or '?'}"
    elif e.type == "session_end":
        text = f"session ended: {e.reason or '?'}"
        if e.recovered:
            text += " (closed by a restarted proxy)"
    elif e.type == "approval":
        text = f"approval for event {e.ref}: {e.state or '?'}"
        if e.decided_by:
            text += f" by {e.decided_by}"
        if e.comment:
            text += f": {e.comment}"
    else:
        text = f"{e.type} (event {e.seq})"
    return (
        f'<tr class="event"><td class="time">{_clock(t)}</td>'
        f'<td class="num">{_offset(t, t0)}</td><td>{esc(e.decision or "")}</td><td></td>'
        f'<td colspan="4">{esc(text)}</td></tr>'
    )


def _verification(result: VerifyResult) -> str:
    if result.ok:
        sig = {
            "valid": "signature valid",
            "unchecked": "signature not checked",
            "absent": "not signed",
        }.get(result.signature, result.signature)
        return f'<span class="ok">intact</span> ({result.events} events, {esc(sig)})'
    items = "".join(f"<li>{esc(p)}</li>" for p in result.problems)
    first = f"; first bad event: {result.first_bad_seq}" if result.first_bad_seq is not None else ""
    return f'<span class="bad">NOT INTACT</span>{esc(first)}<ul>{items}</ul>'


def export_html(rec: Recording, result: VerifyResult | None = None) -> str:
    """The session as one HTML page; `result` defaults to verifying it (without a key)."""
    if result is None:
        result = verify_recording(rec)
    start = rec.start_event
    t0 = parse_time(rec.start)
    if t0 is None and rec.events:
        t0 = rec.events[0].when
    end = parse_time(rec.end)
    summary = rec.summary()
    meta: list[tuple[str, str]] = [
        ("session", esc(rec.session_id)),
        ("identity", esc(rec.identity)),
    ]
    if start is not None:
        if start.groups:
            meta.append(("groups", esc(", ".join(start.groups))))
        if start.actor:
            meta.append(("acting for", esc(start.actor)))
        if start.subject or start.issuer:
            meta.append(("subject", esc(f"{start.subject or ''} ({start.issuer or ''})")))
    meta.append(("connection", esc(rec.connection)))
    if start is not None:
        client = str(start.client or "")
        if start.application_name:
            client += f" ({start.application_name})"
        meta.append(("client", esc(client)))
        if start.tls is not None:
            meta.append(("tls", esc(start.tls)))
        if start.policies:
            names = [p.get("name", p) if isinstance(p, dict) else p for p in start.policies]
            meta.append(("policies", esc(", ".join(str(n) for n in names))))
        if start.level:
            meta.append(("recording level", esc(start.level)))
    span = esc(rec.start or "?") + " — " + (esc(rec.end) if rec.end else "still open")
    if t0 is not None and end is not None:
        span += f" ({(end - t0).total_seconds():.1f} s)"
    meta.append(("time (UTC)", span))
    if rec.end_reason:
        reason = rec.end_reason + (" (recovered)" if summary.recovered else "")
        meta.append(("end", esc(reason)))
    meta.append(("statements", f"{summary.statements} ({summary.refused} refused)"))
    meta.append(("recording", _verification(result)))

    rows = []
    for entry in rec.timeline():
        if entry.statement is not None:
            rows.append(_statement_row(entry.statement, t0))
        else:
            rows.append(_event_row(entry.event, t0))
    meta_html = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in meta)
    title = esc(f"pgwarden session {rec.session_id}")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{title}</title><style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1>"
        f'<table class="meta">{meta_html}</table>'
        '<table class="timeline"><tr><th>time (UTC)</th><th>offset</th><th>decision</th>'
        "<th>classes</th><th>statement</th><th>duration</th><th>rows</th><th>error</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )
