"""Session recordings: each session's events, hash-chained, into the spool; shipped to the sink.

Runs on the event loop, except the spool's writer (a thread) and the shipper (a process of its
own: shipper_process). A session
asks `when_durable(ticket)` before it forwards a statement: the statement's event is on disk by
then (see docs/recording.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any, get_args

import orjson

from pgwarden.api.config import Recording
from pgwarden.recording.format import VERSION, EventType, encode_event, genesis, iso
from pgwarden.recording.store import Store
from pgwarden_proxy.events import StatementEvent
from pgwarden_proxy.recording.shipper_process import ShipperProcess
from pgwarden_proxy.recording.spool import Spool, SpoolError, Track, session_meta
from pgwarden_proxy.wire.messages import ErrorInfo

log = logging.getLogger("pgwarden.recording")

# An event line: `encode_event` of {"v", "seq", "prev", "time", "type", "sessionId", "connection",
# "identity", **fields}, built from its parts (see SessionRecorder)
_LINE = b'{"v":' + str(VERSION).encode() + b',"seq":%d,"prev":"%b","time":"%b.%06dZ",%b%b%b'
_TYPES = {t: b'"type":"%b",' % t.encode() for t in get_args(EventType)}
_COMMON = frozenset(("v", "seq", "prev", "time", "type", "sessionId", "connection", "identity"))
_ISO_SECOND = "%Y-%m-%dT%H:%M:%S"  # `iso` of a whole second
_second: list[Any] = [-1, b""]  # the last whole second formatted (as `iso` does), and its text
_time, _gmtime, _strftime = time.time, time.gmtime, time.strftime
_sha256 = hashlib.sha256
_dumps, _NON_STR_KEYS = orjson.dumps, orjson.OPT_NON_STR_KEYS

Waiter = Callable[[bool], None]


class Recorder:
    def __init__(self, config: Recording, connection: str, store: Store) -> None:
        self.config = config
        self.connection = connection
        self.store = store
        self.durable = 0  # highest durable ticket (updated on the loop)
        self._waiters: list[tuple[int, int, Waiter]] = []
        self._order = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed: str | None = None
        self.spool = Spool(
            config.spool_dir,
            segment_bytes=config.segment_bytes,
            max_bytes=config.max_spool_bytes,
            ship_interval=config.ship_interval.total_seconds(),
            on_durable=self._durable_from_thread,
            on_failed=self._failed_from_thread,
            on_sealed=lambda: self.shipper.wake(),
        )
        self.shipper = ShipperProcess(config, self.spool, store)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the spool (closing sessions a previous process left open) and start shipping."""
        self._loop = asyncio.get_running_loop()
        recovered = self.spool.open()
        self.spool.start()
        for prefix, manifest in self.spool.unwritten_manifests:
            self.spool.append_internal("manifest", {"prefix": prefix, "manifest": manifest})
        for sid, left in recovered.items():
            meta = left.meta
            rec = SessionRecorder(self, sid, meta["connection"], meta["identity"], "statements")
            rec.resume(left.seq, left.hash, meta["start"])
            rec.end(
                "the proxy stopped before the session ended (closed by the restarted proxy)",
                statements=None,
                duration_s=None,
                recovered=True,
            )
        if recovered:
            log.warning(
                "recording: closed sessions left open by a crash",
                extra={"sessions": sorted(recovered)},
            )
        self.shipper.start()
        log.info(
            "recording",
            extra={"sink": self.store.url, "spool": str(self.config.spool_dir)},
        )

    async def stop(self, ship_for: float = 10.0) -> None:
        """Seal the spool and ship what is left (for up to `ship_for` seconds)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.spool.close)
        shipped = await loop.run_in_executor(None, self.shipper.stop, ship_for)
        if not shipped:
            log.warning(
                "recording: some segments were not shipped; the next start ships them",
                extra={"spool": str(self.config.spool_dir)},
            )

    # ------------------------------------------------------------------ durability
    def _durable_from_thread(self, ticket: int) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._advance, ticket)

    def _failed_from_thread(self, message: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._fail, message)

    def _advance(self, ticket: int) -> None:
        self.durable = max(self.durable, ticket)
        waiters = self._waiters
        while waiters and waiters[0][0] <= ticket:
            heapq.heappop(waiters)[2](True)

    def _fail(self, message: str) -> None:
        self.failed = message
        waiters, self._waiters = self._waiters, []
        for _, _, waiter in waiters:
            waiter(False)

    def when_durable(self, ticket: int, waiter: Waiter) -> None:
        """Call `waiter(True)` once `ticket` is on disk (False: it never will be)."""
        if self.failed is not None or ticket < 0:
            waiter(False)
        elif ticket <= self.durable:
            waiter(True)
        else:
            heapq.heappush(self._waiters, (ticket, next(self._order), waiter))

    def refusal(self) -> ErrorInfo | None:
        """Why new statements must not run now (fail closed), or None."""
        spool = self.spool
        if self.failed is None and spool.failed is None and spool.stats.bytes < spool.max_bytes:
            return None  # (asked before every statement)
        failed = self.failed or spool.failed
        if failed is not None:
            return ErrorInfo(
                "58030",
                f"pgwarden: statements are refused because {failed}; nothing may run unrecorded",
                hint="tell the platform team: the proxy's spool disk needs attention and the "
                "proxy a restart",
            )
        if self.spool.full:
            why = f": {self.shipper.error}" if self.shipper.error else ""
            return ErrorInfo(
                "53100",
                f"pgwarden: statements are refused because the recording spool is full "
                f"({self.spool.stats.bytes} of {self.spool.max_bytes} bytes not yet shipped to "
                f"{self.store.url}{why}); nothing may run unrecorded",
                hint="retry in a while; tell the platform team that recordings are not being "
                "shipped",
            )
        return None

    # ------------------------------------------------------------------ sessions
    def open_session(
        self, session_id: str, identity: str, level: str, details: dict[str, Any]
    ) -> SessionRecorder:
        rec = SessionRecorder(self, session_id, self.connection, identity, level)
        rec.begin(details)
        return rec


class SessionRecorder:
    """One session's chain: seq, the hash of the last event, and the events it appends.

    An event's line is built as bytes from parts that stay the same for the whole session
    (encoded once) and the JSON of its own fields: exactly the bytes `encode_event` makes of the
    whole event (keys in the same order, same encoding), at a fraction of the cost per event."""

    __slots__ = (
        "_ids",
        "_prev",
        "connection",
        "hash",
        "identity",
        "level",
        "recorder",
        "seq",
        "session_id",
        "start_iso",
        "statements",
    )

    def __init__(
        self, recorder: Recorder, session_id: str, connection: str, identity: str, level: str
    ) -> None:
        self.recorder = recorder
        self.session_id = session_id
        self.connection = connection
        self.identity = identity
        self.level = level
        self.seq = 0
        self.hash = genesis(session_id)
        self._prev = self.hash.encode()  # `hash`, as it goes into the next event's `prev`
        # `"sessionId":…,"connection":…,"identity":…,`, as `encode_event` encodes them
        self._ids = (
            encode_event({"sessionId": session_id, "connection": connection, "identity": identity})[
                1:-1
            ]
            + b","
        )
        self.start_iso = ""
        self.statements = 0

    def resume(self, seq: int, hash_: str, start_iso: str) -> None:
        """Continue a chain that a previous process left at `seq`, `hash_`."""
        self.seq, self.hash, self._prev, self.start_iso = seq, hash_, hash_.encode(), start_iso

    def _append(
        self,
        type_: str,
        fields: dict[str, Any],
        t: float | None = None,
        *,
        sync: bool = False,
    ) -> int:
        """Chain and spool one event; returns its ticket (-1: the spool failed). `sync`: see
        `Spool.append`."""
        if t is None:
            t = _time()
        sec = int(t)
        if sec != _second[0]:
            _second[0], _second[1] = sec, _strftime(_ISO_SECOND, _gmtime(sec)).encode()
        seq = self.seq + 1
        body = _dumps(fields, default=str, option=_NON_STR_KEYS)
        line = _LINE % (
            seq,
            self._prev,
            _second[1],
            int((t - sec) * 1_000_000),
            _TYPES[type_],
            self._ids,
            body[1:],
        )
        if len(body) == 2:  # no fields: no comma after the identity
            line = line[:-2] + b"}"
        h = _sha256(line).hexdigest()
        self.seq, self.hash, self._prev = seq, h, h.encode()
        if type_ == "session_start" or type_ == "session_end":
            track: Track | tuple[str, int, str] = self._track(type_, line)
        else:
            track = (self.session_id, seq, h)
        try:
            return self.recorder.spool.append(line, track, sync=sync)
        except SpoolError as e:
            log.error(
                "recording: event lost", extra={"session_id": self.session_id, "error": str(e)}
            )
            return -1

    def _track(self, type_: str, line: bytes) -> Track:
        meta = None
        if type_ == "session_start":
            self.start_iso = orjson.loads(line)["time"]
            meta = session_meta(self.session_id, self.connection, self.identity, self.start_iso)
        return Track(self.session_id, self.seq, self.hash, meta, type_ == "session_end")

    def begin(self, details: dict[str, Any]) -> int:
        if not _COMMON.isdisjoint(details):
            raise ValueError(f"session details must not name {sorted(_COMMON & details.keys())}")
        return self._append("session_start", {**details, "level": self.level})

    def statement(self, ev: StatementEvent, *, sync: bool) -> int:
        """A statement as decided, written before it runs; `sync`: the caller waits for the
        fsync (a statement that may change something)."""
        self.statements += 1
        ticket = self._append(
            "statement",
            {
                "statement": ev.statement,
                "parameters": ev.parameters,
                "fingerprint": ev.fingerprint,
                "classes": ev.classes,  # (a tuple is a JSON array)
                "command": ev.command,
                "protocol": ev.protocol,
                "decision": ev.decision,
                "policy": ev.policy,
            },
            ev.start,
            sync=sync,
        )
        ev.seq = self.seq
        return ticket

    def approval(self, ev: StatementEvent) -> int:
        a = ev.approval or {}
        return self._append(
            "approval",
            {
                "ref": ev.seq,
                "request": a.get("request"),
                "state": a.get("state"),
                "decidedBy": a.get("decidedBy"),
                "comment": a.get("comment"),
                "decision": ev.decision,
            },
            sync=True,
        )

    def outcome(self, ev: StatementEvent) -> None:
        fields: dict[str, Any] = {
            "ref": ev.seq,
            "decision": ev.decision,
            "durationMs": round(ev.duration_ms, 3),
            "rows": ev.rows,
            "bytes": ev.bytes,
            "commandTag": ev.command_tag,
            "error": ev.error,
            "suspended": ev.suspended,
        }
        if ev.result is not None:
            fields["result"] = ev.result
        self._append("outcome", fields)

    def end(
        self,
        reason: str,
        *,
        statements: int | None,
        duration_s: float | None,
        recovered: bool = False,
    ) -> None:
        now = time.time()
        count = None if recovered else statements
        self._append(
            "session_end",
            {
                "reason": reason,
                "statements": count,
                "durationS": duration_s,
                "recovered": recovered,
            },
            now,
        )
        manifest = {
            "v": VERSION,
            "sessionId": self.session_id,
            "connection": self.connection,
            "identity": self.identity,
            "start": self.start_iso,
            "end": iso(now),
            "events": self.seq,
            "lastSeq": self.seq,
            "finalHash": self.hash,
            "endReason": reason,
            "recovered": recovered,
            "statements": count,
        }
        meta = session_meta(self.session_id, self.connection, self.identity, self.start_iso)
        try:
            self.recorder.spool.append_internal(
                "manifest", {"prefix": meta["prefix"], "manifest": manifest}
            )
        except SpoolError as e:
            log.error(
                "recording: manifest lost", extra={"session_id": self.session_id, "error": str(e)}
            )
