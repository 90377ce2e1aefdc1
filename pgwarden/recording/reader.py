"""Reading recorded sessions back from a store (`pgwarden sessions list|show|replay|export`).

A session is found by id through `index/sessions/ID.json`, which names its key prefix; its events
are the JSON lines of the chunks under `PREFIX/events/`, in key order (the keys carry 10-digit seq
numbers, so key order is seq order). Each line is kept as the exact bytes stored, because those
bytes are what the hash chain covers (verify.py). Parsing is tolerant: unknown fields are kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pgwarden.recording.format import (
    Manifest,
    SessionIndex,
    _part,
    identity_index_prefix,
    manifest_key,
    session_index_key,
)
from pgwarden.recording.store import NotFound, Store, StoreError

CHUNK_NAME = re.compile(r"^(\d{10})-(\d{10})\.jsonl$")
DECISIONS = ("allow", "refuse", "hold", "approved")


# ---------------------------------------------------------------------------------- shapes
class _Shape(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")


class SqlError(_Shape):
    sqlstate: str | None = None
    message: str | None = None


class ResultCapture(_Shape):
    """`result` of an outcome at level `results`: the (masked) rows the client received."""

    columns: list[Any] | None = None
    rows: list[list[Any]] | None = None
    captured_rows: int | None = Field(None, alias="capturedRows")
    total_rows: int | None = Field(None, alias="totalRows")
    truncated: bool = False
    digest: str | None = None

    def column_names(self) -> list[str]:
        out = []
        for c in self.columns or []:
            if isinstance(c, dict):
                out.append(str(c.get("name", "?")))
            else:
                out.append(str(c))
        return out


class EventRecord(_Shape):
    """One event line (docs/recording.md, "Events"): the common fields and those of every type,
    all but the common ones optional. Fields this version does not know are kept (extra)."""

    v: int = 1
    seq: int
    prev: str
    time: str
    type: str
    session_id: str = Field(alias="sessionId")
    connection: str | None = None
    identity: str | None = None
    # session_start
    groups: list[str] | None = None
    subject: str | None = None
    issuer: str | None = None
    actor: Any = None
    client: Any = None
    application_name: str | None = Field(None, alias="applicationName")
    tls: Any = None
    policies: list[Any] | None = None
    effective_policy: Any = Field(None, alias="effectivePolicy")
    token_expires: Any = Field(None, alias="tokenExpires")
    level: str | None = None
    # statement
    statement: str | None = None
    parameters: list[str | None] | None = None
    fingerprint: str | None = None
    classes: list[str] | None = None
    command: str | None = None
    protocol: str | None = None
    decision: str | None = None
    policy: str | None = None
    # approval / outcome
    ref: int | None = None
    request: str | None = None
    state: str | None = None
    decided_by: str | None = Field(None, alias="decidedBy")
    comment: str | None = None
    duration_ms: float | None = Field(None, alias="durationMs")
    rows: int | None = None
    bytes_: int | None = Field(None, alias="bytes")
    command_tag: str | None = Field(None, alias="commandTag")
    error: SqlError | None = None
    result: ResultCapture | None = None
    # session_end
    reason: str | None = None
    statements: int | None = None
    duration_s: float | None = Field(None, alias="durationS")
    recovered: bool | None = None

    @property
    def when(self) -> datetime | None:
        return parse_time(self.time)


def parse_time(text: str | None) -> datetime | None:
    """An event's ISO-8601 time as an aware datetime (None when it is not one)."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# ---------------------------------------------------------------------------------- stored data
@dataclass(slots=True)
class StoredLine:
    """One line of a chunk: its exact bytes (no newline) and what they parse to."""

    chunk: str  # the chunk's key
    line_no: int  # 1-based within the chunk
    raw: bytes
    data: dict[str, Any] | None = None  # the JSON object as stored
    event: EventRecord | None = None
    error: str | None = None  # why the line is not an event
    warning: str | None = None  # fields of unexpected shape, left out of `event` (kept in data)

    @property
    def where(self) -> str:
        return f"line {self.line_no} of {self.chunk.rsplit('/', 1)[-1]}"


@dataclass(slots=True)
class Chunk:
    key: str
    first: int  # the seq range its name claims
    last: int
    lines: list[StoredLine]

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class SessionRef:
    """Where a session's objects are (from a listing or its index object)."""

    session_id: str
    connection: str
    day: str
    prefix: str
    identity: str | None = None


def split_lines(data: bytes) -> list[bytes]:
    """A chunk's lines, exact bytes without the newline (JSON escapes newlines inside values)."""
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    return parts


_REQUIRED = {"v", "seq", "prev", "time", "type", "sessionId"}


def parse_line(chunk: str, line_no: int, raw: bytes) -> StoredLine:
    line = StoredLine(chunk=chunk, line_no=line_no, raw=raw)
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        line.error = f"not JSON ({e})"
        return line
    if not isinstance(obj, dict):
        line.error = "not a JSON object"
        return line
    line.data = obj
    try:
        line.event = EventRecord.model_validate(obj)
        return line
    except ValidationError as e:
        errors = e.errors()
    odd = {str(err["loc"][0]) for err in errors if err["loc"]}
    if odd and not odd & _REQUIRED:
        # only optional fields have a shape this version does not expect: the event stands
        # (the chain covers the bytes, not the shapes); the fields stay in `data`
        try:
            line.event = EventRecord.model_validate({k: v for k, v in obj.items() if k not in odd})
            line.warning = f"fields of unexpected shape: {', '.join(sorted(odd))}"
            return line
        except ValidationError as e:
            errors = e.errors()
    first = errors[0]
    loc = ".".join(str(x) for x in first["loc"]) or "record"
    line.error = f"not an event ({loc}: {first['msg']})"
    return line


@dataclass
class StatementView:
    """A `statement` event with what became of it: its `approval` (held statements) and its
    `outcome` (absent when the session ended before the answer)."""

    event: EventRecord
    data: dict[str, Any]
    approval: EventRecord | None = None
    approval_data: dict[str, Any] | None = None
    outcome: EventRecord | None = None
    outcome_data: dict[str, Any] | None = None

    @property
    def initial_decision(self) -> str:
        return self.event.decision or ""

    @property
    def final_decision(self) -> str:
        for e in (self.outcome, self.approval, self.event):
            if e is not None and e.decision:
                return e.decision
        return ""

    @property
    def decisions(self) -> set[str]:
        return {e.decision for e in (self.event, self.approval, self.outcome) if e and e.decision}

    @property
    def refused(self) -> bool:
        return self.final_decision == "refuse"


@dataclass
class Entry:
    """One line of a timeline: an event; for a `statement`, joined with its approval/outcome."""

    event: EventRecord
    data: dict[str, Any]
    statement: StatementView | None = None


class SessionSummary(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    session_id: str = Field(alias="sessionId")
    identity: str
    connection: str
    start: str | None
    end: str | None  # null while the session is open (or its end was lost)
    statements: int
    refused: int
    end_reason: str | None = Field(alias="endReason")
    recovered: bool = False
    level: str | None = None

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


@dataclass
class Recording:
    """A session as stored: chunks (with their exact lines), manifest, index entry."""

    session_id: str
    connection: str
    day: str
    prefix: str
    store_url: str
    index: SessionIndex | None = None
    chunks: list[Chunk] = field(default_factory=list)
    stray: list[str] = field(default_factory=list)  # keys under events/ that are no chunk
    manifest: Manifest | None = None
    manifest_error: str | None = None  # manifest.json exists but does not parse

    @property
    def lines(self) -> list[StoredLine]:
        return [line for c in self.chunks for line in c.lines]

    @property
    def events(self) -> list[EventRecord]:
        return [line.event for c in self.chunks for line in c.lines if line.event is not None]

    def first_of(self, kind: str) -> EventRecord | None:
        return next((e for e in self.events if e.type == kind), None)

    @cached_property
    def start_event(self) -> EventRecord | None:
        return self.first_of("session_start")

    @cached_property
    def end_event(self) -> EventRecord | None:
        ends = [e for e in self.events if e.type == "session_end"]
        return ends[-1] if ends else None

    @property
    def identity(self) -> str:
        for candidate in (
            self.start_event.identity if self.start_event else None,
            self.manifest.identity if self.manifest else None,
            self.index.identity if self.index else None,
        ):
            if candidate:
                return candidate
        return next((e.identity for e in self.events if e.identity), "")

    @property
    def start(self) -> str | None:
        if self.manifest is not None:
            return self.manifest.start
        if self.start_event is not None:
            return self.start_event.time
        if self.index is not None:
            return self.index.start
        events = self.events
        return events[0].time if events else None

    @property
    def end(self) -> str | None:
        if self.manifest is not None:
            return self.manifest.end
        return self.end_event.time if self.end_event else None

    @property
    def end_reason(self) -> str | None:
        if self.manifest is not None:
            return self.manifest.end_reason
        return self.end_event.reason if self.end_event else None

    @property
    def level(self) -> str | None:
        return self.start_event.level if self.start_event else None

    @cached_property
    def statements(self) -> list[StatementView]:
        views: dict[int, StatementView] = {}
        for line in self.lines:
            e, data = line.event, line.data
            if e is None or data is None:
                continue
            if e.type == "statement":
                views.setdefault(e.seq, StatementView(event=e, data=data))
            elif e.type == "approval" and e.ref in views:
                v = views[e.ref]
                if v.approval is None:
                    v.approval, v.approval_data = e, data
            elif e.type == "outcome" and e.ref in views:
                v = views[e.ref]
                if v.outcome is None:
                    v.outcome, v.outcome_data = e, data
        return list(views.values())

    def timeline(self) -> list[Entry]:
        """Every event in stored order, except outcomes: those are joined into their statement
        (an outcome whose statement is not in the recording stays an entry of its own)."""
        views = {v.event.seq: v for v in self.statements}
        joined = {id(v.outcome) for v in views.values() if v.outcome is not None}
        out = []
        for line in self.lines:
            e, data = line.event, line.data
            if e is None or data is None or id(e) in joined:
                continue
            view = views.get(e.seq) if e.type == "statement" else None
            if view is not None and view.event is not e:
                view = None  # a second event claiming the same seq
            out.append(Entry(event=e, data=data, statement=view))
        return out

    def summary(self) -> SessionSummary:
        stmts = self.statements
        return SessionSummary(
            session_id=self.session_id,
            identity=self.identity,
            connection=self.connection,
            start=self.start,
            end=self.end,
            statements=len(stmts),
            refused=sum(1 for s in stmts if s.refused),
            end_reason=self.end_reason,
            recovered=bool(
                (self.manifest and self.manifest.recovered)
                or (self.end_event and self.end_event.recovered)
            ),
            level=self.level,
        )


# ---------------------------------------------------------------------------------- loading
def load_session(store: Store, session_id: str) -> Recording:
    """A session by id. Raises NotFound for an unknown id, StoreError when the store fails."""
    key = session_index_key(session_id)
    try:
        raw = store.get(key)
    except NotFound:
        raise NotFound(f"no session {session_id!r} in {store.url} ({key} not found)") from None
    try:
        index = SessionIndex.model_validate_json(raw)
    except ValidationError as e:
        raise StoreError(f"{key} in {store.url} is not a session index: {e}") from None
    ref = SessionRef(index.session_id, index.connection, index.day, index.prefix, index.identity)
    return load_recording(store, ref, index=index)


def load_recording(
    store: Store, ref: SessionRef, *, index: SessionIndex | None = None
) -> Recording:
    rec = Recording(
        session_id=ref.session_id,
        connection=ref.connection,
        day=ref.day,
        prefix=ref.prefix,
        store_url=store.url,
        index=index,
    )
    events_prefix = ref.prefix + "events/"
    for key in store.list(events_prefix):
        name = key[len(events_prefix) :]
        m = CHUNK_NAME.match(name)
        if m is None:
            rec.stray.append(key)
            continue
        try:
            data = store.get(key)
        except NotFound:  # deleted between the listing and now: its events are missing
            continue
        lines = [parse_line(key, i, raw) for i, raw in enumerate(split_lines(data), 1)]
        rec.chunks.append(Chunk(key=key, first=int(m[1]), last=int(m[2]), lines=lines))
    rec.chunks.sort(key=lambda c: (c.first, c.last, c.key))
    try:
        raw = store.get(manifest_key(ref.prefix))
    except NotFound:
        return rec
    try:
        rec.manifest = Manifest.model_validate_json(raw)
    except ValidationError as e:
        rec.manifest_error = str(e).splitlines()[0] if str(e) else "invalid"
    return rec


# ---------------------------------------------------------------------------------- finding
def parse_since(text: str) -> datetime:
    """`--since`: an ISO date (its midnight) or datetime; UTC when it names no zone."""
    return _parse_when(text, end=False)


def parse_until(text: str) -> datetime:
    """`--until`, as an exclusive bound: a date means up to the end of that day, a datetime up to
    and including that instant. UTC when it names no zone."""
    return _parse_when(text, end=True)


def _parse_when(text: str, *, end: bool) -> datetime:
    text = text.strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        try:
            t = datetime.fromisoformat(text).replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(f"{text!r} is not a date (YYYY-MM-DD)") from None
        return t + timedelta(days=1) if end else t
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO date or datetime (2026-11-27 or 2026-11-27T10:00:00Z)"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    t = t.astimezone(UTC)
    return t + timedelta(microseconds=1) if end else t


def _in_days(day: str, since: datetime | None, until: datetime | None) -> bool:
    """Could a session started on `day` (UTC) start within [since, until)?"""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
        return True  # not a day: decide on the start time
    if since is not None and day < since.astimezone(UTC).date().isoformat():
        return False
    last = (until - timedelta(microseconds=1)).astimezone(UTC) if until is not None else None
    return not (last is not None and day > last.date().isoformat())


def in_window(start: str | None, since: datetime | None, until: datetime | None) -> bool:
    if since is None and until is None:
        return True
    t = parse_time(start)
    if t is None:
        return False
    return (since is None or t >= since) and (until is None or t < until)


def _read_index(store: Store, key: str) -> SessionIndex | None:
    try:
        return SessionIndex.model_validate_json(store.get(key))
    except (NotFound, ValidationError):
        return None


def find_sessions(
    store: Store,
    *,
    identity: str | None = None,
    connection: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[SessionRef]:
    """Where the sessions are, without reading them: by identity from `index/identities/`, else
    from the objects under `sessions/` (by connection a prefix of it) plus any session whose
    index object exists but has nothing stored yet. `since`/`until` prune by the start day only
    (`in_window` decides on the start time once a session is read)."""
    refs: dict[str, SessionRef] = {}
    if identity is not None:
        for key in store.list(identity_index_prefix(identity)):
            if not key.endswith(".json"):
                continue
            idx = _read_index(store, key)
            if idx is not None and idx.prefix not in refs:
                refs[idx.prefix] = SessionRef(
                    idx.session_id, idx.connection, idx.day, idx.prefix, idx.identity
                )
    else:
        base = "sessions/" + (f"{_part(connection)}/" if connection is not None else "")
        for key in store.list(base):
            parts = key.split("/")
            if len(parts) < 5:
                continue
            prefix = "/".join(parts[:4]) + "/"
            if prefix not in refs:
                refs[prefix] = SessionRef(unquote(parts[3]), unquote(parts[1]), parts[2], prefix)
        if connection is None:
            seen = {r.session_id for r in refs.values()}
            for key in store.list("index/sessions/"):
                name = key.removeprefix("index/sessions/")
                if "/" in name or not name.endswith(".json") or unquote(name[:-5]) in seen:
                    continue
                idx = _read_index(store, key)
                if idx is not None and idx.prefix not in refs:
                    refs[idx.prefix] = SessionRef(
                        idx.session_id, idx.connection, idx.day, idx.prefix, idx.identity
                    )
    found = [
        r
        for r in refs.values()
        if (connection is None or r.connection == connection) and _in_days(r.day, since, until)
    ]
    return sorted(found, key=lambda r: (r.day, r.session_id))


def iter_recordings(
    store: Store,
    *,
    identity: str | None = None,
    connection: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Iterator[Recording]:
    """Every session matching the filters, read (sorted by start time within a day)."""
    refs = find_sessions(store, identity=identity, connection=connection, since=since, until=until)
    recs = []
    for ref in refs:
        rec = load_recording(store, ref, index=None)
        if identity is not None and rec.identity != identity:
            continue
        if in_window(rec.start, since, until):
            recs.append(rec)
    recs.sort(key=lambda r: (r.start or "", r.session_id))
    yield from recs


def list_sessions(
    store: Store,
    *,
    identity: str | None = None,
    connection: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    statement_contains: str | None = None,
    decision: str | None = None,
) -> list[SessionSummary]:
    """Sessions matching every filter given, oldest first. `statement_contains` matches statement
    text case-insensitively; `decision` (allow, refuse, hold, approved) matches a session with a
    statement that was decided so at any step (held, then approved or refused)."""
    if decision is not None and decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r} (one of {', '.join(DECISIONS)})")
    needle = statement_contains.casefold() if statement_contains is not None else None
    out = []
    for rec in iter_recordings(
        store, identity=identity, connection=connection, since=since, until=until
    ):
        stmts = rec.statements
        if needle is not None and not any(
            needle in (s.event.statement or "").casefold() for s in stmts
        ):
            continue
        if decision is not None and not any(decision in s.decisions for s in stmts):
            continue
        out.append(rec.summary())
    return out


# ---------------------------------------------------------------------------------- views
COMMON_FIELDS = (
    "seq",
    "time",
    "type",
    "sessionId",
    "connection",
    "identity",
    "statement",
    "decision",
    "durationMs",
    "rows",
    "error",
)
_OUTCOME_FIELDS = ("durationMs", "rows", "bytes", "commandTag", "error", "result")


def entry_json(entry: Entry) -> dict[str, Any]:
    """One timeline entry as a JSON object: the common fields (null where the type has none),
    then the event's own fields as stored. A statement carries its outcome's fields, `decision`
    is the final one (`initialDecision` what pgwarden decided first) and `completed` says
    whether an outcome was recorded."""
    out: dict[str, Any] = dict.fromkeys(COMMON_FIELDS)
    out.update({k: v for k, v in entry.data.items() if k not in ("v", "prev")})
    view = entry.statement
    if view is None:
        return out
    out["initialDecision"] = view.initial_decision or None
    out["decision"] = view.final_decision or None
    out["completed"] = view.outcome is not None
    if view.approval is not None and view.approval_data is not None:
        a = view.approval_data
        out["approval"] = {
            "seq": view.approval.seq,
            "time": view.approval.time,
            **{k: a.get(k) for k in ("request", "state", "decidedBy", "comment", "decision")},
        }
    if view.outcome is not None and view.outcome_data is not None:
        out["outcomeSeq"] = view.outcome.seq
        out["outcomeTime"] = view.outcome.time
        for k in _OUTCOME_FIELDS:
            if k in view.outcome_data:
                out[k] = view.outcome_data[k]
    return out


def timeline_json(rec: Recording) -> list[dict[str, Any]]:
    return [entry_json(e) for e in rec.timeline()]


def replay_steps(
    rec: Recording, *, speed: float = 1.0, max_gap: float = 5.0
) -> Iterator[tuple[float, EventRecord, StatementView | None]]:
    """The session's events in their original rhythm: (seconds to wait before this one, the
    event, its statement for `statement`/`approval`/`outcome` events). The wait is the recorded
    gap divided by `speed`, at most `max_gap`; `speed` 0 means no waiting."""
    if speed < 0 or max_gap < 0:
        raise ValueError("speed and max gap cannot be negative")
    views = {v.event.seq: v for v in rec.statements}
    last: datetime | None = None
    for e in rec.events:
        t = e.when
        wait = 0.0
        if speed > 0 and t is not None and last is not None:
            wait = min(max((t - last).total_seconds(), 0.0) / speed, max_gap)
        if t is not None:
            last = t
        ref = e.seq if e.type == "statement" else e.ref
        yield wait, e, views.get(ref) if ref is not None else None
