"""The fast path of a session: executions of a prepared statement that the policy lets run as
it is, relayed by C code (wire/_fastpath.c) without Python work per message.

A statement qualifies at Parse, when its decision is known: allowed, nothing
to hold, and a session that neither masks, cuts rows (maxRows) nor records results (recording
level `statements` is fine). The session then registers it; each later Bind/Describe/Execute/Sync
of it is queued and answered in C, and the session only builds the statement's event and, when
recording, records it before the read goes upstream (session.py: `_fast_*`). Everything
else, and every surprise on the way (an error, a notice, a setting, a message cut by the end of
a read), takes the session's Python path, which is the reference: the events are the same
either way (tests/integration/test_fastpath.py runs the same traffic both ways).
"""

from __future__ import annotations

import os
from typing import NamedTuple

from pgwarden_proxy.sql.classify import StatementInfo

try:
    from pgwarden_proxy.wire._fastpath import FastPath as FastPath
except ImportError:  # pragma: no cover - only where the extension was not built
    FastPath = None  # type: ignore[assignment,misc]

# Off for tests that compare both paths, and as an escape hatch (PGWARDEN_FAST_PATH=0).
ENABLED = os.environ.get("PGWARDEN_FAST_PATH", "1") != "0"


class FastStatement(NamedTuple):
    """What an execution's event needs of its statement, worked out once at registration."""

    info: StatementInfo
    types: tuple[int, ...]  # the parameter types given at Parse (to render binary parameters)
    statement: str  # redacted text
    classes: tuple[str, ...]
    decision: str
    policy: str | None


def new_fast_path(limit: int) -> FastPath | None:
    """A session's fast path (None: disabled, or the extension was not built)."""
    if not ENABLED or FastPath is None:
        return None
    return FastPath(limit)
