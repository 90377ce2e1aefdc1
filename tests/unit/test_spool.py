"""The recording spool: framing, group commit, rotation, torn-tail repair, crash recovery.

Real files and real fsync in a temporary directory. A crash is simulated by copying the spool
directory while the spool is running (after the events are durable) and opening the copy with a
fresh `Spool` or `Recorder`: the copy is what a `kill -9` would have left on disk.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import pgwarden_proxy.recording.spool as spool_mod
from pgwarden.api.config import Recording
from pgwarden.recording.format import (
    Manifest,
    encode_event,
    event_hash,
    genesis,
    iso,
    manifest_key,
    session_index_key,
)
from pgwarden.recording.store import FileStore
from pgwarden_proxy.events import StatementEvent
from pgwarden_proxy.recording.recorder import Recorder
from pgwarden_proxy.recording.spool import (
    MAGIC,
    OpenSession,
    Spool,
    SpoolError,
    Track,
    frame,
    scan,
    session_meta,
)

HEAD = 10  # b"PW", length u32, CRC-32 u32
CONNECTION = "orders-db"
IDENTITY = "bot@example.com"


# ---------------------------------------------------------------------------------- helpers
def wait_for(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class Chain:
    """One session's events, chained the way `SessionRecorder` chains them."""

    def __init__(self, session_id: str, connection: str = CONNECTION, identity: str = IDENTITY):
        self.sid = session_id
        self.connection = connection
        self.identity = identity
        self.seq = 0
        self.hash = genesis(session_id)
        self.lines: list[bytes] = []

    def event(self, type_: str, **fields: Any) -> tuple[bytes, Track]:
        self.seq += 1
        line = encode_event(
            {
                "v": 1,
                "seq": self.seq,
                "prev": self.hash,
                "time": iso(time.time()),
                "type": type_,
                "sessionId": self.sid,
                "connection": self.connection,
                "identity": self.identity,
                **fields,
            }
        )
        self.hash = event_hash(line)
        self.lines.append(line)
        meta = None
        if type_ == "session_start":
            start = json.loads(line)["time"]
            meta = session_meta(self.sid, self.connection, self.identity, start)
        return line, Track(self.sid, self.seq, self.hash, meta, type_ == "session_end")

    def start(self) -> tuple[bytes, Track]:
        return self.event("session_start", level="statements")

    def statement(self, text: str = "SELECT 1") -> tuple[bytes, Track]:
        return self.event("statement", statement=text, decision="allow")

    def end(self) -> tuple[bytes, Track]:
        return self.event("session_end", reason="client terminated", recovered=False)


class Harness:
    """A spool in `directory` whose callbacks are recorded."""

    def __init__(self, directory: Path, **options: Any) -> None:
        self.tickets: list[int] = []
        self.failures: list[str] = []
        self.sealed_calls = 0
        self._lock = threading.Lock()
        kwargs: dict[str, Any] = {
            "segment_bytes": 1 << 20,
            "max_bytes": 1 << 30,
            "ship_interval": 60.0,
        }
        kwargs.update(options)
        self.spool = Spool(
            directory,
            on_durable=self._durable,
            on_failed=self.failures.append,
            on_sealed=self._sealed,
            **kwargs,
        )

    def _durable(self, ticket: int) -> None:
        with self._lock:
            self.tickets.append(ticket)

    def _sealed(self) -> None:
        self.sealed_calls += 1

    @property
    def durable(self) -> int:
        with self._lock:
            return self.tickets[-1] if self.tickets else 0

    def open(self) -> dict[str, OpenSession]:
        recovered = self.spool.open()
        self.spool.start()
        return recovered

    def append(self, record: tuple[bytes, Track]) -> int:
        return self.spool.append(*record, sync=True)

    def append_durable(self, record: tuple[bytes, Track]) -> int:
        ticket = self.append(record)
        self.wait_durable(ticket)
        return ticket

    def wait_durable(self, ticket: int) -> None:
        wait_for(lambda: self.durable >= ticket, what=f"ticket {ticket} to be durable")


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    """Spools made by a test are closed after it (a crashed one never is: that is the point)."""
    made: list[Harness] = []
    yield made
    for h in made:
        h.spool.close()


@pytest.fixture
def make(harnesses: list[Harness]) -> Callable[..., Harness]:
    def make(directory: Path, **options: Any) -> Harness:
        h = Harness(directory, **options)
        harnesses.append(h)
        return h

    return make


def payloads_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    payloads, end = scan(data)
    if path.suffix == ".open":  # the open segment's reserved, unused space reads as zeros
        assert not data[end:].strip(b"\x00"), f"{path.name} has bytes after its last frame"
    else:
        assert end == len(data), f"{path.name} has bytes after its last intact frame"
    return payloads


def kind(payload: bytes) -> str:
    obj = json.loads(payload)
    return str(obj.get("spool", "event"))


def frame_bounds(data: bytes) -> list[tuple[int, int]]:
    bounds, pos = [], 0
    for payload in scan(data)[0]:
        bounds.append((pos, pos + HEAD + len(payload)))
        pos += HEAD + len(payload)
    return bounds


def crash_copy(src: Path, dst: Path) -> Path:
    """What a kill -9 leaves: the directory as it is on disk now (no close, no seal)."""
    shutil.copytree(src, dst)
    return dst


def used(path: Path) -> int:
    """Bytes a segment holds: the open one has its unused reservation after its frames."""
    if path.suffix == ".open":
        return scan(path.read_bytes())[1]
    return path.stat().st_size


def size_on_disk(directory: Path) -> int:
    return sum(used(p) for p in directory.iterdir() if p.suffix in (".seg", ".open"))


def spool_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------------- framing
payload_lists = st.lists(st.binary(max_size=300), max_size=12)


@given(payload_lists)
def test_scan_returns_every_framed_payload(payloads: list[bytes]) -> None:
    data = b"".join(frame(p) for p in payloads)
    assert scan(data) == (payloads, len(data))


@given(payload_lists, st.data())
def test_scan_of_a_truncation_keeps_exactly_the_complete_frames(
    payloads: list[bytes], data: st.DataObject
) -> None:
    frames = [frame(p) for p in payloads]
    whole = b"".join(frames)
    cut = data.draw(st.integers(0, len(whole)), label="cut")
    expected, end = [], 0
    for p, f in zip(payloads, frames, strict=True):
        if end + len(f) > cut:
            break
        expected.append(p)
        end += len(f)
    assert scan(whole[:cut]) == (expected, end)


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=12), st.data())
def test_scan_stops_at_a_corrupted_frame(payloads: list[bytes], data: st.DataObject) -> None:
    frames = [frame(p) for p in payloads]
    index = data.draw(st.integers(0, len(frames) - 1), label="frame")
    offset = data.draw(st.integers(0, len(frames[index]) - 1), label="byte")
    flip = data.draw(st.integers(1, 255), label="xor")
    bad = bytearray(frames[index])
    bad[offset] ^= flip
    start = sum(len(f) for f in frames[:index])
    whole = b"".join(frames[:index]) + bytes(bad) + b"".join(frames[index + 1 :])
    assert scan(whole) == (payloads[:index], start)


@given(payload_lists, st.binary(min_size=1, max_size=64))
def test_scan_ignores_garbage_after_the_frames(payloads: list[bytes], garbage: bytes) -> None:
    # garbage that is itself a valid frame would be a frame; a header's magic is where that starts
    assume(not garbage.startswith(MAGIC))
    data = b"".join(frame(p) for p in payloads)
    assert scan(data + garbage) == (payloads, len(data))


def test_scan_rejects_an_absurd_length() -> None:
    good = frame(b"ok")
    bogus = MAGIC + (spool_mod.MAX_PAYLOAD + 1).to_bytes(4, "big") + b"\0\0\0\0"
    assert scan(good + bogus + b"x" * 64) == ([b"ok"], len(good))


# ---------------------------------------------------------------------------------- writing
def test_group_commit_reports_every_append_durable(tmp_path: Path, make: Any) -> None:
    h = make(tmp_path / "spool")
    assert h.open() == {}
    chains = [Chain(f"s{i}") for i in range(4)]
    tickets = [h.append(c.start()) for c in chains]
    n = 2000
    for i in range(n):
        tickets.append(h.append(chains[i % 4].statement(f"SELECT {i}")))
    assert tickets == list(range(1, len(tickets) + 1))
    h.wait_durable(tickets[-1])

    assert h.tickets == sorted(set(h.tickets)), "durable tickets go up, each reported once"
    assert h.tickets[-1] == len(tickets)
    stats = h.spool.stats
    assert stats.appended == len(tickets)
    assert 1 <= stats.batches <= len(tickets)
    assert len(h.tickets) == stats.batches
    assert h.failures == []

    # on disk, in append order, after one checkpoint
    (open_seg,) = tmp_path.joinpath("spool").glob("*.open")
    payloads = payloads_of(open_seg)
    assert kind(payloads[0]) == "checkpoint"
    expected = {c.sid: iter(c.lines) for c in chains}
    for payload in payloads[1:]:
        assert payload == next(expected[json.loads(payload)["sessionId"]])
    assert len(payloads) == 1 + len(tickets)
    assert stats.bytes == used(open_seg)


def test_close_seals_the_open_segment(tmp_path: Path, make: Any) -> None:
    h = make(tmp_path / "spool")
    h.open()
    c = Chain("a")
    for record in (c.start(), c.statement(), c.end()):
        h.append(record)
    h.spool.close()
    (seg,) = h.spool.sealed()
    assert seg.suffix == ".seg"
    assert [kind(p) for p in payloads_of(seg)] == ["checkpoint", "event", "event", "event"]
    assert payloads_of(seg)[1:] == c.lines
    assert spool_files(tmp_path / "spool") == [seg.name]
    assert h.sealed_calls == 1


def test_a_record_nobody_waits_for_is_written_without_an_urgent_one(
    tmp_path: Path, make: Any
) -> None:
    h = make(tmp_path / "spool")
    h.open()
    a = Chain("a")
    h.wait_durable(h.spool.append(*a.start()))  # the writer was idle
    h.wait_durable(h.spool.append(*a.statement()))  # ship_interval is far off
    h.wait_durable(h.spool.append_internal("manifest", {"prefix": "p/", "manifest": {}}))
    (open_seg,) = (tmp_path / "spool").glob("*.open")
    assert [kind(p) for p in payloads_of(open_seg)] == [
        "checkpoint",
        "event",
        "event",
        "manifest",
    ]


def checkpoint_of(path: Path) -> dict[str, Any]:
    first = payloads_of(path)[0]
    obj = json.loads(first)
    assert obj["spool"] == "checkpoint", f"{path.name} does not begin with a checkpoint"
    open_: dict[str, Any] = obj["open"]
    return open_


def replay(segments: list[Path]) -> Iterator[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    for seg in segments:
        events = [json.loads(p) for p in payloads_of(seg)[1:] if kind(p) == "event"]
        yield seg, checkpoint_of(seg), events


def assert_checkpoints_consistent(segments: list[Path]) -> None:
    """Each segment's checkpoint names exactly the sessions open before its first record, at
    the seq and hash of their last event in the segments before it."""
    open_: dict[str, tuple[int, str]] = {}
    for seg, checkpoint, events in replay(segments):
        assert {sid: (o["seq"], o["hash"]) for sid, o in checkpoint.items()} == open_, seg.name
        for ev in events:
            line = encode_event(ev)
            if ev["type"] == "session_end":
                open_.pop(ev["sessionId"], None)
            else:
                open_[ev["sessionId"]] = (ev["seq"], event_hash(line))


def test_rotation_by_size(tmp_path: Path, make: Any) -> None:
    h = make(tmp_path / "spool", segment_bytes=2048)
    h.open()
    a, b = Chain("a"), Chain("b")
    h.append_durable(a.start())
    h.append_durable(b.start())
    for i in range(60):
        h.append_durable((a if i % 3 else b).statement(f"SELECT {i}, '{'x' * 100}'"))
        if i == 40:
            h.append_durable(b.end())
            b = Chain("c")
            h.append_durable(b.start())
    wait_for(lambda: len(h.spool.sealed()) >= 3, what="segments sealed by size")
    h.spool.close()

    segments = h.spool.sealed()
    assert h.sealed_calls == len(segments)
    largest = max(len(line) for line in [*a.lines, *b.lines]) + HEAD
    for seg in segments:
        assert seg.stat().st_size < 2048 + largest  # sealed at the size (plus one batch)
    assert_checkpoints_consistent(segments)
    events = [ev for _, _, evs in replay(segments) for ev in evs]
    assert [encode_event(ev) for ev in events if ev["sessionId"] == "a"] == a.lines
    assert [encode_event(ev) for ev in events if ev["sessionId"] == "c"] == b.lines


def test_the_appending_thread_never_waits_for_the_disk(
    tmp_path: Path, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends come from the event loop: rotations (by the writer, or by an append that outran
    it) switch to a segment made ready beforehand; fsyncs and seals happen in the writer."""
    h = make(tmp_path / "spool", segment_bytes=4096)
    h.open()
    syncing: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd: int) -> None:
        syncing.append(threading.current_thread().name)
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        syncing.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr("pgwarden_proxy.recording.spool.os.fdatasync", fdatasync)
    monkeypatch.setattr("pgwarden_proxy.recording.spool.os.fsync", fsync)
    a = Chain("a")
    h.append_durable(a.start())
    for i in range(300):  # rotations by the writer, by size
        ticket = h.spool.append(*a.statement(f"SELECT {i}, '{'x' * 100}'"))
        if i % 20 == 0:
            h.wait_durable(ticket)
    # a record larger than the segment made ready: this append opens one itself
    h.spool.append(*a.statement("SELECT '" + "x" * (2 << 20) + "'"))
    h.append_durable(a.end())
    h.spool.close()
    monkeypatch.undo()

    assert set(syncing) == {"pgwarden-spool"}
    segments = h.spool.sealed()
    assert len(segments) >= 5
    assert spool_files(tmp_path / "spool") == [seg.name for seg in segments]  # no spare left
    assert_checkpoints_consistent(segments)
    events = [ev for _, _, evs in replay(segments) for ev in evs]
    assert [encode_event(ev) for ev in events] == a.lines


def test_a_crash_between_a_switch_and_its_seal_loses_nothing(
    tmp_path: Path, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the spool switched segments but before the writer sealed the one before:
    the next start finds both open segments (and a spare) and keeps every record, in order."""
    spool_dir = tmp_path / "spool"
    h = make(spool_dir, segment_bytes=2048)
    sealing, release = threading.Event(), threading.Event()
    real_seal = Spool._seal

    def held_seal(self: Spool, seg: Any) -> bool:
        sealing.set()
        release.wait(30)  # the crash comes first
        return real_seal(self, seg)

    h.open()
    a, b = Chain("a"), Chain("b")
    h.append_durable(a.start())
    h.append_durable(b.start())
    monkeypatch.setattr(Spool, "_seal", held_seal)
    for i in range(40):
        h.spool.append(*(a if i % 2 else b).statement(f"SELECT {i}, '{'x' * 100}'"))
    wait_for(sealing.is_set, what="the writer to start sealing")
    crashed = crash_copy(spool_dir, tmp_path / "crashed")
    assert len(list(crashed.glob("*.open"))) >= 2

    spool = make(crashed).spool
    recovered = spool.open()
    assert spool_files(crashed) == [seg.name for seg in spool.sealed()]  # no .open, no .next
    segments = spool.sealed()
    assert_checkpoints_consistent(segments)
    events = [ev for _, _, evs in replay(segments) for ev in evs]
    for chain in (a, b):
        assert [encode_event(ev) for ev in events if ev["sessionId"] == chain.sid] == chain.lines
    assert {sid: s.seq for sid, s in recovered.items()} == {"a": a.seq, "b": b.seq}
    release.set()


def test_rotation_by_age(tmp_path: Path, make: Any) -> None:
    h = make(tmp_path / "spool", ship_interval=0.2)
    h.open()
    a = Chain("a")
    h.append(a.start())
    h.wait_durable(h.append(a.statement()))
    wait_for(lambda: h.sealed_calls >= 1, what="a segment sealed by age")
    first = h.spool.sealed()[0]
    h.append(a.statement("SELECT 2"))
    h.wait_durable(h.append(a.end()))

    def seqs(seg: Path) -> list[int]:
        return [json.loads(p)["seq"] for p in payloads_of(seg)[1:]]

    def all_sealed() -> bool:
        return [n for seg in h.spool.sealed() for n in seqs(seg)] == [1, 2, 3, 4]

    wait_for(all_sealed, what="the later records sealed by age")
    segments = h.spool.sealed()
    assert len(segments) >= 2
    assert segments[0] == first
    assert seqs(first)[0] == 1
    assert 3 not in seqs(first)  # sealed before 3 was appended: by age, nothing else
    assert all(seqs(seg) for seg in segments)
    assert_checkpoints_consistent(segments)
    wait_for(lambda: h.sealed_calls == len(segments), what="on_sealed for every segment")
    h.spool.close()
    assert h.spool.sealed() == segments  # nothing open: nothing more to seal
    assert spool_files(tmp_path / "spool") == [seg.name for seg in segments]


# ---------------------------------------------------------------------------------- recovery
def test_torn_tail_is_dropped_and_open_sessions_recovered(tmp_path: Path, make: Any) -> None:
    spool_dir = tmp_path / "spool"
    # an earlier process: session a starts, b starts and ends, z starts and ends; cleanly sealed
    a, b, z = Chain("a"), Chain("b"), Chain("z")
    first = make(spool_dir)
    first.open()
    for record in (a.start(), a.statement(), b.start(), z.start(), a.statement(), b.statement()):
        first.append(record)
    first.append(b.end())
    first.append(z.end())
    first.spool.close()

    # this process: the older segment is shipped (gone); a goes on, c starts; then a crash
    h = make(spool_dir)
    assert set(h.open()) == {"a"}
    (old,) = h.spool.sealed()
    h.spool.segments.shipped(old)
    c = Chain("c")
    for record in (a.statement("SELECT 3"), c.start(), c.statement(), a.statement("SELECT 4")):
        h.append_durable(record)
    crashed = crash_copy(spool_dir, tmp_path / "crashed")

    (open_seg,) = crashed.glob("*.open")
    data = open_seg.read_bytes()
    data = data[: scan(data)[1]]  # without the unused reservation
    start, end = frame_bounds(data)[-1]
    assert end == len(data)
    assert json.loads(scan(data[start:])[0][0])["seq"] == a.seq  # the last frame: a's last event
    cuts = sorted({start + 1, start + 2, start + HEAD - 1, start + HEAD, start + HEAD + 1})
    cuts += [(start + end) // 2, end - 1]
    for cut in cuts:
        case = tmp_path / f"cut-{cut}"
        shutil.copytree(crashed, case)
        with open(case / open_seg.name, "r+b") as f:
            f.truncate(cut)
        spool = make(case).spool
        recovered = spool.open()

        assert spool_files(case) == [open_seg.with_suffix(".seg").name], cut
        seg = case / open_seg.with_suffix(".seg").name
        assert seg.stat().st_size == start, cut
        assert payloads_of(seg)[1:] == [*a.lines[3:4], *c.lines]
        assert set(recovered) == {"a", "c"}, cut
        assert (recovered["a"].seq, recovered["a"].hash) == (a.seq - 1, event_hash(a.lines[-2]))
        assert (recovered["c"].seq, recovered["c"].hash) == (c.seq, event_hash(c.lines[-1]))
        assert recovered["a"].meta == session_meta(
            "a", CONNECTION, IDENTITY, json.loads(a.lines[0])["time"]
        )
        assert spool.stats.bytes == start
        assert spool.stats.segments == 1


def test_torn_first_record_after_a_checkpoint(tmp_path: Path, make: Any) -> None:
    """The oldest segment left holds a checkpoint and one torn record: the checkpoint alone must
    give the session's last durable event (not the torn one)."""
    spool_dir = tmp_path / "spool"
    a = Chain("a")
    first = make(spool_dir)
    first.open()
    for record in (a.start(), a.statement(), a.statement()):
        first.append(record)
    first.spool.close()

    h = make(spool_dir)
    h.open()
    h.spool.segments.shipped(h.spool.sealed()[0])
    h.append_durable(a.statement("SELECT 'torn'"))
    crashed = crash_copy(spool_dir, tmp_path / "crashed")
    (open_seg,) = crashed.glob("*.open")
    data = open_seg.read_bytes()
    data = data[: scan(data)[1]]  # without the unused reservation
    (_, cp_end), (start, end) = frame_bounds(data)
    assert (cp_end, end) == (start, len(data))
    for cut in (start + 1, start + HEAD + 1, end - 1):
        case = tmp_path / f"cut-{cut}"
        shutil.copytree(crashed, case)
        with open(case / open_seg.name, "r+b") as f:
            f.truncate(cut)
        recovered = make(case).spool.open()
        assert (recovered["a"].seq, recovered["a"].hash) == (3, event_hash(a.lines[2])), cut


def test_an_idle_session_is_recovered_after_its_segments_were_shipped(
    tmp_path: Path, make: Any
) -> None:
    """A session sends nothing for longer than the ship interval; its segment is sealed by age,
    shipped and deleted; then the proxy is killed. The restarted proxy must still know it."""
    spool_dir = tmp_path / "spool"
    h = make(spool_dir, ship_interval=0.1)
    h.open()
    a = Chain("a")
    h.append_durable(a.start())
    h.append_durable(a.statement())
    wait_for(lambda: len(h.spool.sealed()) == 1, what="the segment sealed by age")
    h.spool.segments.shipped(h.spool.sealed()[0])

    def checkpoint_on_disk() -> bool:
        return any(scan(p.read_bytes())[0] for p in spool_dir.glob("*.open"))

    wait_for(checkpoint_on_disk, timeout=2, what="a checkpoint of the open session in the spool")
    crashed = crash_copy(spool_dir, tmp_path / "crashed")
    recovered = make(crashed).spool.open()
    assert set(recovered) == {"a"}
    assert (recovered["a"].seq, recovered["a"].hash) == (2, event_hash(a.lines[-1]))

    # a checkpoint alone is not sealed by age again and again, and a clean close leaves nothing
    time.sleep(0.3)
    assert h.spool.sealed() == []
    h.spool.close()
    assert spool_files(spool_dir) == []
    assert h.spool.stats.bytes == 0


def test_a_second_spool_on_the_same_directory_is_refused(tmp_path: Path, make: Any) -> None:
    spool_dir = tmp_path / "spool"
    make(spool_dir).open()
    second = Spool(
        spool_dir,
        segment_bytes=1 << 20,
        max_bytes=1 << 30,
        ship_interval=60,
        on_durable=lambda t: None,
        on_failed=lambda m: None,
    )
    with pytest.raises(SpoolError, match=str(spool_dir)) as info:
        second.open()
    assert "in use" in str(info.value)
    assert second._lock_fd is None  # the refused spool keeps no descriptor


def test_full_at_max_bytes_until_segments_are_shipped(tmp_path: Path, make: Any) -> None:
    h = make(tmp_path / "spool", segment_bytes=4096, max_bytes=16384)
    h.open()
    a = Chain("a")
    h.append_durable(a.start())
    while not h.spool.full:
        h.append_durable(a.statement("SELECT " + "x" * 200))
    assert h.spool.stats.bytes >= 16384
    wait_for(lambda: len(h.spool.sealed()) >= 3, what="segments sealed by size")
    wait_for(
        lambda: h.spool.stats.bytes == size_on_disk(tmp_path / "spool"),
        what="the bytes counted to be the bytes on disk",
    )
    for seg in h.spool.sealed():
        h.spool.segments.shipped(seg)
    assert not h.spool.full
    wait_for(
        lambda: h.spool.stats.bytes == size_on_disk(tmp_path / "spool"),
        what="the bytes counted to be the bytes on disk",
    )
    h.append_durable(a.statement())  # appending works again


def test_past_its_bound_the_spool_takes_nothing_more(tmp_path: Path, make: Any) -> None:
    """`full` refuses new statements; what is in flight still goes in, up to a hard limit."""
    h = make(tmp_path / "spool", segment_bytes=4096, max_bytes=65536)
    h.open()
    a = Chain("a")
    h.append_durable(a.start())

    def fill() -> None:
        for _ in range(100_000):
            h.append(a.statement("SELECT " + "x" * 500))

    with pytest.raises(SpoolError, match="over its bound"):
        fill()
    assert h.spool.full
    assert h.spool.hard_limit < h.spool.stats.bytes <= h.spool.hard_limit + 1024
    assert h.spool.failed is None  # not broken: shipping makes room again

    def ship() -> bool:
        for seg in h.spool.sealed():
            h.spool.segments.shipped(seg)
        return not h.spool.full

    wait_for(ship, what="room in the spool")
    h.append_durable(a.statement())


def test_a_write_failure_fails_the_spool(
    tmp_path: Path, make: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = make(tmp_path / "spool")
    h.open()
    a = Chain("a")
    h.append_durable(a.start())

    def fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("pgwarden_proxy.recording.spool.os.fdatasync", fdatasync)
    ticket = h.append(a.statement())
    wait_for(lambda: h.spool.failed is not None, what="the spool to fail")
    monkeypatch.undo()

    assert h.failures == [h.spool.failed]
    assert "Input/output error" in h.failures[0]
    assert str(tmp_path / "spool") in h.failures[0]
    assert h.durable < ticket  # never reported durable
    with pytest.raises(SpoolError, match="cannot be written"):
        h.append(a.statement())
    h.spool.close()


# ---------------------------------------------------------------------------------- Recorder
def recording_config(spool_dir: Path, sink_dir: Path) -> Recording:
    return Recording.model_validate(
        {
            "spoolDir": str(spool_dir),
            "sink": {"file": {"dir": str(sink_dir)}},
            "shipInterval": "60s",
        }
    )


async def durable(recorder: Recorder, ticket: int) -> None:
    done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    recorder.when_durable(ticket, done.set_result)
    assert await asyncio.wait_for(done, 5)


def statement(session_id: str, text: str) -> StatementEvent:
    return StatementEvent(
        session_id=session_id,
        connection=CONNECTION,
        identity=IDENTITY,
        statement=text,
        fingerprint=None,
        classes=("read",),
        command="SELECT",
        parameters=None,
        protocol="simple",
        decision="allow",
        policy="readers",
        start=time.time(),
    )


def stored_lines(store: FileStore, session_id: str) -> tuple[list[bytes], dict[str, Any]]:
    index = json.loads(store.get(session_index_key(session_id)))
    lines: list[bytes] = []
    for key in store.list(index["prefix"] + "events/"):
        lines.extend(store.get(key).splitlines())
    return lines, index


def assert_chain(session_id: str, lines: list[bytes]) -> None:
    prev = genesis(session_id)
    for seq, line in enumerate(lines, 1):
        ev = json.loads(line)
        assert (ev["seq"], ev["prev"], ev["sessionId"]) == (seq, prev, session_id)
        prev = event_hash(line)


async def test_recorder_closes_a_session_left_open_by_a_crash(tmp_path: Path) -> None:
    sid = "c0ffee-1"
    config = recording_config(tmp_path / "spool", tmp_path / "old")
    old = Recorder(config, CONNECTION, FileStore(tmp_path / "old"))
    old.start()
    try:
        rec = old.open_session(sid, IDENTITY, "statements", {"client": "127.0.0.1"})
        for i in range(3):
            ticket = rec.statement(statement(sid, f"SELECT {i}"), sync=True)
        await durable(old, ticket)
        assert rec.seq == 4
        crash_copy(tmp_path / "spool", tmp_path / "crashed")  # kill -9 now
    finally:
        await old.stop()

    store = FileStore(tmp_path / "sink")
    new = Recorder(recording_config(tmp_path / "crashed", tmp_path / "sink"), CONNECTION, store)
    new.start()
    await new.stop()

    assert spool_files(tmp_path / "crashed") == []  # everything shipped
    lines, index = stored_lines(store, sid)
    assert_chain(sid, lines)
    events = [json.loads(line) for line in lines]
    assert [e["type"] for e in events] == ["session_start"] + ["statement"] * 3 + ["session_end"]
    assert [e["statement"] for e in events[1:4]] == ["SELECT 0", "SELECT 1", "SELECT 2"]
    end = events[-1]
    assert end["recovered"] is True
    assert end["statements"] is None
    manifest = Manifest.model_validate_json(store.get(manifest_key(index["prefix"])))
    assert manifest.recovered is True
    assert (manifest.events, manifest.last_seq) == (5, 5)
    assert manifest.final_hash == event_hash(lines[-1])
    assert manifest.start == events[0]["time"]
    assert manifest.session_id == sid


async def test_a_manifest_lost_in_a_crash_is_written_by_the_next_start(tmp_path: Path) -> None:
    sid = "c0ffee-2"
    config = recording_config(tmp_path / "spool", tmp_path / "old")
    old = Recorder(config, CONNECTION, FileStore(tmp_path / "old"))
    old.start()
    try:
        rec = old.open_session(sid, IDENTITY, "statements", {"client": "127.0.0.1"})
        rec.statement(statement(sid, "SELECT 1"), sync=True)
        # the session's end reached the spool, the crash came before its manifest did
        ticket = rec._append("session_end", {"reason": "client terminated", "statements": 1},
                             sync=True)  # fmt: skip
        await durable(old, ticket)
        crash_copy(tmp_path / "spool", tmp_path / "crashed")
    finally:
        await old.stop()

    store = FileStore(tmp_path / "sink")
    new = Recorder(recording_config(tmp_path / "crashed", tmp_path / "sink"), CONNECTION, store)
    new.start()
    await new.stop()

    lines, index = stored_lines(store, sid)
    assert_chain(sid, lines)
    assert [json.loads(line)["type"] for line in lines][-1] == "session_end"
    manifest = Manifest.model_validate_json(store.get(manifest_key(index["prefix"])))
    assert (manifest.events, manifest.final_hash) == (3, event_hash(lines[-1]))
    assert (manifest.end_reason, manifest.statements, manifest.recovered) == (
        "client terminated",
        1,
        False,
    )


async def test_event_lines_are_exactly_what_encode_event_makes(tmp_path: Path) -> None:
    """SessionRecorder builds each line from pre-encoded parts: the bytes must be those of
    `encode_event` of the whole event (what the chain hashes and readers parse)."""
    recorder = Recorder(
        recording_config(tmp_path / "spool", tmp_path / "sink"),
        CONNECTION,
        FileStore(tmp_path / "sink"),
    )
    lines: list[bytes] = []

    class Spy:
        def append(self, line: bytes, track: Any, *, sync: bool = False) -> int:
            lines.append(line)
            return len(lines)

        def append_internal(self, kind: str, body: dict[str, Any]) -> int:
            return 0

    recorder.spool = Spy()  # type: ignore[assignment]
    sid = 'sess "ü" \\ 1'
    rec = recorder.open_session(sid, 'b"ö t@example.com', "statements", {"client": "::1"})
    ev = statement(sid, "SELECT 'ä\"\n\u2028'")
    ev.classes = ("read", "write")
    ev.parameters = ["1", None]
    rec.statement(ev, sync=False)
    ev.error = {"sqlstate": "22P02", "message": 'invalid input "x"'}
    ev.duration_ms = 1.23456
    rec.outcome(ev)
    rec._append("approval", {})
    rec.end("client terminated", statements=1, duration_s=0.25)
    prev = genesis(sid)
    for line in lines:
        event = json.loads(line)
        assert encode_event(event) == line
        assert event["prev"] == prev
        prev = event_hash(line)
    assert [json.loads(line)["type"] for line in lines] == [
        "session_start",
        "statement",
        "outcome",
        "approval",
        "session_end",
    ]
    assert json.loads(lines[1])["time"] == iso(ev.start)
    assert rec.hash == prev
