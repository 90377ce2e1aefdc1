"""Matching the server's responses to the client's requests, sans-IO.

Every frontend message that gets a response is queued; each backend message advances the head
of the queue. This is how the proxy knows, under pipelining and the extended protocol, which
statement a CommandComplete or an ErrorResponse belongs to (rows, duration, tag, error), and how
a refusal is answered in the right place of the stream: a refused request is replaced upstream by
a harmless request that fails (so the server's transaction state follows, exactly as if the
statement had failed there) and its ErrorResponse is swapped for ours.

PostgreSQL's rules used here ("Extended Query" in the protocol docs): after an error in an
extended-protocol batch the server skips every message up to Sync, then answers ReadyForQuery;
a simple Query answers ReadyForQuery at its end, and stops at its first failing statement.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from pgwarden_proxy.events import StatementEvent
from pgwarden_proxy.masking.planner import StatementPlan
from pgwarden_proxy.wire.framing import Message
from pgwarden_proxy.wire.messages import ErrorInfo, parse_fields

log = logging.getLogger("pgwarden.tracker")


class Kind(IntEnum):
    PARSE = 1
    BIND = 2
    DESCRIBE_STATEMENT = 3
    DESCRIBE_PORTAL = 4
    EXECUTE = 5
    CLOSE = 6
    SYNC = 7
    QUERY = 8  # also a refused FunctionCall: both end with ReadyForQuery


_SIMPLE = (Kind.SYNC, Kind.QUERY)
_DESCRIBE = (Kind.DESCRIBE_STATEMENT, Kind.DESCRIBE_PORTAL)
# as module constants: `Kind.X` is a slow attribute lookup on an enum class
_PARSE, _BIND, _EXECUTE, _CLOSE, _SYNC = Kind.PARSE, Kind.BIND, Kind.EXECUTE, Kind.CLOSE, Kind.SYNC


@dataclass(slots=True)
class Op:
    """One statement execution in flight."""

    event: StatementEvent
    t0: float = 0.0  # perf_counter at start
    plan: StatementPlan | None = None  # how its results are masked (None: no masking)
    # reverts what the proxy recorded for this statement (PREPARE, DEALLOCATE) when it fails
    # or never runs, so the proxy's idea of the session follows the server's
    undo: Callable[[], None] | None = None


@dataclass(slots=True)
class Pending:
    kind: Kind
    ops: list[Op] = field(default_factory=list)
    index: int = 0
    refusal: ErrorInfo | None = None  # our error replaces the server's answer to this request
    plan: StatementPlan | None = None  # Describe: the masking plan of what is described
    internal: bool = False  # our own Describe (masking needs the columns): its answer is ours
    undo: Callable[[], None] | None = None  # Parse, Close: reverted if the server skips or fails it
    # Sync: sent after this COPY's Execute, before its copy data ended; if the COPY starts,
    # the server ignores it ("ignores Flush and Sync messages received during copy-in mode")
    copy_of: Pending | None = None

    @property
    def op(self) -> Op | None:
        return self.ops[self.index] if self.index < len(self.ops) else None


# A request with nothing attached (no statements, refusal, plan or undo): nothing in it ever
# changes, so one Pending per kind serves them all (two or three per statement saved).
_BARE = {kind: Pending(kind) for kind in Kind}

Emit = Callable[[StatementEvent], None]


def tag_rows(tag: str) -> int:
    """The row count at the end of a command tag (`SELECT 3`, `INSERT 0 3`); 0 if none."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class Tracker:
    def __init__(self, emit: Emit) -> None:
        self._emit = emit
        self.pending: deque[Pending] = deque()
        self.transaction_status = b"I"

    @property
    def idle(self) -> bool:
        """Nothing in flight: the server has answered everything the client sent."""
        return not self.pending

    # ------------------------------------------------------------------ client side
    def request(
        self,
        kind: Kind,
        ops: list[Op] | None = None,
        refusal: ErrorInfo | None = None,
        *,
        plan: StatementPlan | None = None,
        internal: bool = False,
        undo: Callable[[], None] | None = None,
        copy_of: Pending | None = None,
    ) -> None:
        if ops:
            p = Pending(kind, ops, 0, refusal, plan, internal, undo)  # positional: cheaper
            # a pipelined statement's clock starts when it is sent, queueing included
            ops[0].t0 = time.perf_counter()
        elif refusal is None and plan is None and undo is None and not internal and not copy_of:
            p = _BARE[kind]
        else:
            p = Pending(
                kind, [], refusal=refusal, plan=plan, internal=internal, undo=undo, copy_of=copy_of
            )
        self.pending.append(p)

    # ------------------------------------------------------------------ server side
    def server(self, msg: Message) -> bytes | None:
        """Account for one backend message; returns the bytes to send the client (None: drop)."""
        pending = self.pending
        head = pending[0] if pending else None
        t = msg.type
        if head is not None:
            if msg.rows or msg.row_bytes:
                op = head.op
                if op is not None:
                    op.event.rows += msg.rows
                    op.event.bytes += msg.row_bytes
            if head.refusal is not None:
                return self._refused(head, msg)
        if t == 90:  # Z ReadyForQuery
            self.transaction_status = msg.body[:1]
            self._ready()
            return msg.raw
        if head is None:
            return msg.raw  # asynchronous: notices, notifications, parameter status, FATAL
        if t == 67 or t == 73:  # C CommandComplete, I EmptyQueryResponse
            self._complete(head, msg.body[:-1].decode(errors="replace") if t == 67 else None)
        elif t == 115:  # s PortalSuspended
            op = head.op
            if op is not None:
                op.event.suspended = True
            self._complete(head, None)
        elif t == 69:  # E ErrorResponse
            self._error(head, msg.body)
        elif t == 49:  # 1 ParseComplete
            self._pop(head, _PARSE)
        elif t == 50:  # 2 BindComplete
            self._pop(head, _BIND)
        elif t == 51:  # 3 CloseComplete
            self._pop(head, _CLOSE)
        elif (t == 84 or t == 110) and head.kind in _DESCRIBE:  # T RowDescription, n NoData
            pending.popleft()
            if head.internal:
                return None
        elif (
            t == 71  # G CopyInResponse, to an extended Execute: the Syncs the client sent
            and head.kind is _EXECUTE  # during the copy get no ReadyForQuery, forget them
            and any(p.copy_of is head for p in pending)
        ):
            self.pending = deque(p for p in pending if p.copy_of is not head)
        # anything else (copy responses, notices, ...) needs no bookkeeping
        return msg.raw

    @staticmethod
    def _undo(dropped: list[Pending]) -> None:
        """Requests the server failed or skipped: revert what the proxy recorded for them,
        newest first."""
        undos: list[Callable[[], None]] = []
        for p in dropped:
            if p.undo is not None:
                undos.append(p.undo)
            undos.extend(op.undo for op in p.ops[p.index :] if op.undo is not None)
        for undo in reversed(undos):
            undo()

    def _pop(self, head: Pending, kind: Kind) -> None:
        if head.kind is kind:
            self.pending.popleft()
        else:
            log.warning(
                "response out of order", extra={"expected": head.kind.name, "got": kind.name}
            )

    def _finish(self, op: Op, tag: str | None, error: ErrorInfo | None) -> None:
        if error is not None and op.undo is not None:
            op.undo()
        ev = op.event
        ev.duration_ms = (time.perf_counter() - op.t0) * 1000.0
        if tag is not None:
            ev.command_tag = tag
            if not ev.rows:
                ev.rows = tag_rows(tag)
        if error is not None:
            ev.error = {"sqlstate": error.sqlstate, "message": error.message}
        self._emit(ev)

    def _complete(self, head: Pending, tag: str | None) -> None:
        ops, i = head.ops, head.index
        if i < len(ops):
            self._finish(ops[i], tag, None)
            head.index = i = i + 1
            if i < len(ops):
                ops[i].t0 = time.perf_counter()
        if head.kind is _EXECUTE:
            self.pending.popleft()

    def _error(self, head: Pending, body: bytes) -> None:
        fields = parse_fields(body)
        info = ErrorInfo(fields.get("C", "XX000"), fields.get("M", ""), fields.get("S", "ERROR"))
        op = head.op
        if op is not None:
            self._finish(op, None, info)
            head.index += 1
        self._undo([head])  # a failed query runs none of its later statements
        head.index = len(head.ops)
        if head.kind not in _SIMPLE:
            # extended protocol: the server now skips everything up to the next Sync. An error
            # at Parse or Bind (a syntax error, a constant folded to 1/0) belongs to the
            # statement whose Execute comes next: record it there, or it would vanish.
            charged = op is not None
            dropped: list[Pending] = []
            while self.pending and self.pending[0].kind is not Kind.SYNC:
                p = self.pending.popleft()
                if p is head:
                    continue
                if not charged and p.kind is Kind.EXECUTE and p.op is not None:
                    self._finish(p.op, None, info)
                    p.index = 1
                    charged = True
                dropped.append(p)
            self._undo(dropped)

    def _ready(self) -> None:
        pending = self.pending
        if not pending:
            return
        if pending[0].kind in _SIMPLE:  # the common case: nothing skipped
            pending.popleft()
            return
        dropped: list[Pending] = []
        while self.pending:
            p = self.pending.popleft()
            if p.kind in _SIMPLE:
                break
            dropped.append(p)  # never answered: the server skipped it
        self._undo(dropped)

    def _refused(self, head: Pending, msg: Message) -> bytes | None:
        """The server is answering our stand-in request: swap its error for our refusal."""
        t = msg.type
        if t == 69:  # E: the stand-in failed as intended
            refusal = head.refusal
            assert refusal is not None
            for op in head.ops[head.index :]:
                self._finish(op, None, refusal)
            head.index = len(head.ops)
            head.refusal = None
            self._undo([head])
            if head.kind not in _SIMPLE:
                dropped: list[Pending] = []
                while self.pending and self.pending[0].kind is not Kind.SYNC:
                    p = self.pending.popleft()
                    if p is not head:
                        dropped.append(p)
                self._undo(dropped)
            return refusal.encode()
        if t == 90:
            self.transaction_status = msg.body[:1]
            self._ready()
            return msg.raw
        if t in (78, 65, 83):  # notices, notifications, parameter status pass through
            return msg.raw
        return None
