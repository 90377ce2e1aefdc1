"""The recording spool: an append-only local log of framed, checksummed records.

Records are appended from the event loop into a buffer; one writer thread writes and fsyncs
whatever has accumulated (group commit) and reports the highest durable ticket. The log is cut
into segments: the open one is sealed (renamed `.seg`) at a size or an age, and the shipper
uploads and deletes sealed ones. Every segment begins with a checkpoint of the sessions open at
that point, so a restarted proxy can close the sessions its predecessor left open.

Frame: b"PW", payload length (u32 BE), CRC-32 of the payload (u32 BE), payload. A crash can tear
the last frame of the open segment; recovery keeps the complete frames before it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgwarden.recording.format import event_hash, session_prefix

log = logging.getLogger("pgwarden.recording")

MAGIC = b"PW"
_HEAD = struct.Struct(">2sII")
MAX_PAYLOAD = 64 * 1024 * 1024
# how long a record nobody waits for (a statement's outcome, a session's end) may stay
# unwritten; a record somebody waits for (a statement about to run) takes it along earlier
LAZY_SECONDS = 0.05


def frame(payload: bytes) -> bytes:
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def scan(data: bytes) -> tuple[list[bytes], int]:
    """The payloads of the complete, intact frames from the start of `data`, and the offset where
    they end (a torn or corrupt frame and everything after it are not trusted)."""
    payloads: list[bytes] = []
    pos, end = 0, len(data)
    size = _HEAD.size
    while pos + size <= end:
        magic, length, crc = _HEAD.unpack_from(data, pos)
        if magic != MAGIC or length > MAX_PAYLOAD or pos + size + length > end:
            break
        payload = data[pos + size : pos + size + length]
        if zlib.crc32(payload) != crc:
            break
        payloads.append(payload)
        pos += size + length
    return payloads, pos


class SpoolError(Exception):
    pass


@dataclass(slots=True)
class OpenSession:
    """What a checkpoint knows of a session still open: enough to continue its chain."""

    meta: dict[str, Any]  # connection, identity, start (epoch s), prefix
    seq: int = 0
    hash: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "seq": self.seq, "hash": self.hash}


def session_meta(session_id: str, connection: str, identity: str, start: str) -> dict[str, Any]:
    return {
        "connection": connection,
        "identity": identity,
        "start": start,
        "prefix": session_prefix(connection, start[:10], session_id),
    }


@dataclass(slots=True)
class Track:
    """What an appended record does to the set of open sessions."""

    session_id: str
    seq: int
    hash: str
    meta: dict[str, Any] | None = None  # session_start: the session's meta
    end: bool = False  # session_end


def _record_track(payload: bytes) -> tuple[str, Track | None]:
    """The kind of a spooled payload ("event", "checkpoint", "manifest") and, for events, its
    effect on the open sessions (read back during recovery)."""
    obj = json.loads(payload)
    kind = obj.get("spool")
    if kind is not None:
        return str(kind), None
    sid = obj["sessionId"]
    meta = None
    if obj["type"] == "session_start":
        meta = session_meta(sid, obj["connection"], obj["identity"], obj["time"])
    return "event", Track(sid, obj["seq"], event_hash(payload), meta, obj["type"] == "session_end")


@dataclass
class _Segment:
    path: Path
    fd: int
    size: int = 0
    records: int = 0
    first: float = 0.0  # monotonic time of its first record


@dataclass
class SpoolStats:
    bytes: int = 0  # unshipped, on disk and buffered
    segments: int = 0
    durable: int = 0  # tickets
    appended: int = 0
    batches: int = 0
    fsync_seconds: float = 0.0
    sealed_total: int = 0
    extra: dict[str, float] = field(default_factory=dict)


class Spool:
    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int,
        max_bytes: int,
        ship_interval: float,
        on_durable: Callable[[int], None],
        on_failed: Callable[[str], None],
        on_sealed: Callable[[], None] = lambda: None,
    ) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.ship_interval = ship_interval
        self._on_durable = on_durable
        self._on_failed = on_failed
        self._on_sealed = on_sealed
        self._cond = threading.Condition()
        self._buf: list[bytes] = []
        self._buf_tracks: list[Track] = []
        self._buf_bytes = 0
        self._buf_since = 0.0  # monotonic time of the oldest buffered record
        self._urgent = False  # a buffered record is waited for
        self._tickets = 0  # appended records
        # the sessions open after the records written so far (the writer's own; a new segment's
        # checkpoint is a copy, so it covers exactly the records of the segments before it)
        self._open: dict[str, OpenSession] = {}
        self._segment: _Segment | None = None
        self._last_name = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock_fd: int | None = None
        self.failed: str | None = None
        self.stats = SpoolStats()

    # ------------------------------------------------------------------ opening, recovery
    def open(self) -> dict[str, OpenSession]:
        """Take the directory, repair a torn tail, and return the sessions a previous process
        left open (their events are in the spool or already shipped)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._lock_fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(f"recording.spoolDir {self.dir} cannot be used: {e}") from e
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise SpoolError(
                f"recording.spoolDir {self.dir} is in use by another process (each proxy needs "
                "its own spool directory)"
            ) from e
        for stale in self.dir.glob(".*.tmp"):
            stale.unlink()
        for path in sorted(self.dir.glob("*.open")):
            self._repair(path)
        recovered: dict[str, OpenSession] = {}
        first = True
        for path in self.sealed():
            payloads, _ = scan(path.read_bytes())
            for payload in payloads:
                kind, track = _record_track(payload)
                if kind == "checkpoint":
                    if first:  # later checkpoints repeat what the records already say
                        for sid, o in json.loads(payload)["open"].items():
                            recovered[sid] = OpenSession(o["meta"], o["seq"], o["hash"])
                elif track is not None:
                    _apply(recovered, track)
                first = False
            self._last_name = max(self._last_name, int(path.stem))
            self.stats.bytes += path.stat().st_size
        self.stats.segments = len(self.sealed())
        self._open = dict(recovered)
        return recovered

    def _repair(self, path: Path) -> None:
        data = path.read_bytes()
        payloads, good = scan(data)
        if not payloads:
            path.unlink()
            return
        if good < len(data):
            log.warning(
                "spool: dropped a torn record at the end of a segment; its statement never ran",
                extra={"segment": path.name, "bytes": len(data) - good},
            )
            with open(path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        path.rename(path.with_suffix(".seg"))
        self._fsync_dir()

    def sealed(self) -> list[Path]:
        """Segments ready to ship, oldest first."""
        return sorted(self.dir.glob("*.seg"))

    # ------------------------------------------------------------------ writing
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pgwarden-spool", daemon=True)
        self._thread.start()

    @property
    def full(self) -> bool:
        return self.stats.bytes >= self.max_bytes

    def append(self, payload: bytes, track: Track | None = None, *, urgent: bool = True) -> int:
        """Queue a record; returns its ticket (durable once `on_durable` reported it).

        An urgent record (someone waits for it) is written at once; others wait for the next
        urgent one or for `LAZY_SECONDS`, so that one fsync covers both."""
        data = frame(payload)
        with self._cond:
            if self.failed is not None:
                raise SpoolError(self.failed)
            if not self._buf:
                self._buf_since = time.monotonic()
            self._buf.append(data)
            self._buf_bytes += len(data)
            self.stats.bytes += len(data)
            self._tickets += 1
            if track is not None:
                self._buf_tracks.append(track)
            wake = len(self._buf) == 1  # the writer's wait must now end by LAZY_SECONDS
            if urgent and not self._urgent:
                self._urgent = wake = True
            if wake:
                self._cond.notify()
            return self._tickets

    def append_internal(self, kind: str, body: dict[str, Any], *, urgent: bool = False) -> int:
        payload = json.dumps({"spool": kind, **body}, separators=(",", ":")).encode()
        return self.append(payload, urgent=urgent)

    def _ready(self) -> bool:
        """Whether the writer has work now (called holding the condition)."""
        if self._urgent or self._stopping or self._due():
            return True
        return bool(self._buf) and time.monotonic() - self._buf_since >= LAZY_SECONDS

    def close(self, timeout: float = 10.0) -> None:
        """Write what is buffered, seal the open segment, stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready():
                    self._cond.wait(self._wait_time())
                self._urgent = False
                batch, self._buf = self._buf, []
                tracks, self._buf_tracks = self._buf_tracks, []
                size, self._buf_bytes = self._buf_bytes, 0
                ticket = self._tickets
                stopping = self._stopping
            try:
                if self._due() or self._segment is None:
                    if batch:
                        self._rotate()
                    elif self._open and not stopping:
                        # sealed by age or size while sessions are open: the next segment
                        # begins with their checkpoint now, so that the spool still knows them
                        # after the sealed one is shipped and deleted (and a crash then)
                        self._rotate(sync=True)
                    else:
                        self._seal()  # sealed by age; the next record opens a new one
                if batch:
                    self._write(batch, size)
                    for track in tracks:
                        _apply(self._open, track)
                    self._on_durable(ticket)
                if stopping:
                    self._seal()
                    return
            except OSError as e:
                self._fail(f"the recording spool cannot be written ({self.dir}: {e})")
                return

    def _due(self) -> bool:
        seg = self._segment
        if seg is None or seg.records == 0:
            return False
        return seg.size >= self.segment_bytes or (
            time.monotonic() - seg.first >= self.ship_interval
        )

    def _wait_time(self) -> float | None:
        now = time.monotonic()
        waits = []
        if self._buf:
            waits.append(LAZY_SECONDS - (now - self._buf_since))
        seg = self._segment
        if seg is not None and seg.records:
            waits.append(self.ship_interval - (now - seg.first))
        return max(0.0, min(waits)) if waits else None

    def _write(self, batch: list[bytes], size: int) -> None:
        seg = self._segment
        assert seg is not None
        data = b"".join(batch)
        view = memoryview(data)
        while view:
            n = os.write(seg.fd, view)
            view = view[n:]
        t0 = time.perf_counter()
        os.fdatasync(seg.fd)
        self.stats.fsync_seconds += time.perf_counter() - t0
        self.stats.batches += 1
        self.stats.appended += len(batch)
        if seg.records == 0:
            seg.first = time.monotonic()
        seg.size += size
        seg.records += len(batch)

    def _rotate(self, sync: bool = False) -> None:
        self._seal()
        snapshot = {k: v.as_json() for k, v in self._open.items()}
        name = max(time.time_ns(), self._last_name + 1)
        self._last_name = name
        path = self.dir / f"{name:020d}.open"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._segment = _Segment(path, fd)
        self._fsync_dir()
        head = frame(json.dumps({"spool": "checkpoint", "open": snapshot}).encode())
        os.write(fd, head)
        if sync:  # no record follows at once (whose write would sync the checkpoint too)
            os.fdatasync(fd)
        self._segment.size = len(head)
        with self._cond:
            self.stats.bytes += len(head)

    def _seal(self) -> None:
        seg, self._segment = self._segment, None
        if seg is None:
            return
        os.fdatasync(seg.fd)
        os.close(seg.fd)
        if seg.records == 0:
            seg.path.unlink()
            with self._cond:
                self.stats.bytes -= seg.size
            return
        seg.path.rename(seg.path.with_suffix(".seg"))
        self._fsync_dir()
        with self._cond:
            self.stats.segments += 1
            self.stats.sealed_total += 1
        self._on_sealed()

    def _fsync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _fail(self, message: str) -> None:
        log.error("spool: the recording spool failed", extra={"error": message})
        with self._cond:
            self.failed = message
            self._buf.clear()
        if self._segment is not None:
            with contextlib.suppress(OSError):
                os.close(self._segment.fd)
            self._segment = None
        self._on_failed(message)

    # ------------------------------------------------------------------ shipping
    def read(self, path: Path) -> Iterator[bytes]:
        payloads, _ = scan(path.read_bytes())
        return iter(payloads)

    def shipped(self, path: Path) -> None:
        """The sink confirmed everything in `path`: it may go."""
        size = path.stat().st_size
        path.unlink()
        self._fsync_dir()
        with self._cond:
            self.stats.bytes -= size
            self.stats.segments -= 1


def _apply(open_sessions: dict[str, OpenSession], track: Track) -> None:
    if track.end:
        open_sessions.pop(track.session_id, None)
        return
    s = open_sessions.get(track.session_id)
    if s is None:
        if track.meta is None:
            return  # a session whose start was shipped before the checkpoint we began from
        s = open_sessions[track.session_id] = OpenSession(track.meta)
    s.seq, s.hash = track.seq, track.hash
