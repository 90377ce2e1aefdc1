"""The recording spool: an append-only local log of framed, checksummed records.

Records are appended from the event loop straight into the open segment (a mapped file); one
writer thread fsyncs whatever has accumulated (group commit) and reports the highest durable
ticket. The log is cut
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
import math
import mmap
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pgwarden.recording.format import event_hash, session_prefix

log = logging.getLogger("pgwarden.recording")

MAGIC = b"PW"
_HEAD = struct.Struct(">2sII")
MAX_PAYLOAD = 256 * 1024 * 1024  # limits.maxMessageBytes at most: a statement's text fits
HEADROOM = 1024 * 1024
# how long a record nobody waits for (a read, a statement's outcome, a session's end) may stay
# unsynced; an urgent record takes them along earlier
LAZY_SECONDS = 0.05


_crc32 = zlib.crc32
_monotonic = time.monotonic


def frame(payload: bytes) -> bytes:
    return _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def frames(data: bytes) -> Iterator[tuple[bytes, int]]:
    """The intact frames from the start of `data`, one at a time: each payload and the offset
    where its frame ends (a torn or corrupt frame and everything after it are not trusted)."""
    pos, end = 0, len(data)
    size = _HEAD.size
    unpack = _HEAD.unpack_from
    while pos + size <= end:
        magic, length, crc = unpack(data, pos)
        if magic != MAGIC or length > MAX_PAYLOAD or pos + size + length > end:
            return
        payload = data[pos + size : pos + size + length]
        if _crc32(payload) != crc:
            return
        pos += size + length
        yield payload, pos


def scan(data: bytes) -> tuple[list[bytes], int]:
    """The payloads of the complete, intact frames from the start of `data`, and the offset where
    they end."""
    payloads: list[bytes] = []
    end = 0
    for payload, frame_end in frames(data):
        payloads.append(payload)
        end = frame_end
    return payloads, end


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


def _track_of(obj: dict[str, Any], payload: bytes) -> Track:
    """An event's effect on the open sessions (read back during recovery)."""
    sid = obj["sessionId"]
    meta = None
    if obj["type"] == "session_start":
        meta = session_meta(sid, obj["connection"], obj["identity"], obj["time"])
    return Track(sid, obj["seq"], event_hash(payload), meta, obj["type"] == "session_end")


def _manifest_of(session: OpenSession, end: dict[str, Any], final_hash: str) -> dict[str, Any]:
    """The manifest of a session whose end is in the spool but whose manifest is not (a crash
    between the two)."""
    meta = session.meta
    return {
        "v": 1,
        "sessionId": end["sessionId"],
        "connection": meta["connection"],
        "identity": meta["identity"],
        "start": meta["start"],
        "end": end["time"],
        "events": end["seq"],
        "lastSeq": end["seq"],
        "finalHash": final_hash,
        "endReason": end.get("reason") or "",
        "recovered": bool(end.get("recovered")),
        "statements": end.get("statements"),
    }


@dataclass(slots=True)
class _Segment:
    """The open segment: a file of reserved size, mapped, so that writing a record is a copy
    into the page cache (which outlives a killed process) and not a system call."""

    path: Path
    fd: int
    map: mmap.mmap
    capacity: int
    size: int = 0  # bytes used
    records: int = 0
    first: float = 0.0  # monotonic time of its first record

    def put(self, data: bytes) -> None:
        end = self.size + len(data)
        self.map[self.size : end] = data
        self.size = end


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


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries durable (a file created, renamed or removed in it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SealedSegments:
    """A spool directory's sealed segments: what the shipper reads and removes. The shipper runs
    in a process of its own (shipper_process), so nothing here touches the writing side; it
    learns of a removal through `on_removed(size)`."""

    def __init__(
        self, directory: Path, on_removed: Callable[[int], None] = lambda size: None
    ) -> None:
        self.dir = directory
        self._on_removed = on_removed

    def sealed(self) -> list[Path]:
        """Segments ready to ship, oldest first."""
        return sorted(self.dir.glob("*.seg"))

    def read(self, path: Path) -> Iterator[bytes]:
        """The records of a sealed segment, read one at a time."""
        return (payload for payload, _ in frames(path.read_bytes()))

    def shipped(self, path: Path) -> None:
        """The sink confirmed everything in `path`: it may go."""
        size = path.stat().st_size
        path.unlink()
        fsync_dir(self.dir)
        self._on_removed(size)


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
        self.segments = SealedSegments(directory, on_removed=self.released)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.hard_limit = max_bytes + max(1024 * 1024, max_bytes // 20)
        self.ship_interval = ship_interval
        self._on_durable = on_durable
        self._on_failed = on_failed
        self._on_sealed = on_sealed
        # `with self._lock` on the hot path (a Condition's own __enter__ is Python code)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._tickets = 0  # records appended (each written to the open segment at once)
        self._written = 0  # records written to a segment file (safe from a killed process)
        self._written_since = 0.0  # when the oldest record not yet fsynced was written
        self._synced = 0  # records fsynced (safe from a machine crash)
        self._reported = 0  # the highest ticket given to on_durable
        self._sync_wanted = False  # an urgent record waits for an fsync
        self._wakes_at = 0.0  # when the waiting writer wakes by itself (0: it is awake)
        # the sessions open after the records written so far (the writer's own; a new segment's
        # checkpoint is a copy, so it covers exactly the records of the segments before it)
        self._open: dict[str, OpenSession] = {}
        self._segment: _Segment | None = None
        # Rotation costs the event loop no system call that waits for the disk: the writer keeps
        # the next segment ready (`_spare`: created, reserved, mapped), and a segment switched
        # away from (`_unsealed`) is fsynced and sealed by the writer outside the lock, after
        # the new segment's checkpoint is durable (`_fresh` until then).
        self._spare: _Segment | None = None
        self._unsealed: list[_Segment] = []
        self._fresh = False
        self._last_name = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock_fd: int | None = None
        self.failed: str | None = None
        self.stats = SpoolStats()
        # (prefix, manifest) of sessions that ended in the spool without their manifest
        self.unwritten_manifests: list[tuple[str, dict[str, Any]]] = []

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
        for stale in [*self.dir.glob(".*.tmp"), *self.dir.glob("*.next")]:
            stale.unlink()  # (a `.next` segment is a spare: nothing was ever written to it)
        for path in sorted(self.dir.glob("*.open")):
            self._repair(path)
        recovered: dict[str, OpenSession] = {}
        ended: dict[str, tuple[str, dict[str, Any]]] = {}  # session ends without a manifest yet
        first = True
        for path in self.sealed():
            payloads, _ = scan(path.read_bytes())
            for payload in payloads:
                obj = orjson.loads(payload)
                kind = obj.get("spool")
                if kind == "checkpoint":
                    if first:  # later checkpoints repeat what the records already say
                        for sid, o in obj["open"].items():
                            recovered[sid] = OpenSession(o["meta"], o["seq"], o["hash"])
                elif kind == "manifest":
                    ended.pop(obj["manifest"]["sessionId"], None)
                else:
                    track = _track_of(obj, payload)
                    session = recovered.get(track.session_id)
                    if track.end and session is not None:
                        prefix = session.meta["prefix"]
                        ended[track.session_id] = (prefix, _manifest_of(session, obj, track.hash))
                    _apply(recovered, track)
                first = False
            self._last_name = max(self._last_name, int(path.stem))
            self.stats.bytes += path.stat().st_size
        self.stats.segments = len(self.sealed())
        self._open = dict(recovered)
        self.unwritten_manifests = list(ended.values())
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
        return self.segments.sealed()

    # ------------------------------------------------------------------ writing
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pgwarden-spool", daemon=True)
        self._thread.start()

    @property
    def full(self) -> bool:
        return self.stats.bytes >= self.max_bytes

    def append(
        self,
        payload: bytes,
        track: Track | tuple[str, int, str] | None = None,
        *,
        sync: bool = False,
    ) -> int:
        """Add a record; returns its ticket, durable once `on_durable` reported it. `track`: its
        effect on the open sessions; a tuple (session id, seq, hash) for an event that only moves
        its session's chain on.

        Every record is written to the open segment at once, in the caller's thread (a copy into
        the mapped file), so that a killed process cannot lose it. `sync`: also fsynced at once
        (group commit: one fsync covers every record written meanwhile), for a caller that
        waits for it; otherwise it is fsynced within LAZY_SECONDS of its write."""
        data = _HEAD.pack(MAGIC, len(payload), _crc32(payload)) + payload  # frame(payload)
        n = len(data)
        with self._lock:
            if self.failed is not None:
                raise SpoolError(self.failed)
            stats = self.stats
            if stats.bytes > self.hard_limit:
                # past `full`, only what is in flight is still taken (outcomes, refusals,
                # session ends); a client that keeps trying is stopped here
                raise SpoolError(f"the recording spool is over its bound ({self.max_bytes} bytes)")
            seg = self._segment
            if seg is None or seg.size + n > seg.capacity:
                try:
                    self._rotate(n)  # (the writer rotates earlier, unless writes outrun it)
                except OSError as e:
                    self._fail(f"the recording spool cannot be written ({self.dir}: {e})")
                    raise SpoolError(self.failed or "") from e
                seg = self._segment
                assert seg is not None
            if not seg.records:
                seg.first = _monotonic()
            start = seg.size
            seg.map[start : start + n] = data
            seg.size = start + n
            seg.records += 1
            stats.bytes += n
            stats.appended += 1
            self._tickets = self._written = ticket = self._tickets + 1
            if track is not None:
                if track.__class__ is tuple:  # most events: the chain moves on
                    sid, seq, hash_ = track
                    session = self._open.get(sid)
                    if session is not None:
                        session.seq, session.hash = seq, hash_
                else:
                    _apply(self._open, track)  # type: ignore[arg-type]
            if sync:
                if not self._sync_wanted:
                    self._sync_wanted = True
                    self._cond.notify()
            elif ticket - 1 == self._synced:  # the first record the next fsync is for
                t = self._written_since = _monotonic()
                if self._wakes_at > t + LAZY_SECONDS:
                    self._cond.notify()  # the writer times the lazy fsync from now
            elif self._wakes_at and seg.size >= self.segment_bytes:
                self._cond.notify()  # time to seal it
            return ticket

    def append_internal(self, kind: str, body: dict[str, Any]) -> int:
        return self.append(json.dumps({"spool": kind, **body}, separators=(",", ":")).encode())

    def close(self, timeout: float = 10.0) -> None:
        """Seal the open segment, stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _ready(self) -> bool:
        """Whether the writer has work now (called holding the condition)."""
        if self._sync_wanted or self._stopping or self._due() or self._synced > self._reported:
            return True
        if self._unsealed or self._fresh or (self._spare is None and self.failed is None):
            return True
        return (
            self._written > self._synced and time.monotonic() - self._written_since >= LAZY_SECONDS
        )

    def _run(self) -> None:
        while True:
            try:
                with self._cond:
                    while not self._ready():
                        wait = self._wait_time()
                        self._wakes_at = math.inf if wait is None else time.monotonic() + wait
                        self._cond.wait(wait)
                        self._wakes_at = 0.0
                    self._sync_wanted = False
                    stopping = self._stopping
                    if stopping:
                        self._detach()
                    ticket = self._written
                    seg = self._segment
                    unsealed, self._unsealed = self._unsealed, []
                    fresh, self._fresh = self._fresh, False
                    unsynced = ticket > self._synced
                    # what is written from now on waits for the next fsync: its LAZY_SECONDS
                    # count from here at the latest (not from the oldest record this one covers)
                    written_after = _monotonic()
                # without the lock: appends go on meanwhile. Every record up to `ticket` is in
                # `seg` or in a segment switched away from (`unsealed`, or sealed before).
                if seg is not None and (unsynced or fresh):
                    t0 = time.perf_counter()
                    os.fdatasync(seg.fd)
                    self.stats.fsync_seconds += time.perf_counter() - t0
                    self.stats.batches += 1
                if fresh:
                    self._fsync_dir()  # the new segment's name: its checkpoint is durable now
                sealed = [old for old in unsealed if self._seal(old)]
                if unsealed:
                    self._fsync_dir()
                with self._cond:
                    if ticket > self._synced:
                        self._synced = ticket
                        if self._written > ticket:
                            self._written_since = written_after
                    self.stats.segments += len(sealed)
                    self.stats.sealed_total += len(sealed)
                if sealed:
                    self._on_sealed()
                durable = self._synced
                if durable > self._reported:
                    self._reported = durable
                    self._on_durable(durable)
                if stopping:
                    with self._cond:
                        spare, self._spare = self._spare, None
                    if spare is not None:
                        self._discard(spare)
                    return
                with self._cond:
                    if self._due():
                        if self._open:
                            self._rotate()  # the next segment's checkpoint keeps the sessions
                        else:
                            self._detach()  # sealed by age; the next record opens a new one
                    need_spare = self._spare is None and self.failed is None
                    name = self._next_name() if need_spare else 0
                if need_spare:
                    spare = self._create(name, self.segment_bytes + HEADROOM, ".next")
                    with self._cond:
                        # only if no segment was named since: segments are named in order
                        if self._spare is None and self.failed is None and self._last_name == name:
                            self._spare, spare = spare, None
                    if spare is not None:
                        self._discard(spare)
            except OSError as e:
                with self._cond:
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
        if self._written > self._synced:
            waits.append(LAZY_SECONDS - (now - self._written_since))
        seg = self._segment
        if seg is not None and seg.records:
            waits.append(self.ship_interval - (now - seg.first))
        return max(0.0, min(waits)) if waits else None

    def _next_name(self) -> int:
        """(Holding the lock.) Segment names are nanosecond times, increasing in record order."""
        name = max(time.time_ns(), self._last_name + 1)
        self._last_name = name
        return name

    def _create(self, name: int, capacity: int, suffix: str = ".open") -> _Segment:
        """An empty open segment (`.next`: a spare), its blocks reserved and mapped."""
        path = self.dir / f"{name:020d}{suffix}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, capacity)  # blocks reserved now: a full disk fails here,
            # cleanly, not later in a page fault (SIGBUS)
            mapped = mmap.mmap(fd, capacity)
        except OSError:
            os.close(fd)
            path.unlink()
            raise
        return _Segment(path, fd, mapped, capacity)

    def _discard(self, seg: _Segment) -> None:
        """An open segment that holds nothing goes (a spare not used)."""
        seg.map.close()
        os.close(seg.fd)
        seg.path.unlink()

    def _rotate(self, room: int = 0) -> None:
        """(Holding the lock.) Switch to the next segment, its checkpoint first. The writer
        makes the checkpoint durable and then seals the segment before, outside the lock (so
        that a crash between the two never leaves the open sessions unknown)."""
        snapshot = {k: v.as_json() for k, v in self._open.items()}
        head = frame(json.dumps({"spool": "checkpoint", "open": snapshot}).encode())
        need = len(head) + room
        seg, self._spare = self._spare, None
        if seg is not None and seg.capacity >= need:
            path = seg.path.with_suffix(".open")
            seg.path.rename(path)  # (the writer fsyncs the directory with the checkpoint)
            seg.path = path
        else:
            if seg is not None:
                self._discard(seg)  # a record larger than a segment: rare, and named in order
            # the writer seals at segment_bytes; the headroom takes what arrives until it does
            seg = self._create(self._next_name(), max(self.segment_bytes + HEADROOM, need))
        seg.put(head)
        self.stats.bytes += len(head)
        self._detach()
        self._segment = seg
        self._fresh = True
        self._cond.notify()

    def _detach(self) -> None:
        """(Holding the lock.) No more records go to the open segment; the writer seals it."""
        seg, self._segment = self._segment, None
        if seg is not None:
            self._unsealed.append(seg)
            self._cond.notify()

    def _seal(self, seg: _Segment) -> bool:
        """(The writer, without the lock.) Make a segment switched away from durable and
        shippable; False when it held no record (it goes)."""
        os.fdatasync(seg.fd)
        seg.map.close()
        os.ftruncate(seg.fd, seg.size)  # the unused reservation goes (trailing zeros would
        # be harmless: a scan stops at them)
        os.close(seg.fd)
        if seg.records == 0:
            seg.path.unlink()
            with self._cond:
                self.stats.bytes -= seg.size
            return False
        seg.path.rename(seg.path.with_suffix(".seg"))
        return True

    def _fsync_dir(self) -> None:
        fsync_dir(self.dir)

    def _fail(self, message: str) -> None:
        """(Holding the condition.) Nothing more is written: what is not durable is lost, and
        the proxy refuses statements from now on."""
        if self.failed is not None:
            return
        log.error("spool: the recording spool failed", extra={"error": message})
        self.failed = message
        # No more records go anywhere. The open and unsealed segments stay as they are (the
        # writer may be fsyncing one without the lock: closing its descriptor here could let
        # the number name another file meanwhile); the next start repairs and ships them.
        self._segment = None
        self._unsealed = []
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(OSError, ValueError, BufferError):
                self._discard(spare)
        self._on_failed(message)

    # ------------------------------------------------------------------ shipping
    def released(self, size: int) -> None:
        """A sealed segment of `size` bytes was shipped and removed (by the shipper's process)."""
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
