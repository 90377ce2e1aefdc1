"""Showing what agents wrote and what the cluster holds to a person at a terminal (the
`pgwarden` commands and the `kubectl pgwarden` plugin share these)."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgwarden.api.approvals import ApprovalRequest


def printable(text: str, *, lines: bool = False) -> str:
    """Text from an agent, safe for a terminal: control and format characters shown escaped.

    So a statement cannot hide part of itself from the approver (carriage return, ANSI escapes,
    bidirectional overrides). Without `lines`, all whitespace runs become one space.
    """
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


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def age(since: datetime, now: datetime) -> str:
    s = max(int((now - since).total_seconds()), 0)
    if s < 120:
        return f"{s}s"
    if s < 2 * 3600:
        return f"{s // 60}m"
    if s < 2 * 86400:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def approval_details(r: ApprovalRequest, now: datetime) -> str:
    from pgwarden_proxy.approvals.backend import when

    spec, st = r.spec, r.status
    who = printable(spec.requester.username)
    if spec.requester.groups:
        who += f" (groups: {printable(', '.join(spec.requester.groups))})"
    lines = [
        f"name:        {r.name}",
        f"state:       {st.state.value}",
        f"connection:  {printable(spec.connection)}",
        f"requester:   {who}",
        f"session:     {printable(spec.session_id)}",
        f"policy:      {printable(spec.policy)}",
        f"classes:     {', '.join(spec.classes)}",
        f"created:     {when(r.created_at)} ({age(r.created_at, now)} ago)",
        f"expires:     {when(spec.expires_at)}",
    ]
    if st.decided_at is not None or st.decided_by is not None:
        by = f" by {printable(st.decided_by)}" if st.decided_by else ""
        at = f" at {when(st.decided_at)}" if st.decided_at else ""
        lines.append(f"decided:    {by}{at}")
    if st.comment:
        lines.append(f"comment:     {printable(st.comment)}")
    lines.append(f"fingerprint: {printable(spec.fingerprint)}")
    if spec.parameters is not None:
        shown = ", ".join(
            f"${i}=" + ("NULL" if p is None else repr(printable(p, lines=True)))
            for i, p in enumerate(spec.parameters, 1)
        )
        lines.append(f"parameters:  {shown or '(none)'}")
    lines.append("statement:")
    lines.extend("  " + line for line in printable(spec.statement, lines=True).splitlines())
    return "\n".join(lines)
