"""What the proxy saw: one event per statement and per session start/end, for the structured
log (`LogEventSink`) and tests. The session recording (recording/) is written beside it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pgwarden import logs
from pgwarden.recording.format import iso

try:  # the statement line in C (_eventline.c); this module's Python is the reference
    from pgwarden_proxy._eventline import statement_line as statement_line
except ImportError:  # pragma: no cover - only where the extension was not built
    statement_line = None  # type: ignore[assignment]


@dataclass(slots=True)
class StatementEvent:
    session_id: str
    connection: str
    identity: str
    statement: str
    fingerprint: str | None
    classes: tuple[str, ...]
    command: str
    parameters: list[str | None] | None
    protocol: str  # simple | extended | fastpath
    decision: str  # allow | refuse
    policy: str | None
    start: float  # epoch seconds
    duration_ms: float = 0.0
    rows: int = 0
    bytes: int = 0
    command_tag: str | None = None
    error: dict[str, str] | None = None  # {"sqlstate": ..., "message": ...}
    suspended: bool = False
    # held for a person: {"request": name, "state": ..., "decidedBy": ..., "comment": ...}
    approval: dict[str, str | None] | None = None
    seq: int = 0  # of its `statement` event in the session's recording (0: not recorded)
    result: dict[str, Any] | None = None  # recording level `results`: the rows sent

    def as_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies recursively, a hot spot at one event per statement
        return {
            "session_id": self.session_id,
            "connection": self.connection,
            "identity": self.identity,
            "statement": self.statement,
            "fingerprint": self.fingerprint,
            "classes": list(self.classes),
            "command": self.command,
            "parameters": self.parameters,
            "protocol": self.protocol,
            "decision": self.decision,
            "policy": self.policy,
            "start": iso(self.start),
            "duration_ms": round(self.duration_ms, 3),
            "rows": self.rows,
            "bytes": self.bytes,
            "command_tag": self.command_tag,
            "error": self.error,
            "suspended": self.suspended,
            "approval": self.approval,
        }


@dataclass(slots=True)
class SessionEvent:
    type: str  # session_start | session_end
    session_id: str
    connection: str
    identity: str
    time: float
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = iso(self.time)
        return d


class EventSink(Protocol):
    def statement(self, event: StatementEvent) -> None: ...

    def session(self, event: SessionEvent) -> None: ...


class LogEventSink:
    """Events as structured log records on the `pgwarden.events` logger."""

    def __init__(self, *, statements: bool = True) -> None:
        self._log = logging.getLogger("pgwarden.events")
        self._statements = statements
        # what event_line writes between the time and the event, for statement_line
        line = logs.event_line(self._log.name, "statement", {})
        self._middle = line[line.index('","level"') : -len("{}}\n")]

    def statement(self, event: StatementEvent) -> None:
        if not self._statements:
            return
        log = self._log
        writer = logs.event_writer(log)
        if writer is not None:  # the same line, without a LogRecord (one per statement)
            line = None
            if statement_line is not None:
                line = statement_line(event, self._middle, time.time())
            if line is None:
                line = logs.event_line(log.name, "statement", event.as_dict())
            writer.add_line(line)
        elif log.isEnabledFor(logging.INFO):
            log.info("statement", extra={"event": event.as_dict()})

    def session(self, event: SessionEvent) -> None:
        self._log.info(event.type, extra={"event": event.as_dict()})


class MemoryEventSink:
    """Keeps events in memory (tests, the demo)."""

    def __init__(self) -> None:
        self.statements: list[StatementEvent] = []
        self.sessions: list[SessionEvent] = []

    def statement(self, event: StatementEvent) -> None:
        self.statements.append(event)

    def session(self, event: SessionEvent) -> None:
        self.sessions.append(event)


class FanoutSink:
    def __init__(self, *sinks: EventSink) -> None:
        self.sinks = sinks

    def statement(self, event: StatementEvent) -> None:
        for s in self.sinks:
            s.statement(event)

    def session(self, event: SessionEvent) -> None:
        for s in self.sinks:
            s.session(event)
