"""The shipper: sealed spool segments become chunk, index and manifest objects in the sink.

With a directory sink (`FileStore`) for the layout and the all-or-nothing deletion of segments,
and with a real S3 API over HTTP (moto, tests/s3server.py) for a long session and an outage.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pgwarden.recording.format import (
    Manifest,
    encode_event,
    event_hash,
    genesis,
    iso,
    manifest_key,
    manifest_signature_ok,
    session_index_key,
)
from pgwarden.recording.s3 import S3Store
from pgwarden.recording.store import FileStore, Store, StoreError
from pgwarden_proxy.recording import shipper_process
from pgwarden_proxy.recording.shipper import Shipper
from pgwarden_proxy.recording.shipper_process import ShipperProcess
from pgwarden_proxy.recording.spool import Spool, Track, session_meta
from tests.s3server import MotoServer
from tests.unit.test_spool import recording_config

CONNECTION = "orders-db"
IDENTITY = "team/bot x@example.com"
IDENTITY_KEY = "team%2Fbot%20x@example.com"  # percent-encoded in keys


# ---------------------------------------------------------------------------------- helpers
def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class Session:
    """One session's chained events and its manifest, as `SessionRecorder` writes them."""

    def __init__(self, session_id: str, identity: str = IDENTITY) -> None:
        self.sid = session_id
        self.identity = identity
        self.seq = 0
        self.hash = genesis(session_id)
        self.lines: list[bytes] = []
        self.start_iso = ""
        self.manifest: dict[str, Any] | None = None

    def event(self, type_: str, **fields: Any) -> tuple[bytes, Track]:
        self.seq += 1
        when = iso(time.time())
        line = encode_event(
            {
                "v": 1,
                "seq": self.seq,
                "prev": self.hash,
                "time": when,
                "type": type_,
                "sessionId": self.sid,
                "connection": CONNECTION,
                "identity": self.identity,
                **fields,
            }
        )
        self.hash = event_hash(line)
        self.lines.append(line)
        meta = None
        if type_ == "session_start":
            self.start_iso = when
            meta = self.meta
        return line, Track(self.sid, self.seq, self.hash, meta, type_ == "session_end")

    @property
    def meta(self) -> dict[str, Any]:
        return session_meta(self.sid, CONNECTION, self.identity, self.start_iso)

    @property
    def prefix(self) -> str:
        return f"sessions/{CONNECTION}/{self.day}/{self.sid}/"

    @property
    def day(self) -> str:
        return self.start_iso[:10]

    def start(self) -> tuple[bytes, Track]:
        return self.event("session_start", level="statements", client="127.0.0.1")

    def statement(self, text: str = "SELECT 1") -> tuple[bytes, Track]:
        return self.event("statement", statement=text, decision="allow", policy="readers")

    def end(self, spool: Spool) -> None:
        spool.append(*self.event("session_end", reason="client terminated", statements=None))
        self.manifest = {
            "v": 1,
            "sessionId": self.sid,
            "connection": CONNECTION,
            "identity": self.identity,
            "start": self.start_iso,
            "end": iso(time.time()),
            "events": self.seq,
            "lastSeq": self.seq,
            "finalHash": self.hash,
            "endReason": "client terminated",
            "recovered": False,
            "statements": self.seq - 2,
        }
        spool.append_internal(
            "manifest", {"prefix": self.meta["prefix"], "manifest": self.manifest}
        )


class Durable:
    """The highest durable ticket a spool reported."""

    def __init__(self) -> None:
        self.ticket = 0
        self._lock = threading.Lock()

    def __call__(self, ticket: int) -> None:
        with self._lock:
            self.ticket = max(self.ticket, ticket)

    def wait(self, ticket: int) -> None:
        wait_for(lambda: self.ticket >= ticket, timeout=5, what=f"ticket {ticket} durable")


def new_spool(
    directory: Path, on_sealed: Callable[[], None] = lambda: None, **options: Any
) -> tuple[Spool, Durable]:
    durable = Durable()
    kwargs: dict[str, Any] = {"segment_bytes": 1 << 20, "max_bytes": 1 << 30, "ship_interval": 60}
    kwargs.update(options)
    spool = Spool(
        directory,
        on_durable=durable,
        on_failed=lambda message: None,
        on_sealed=on_sealed,
        **kwargs,
    )
    spool.open()
    spool.start()
    return spool, durable


def reopen(directory: Path) -> Spool:
    """A spool of sealed segments (for shipping only; its writer is not started)."""
    spool = Spool(
        directory,
        segment_bytes=1 << 20,
        max_bytes=1 << 30,
        ship_interval=60,
        on_durable=lambda ticket: None,
        on_failed=lambda message: None,
    )
    spool.open()
    return spool


class LoggingStore:
    """Passes puts to a store and remembers them; `fail_at` makes that put (1-based) fail."""

    def __init__(self, store: Store, fail_at: int | None = None) -> None:
        self.store = store
        self.url = store.url
        self.fail_at = fail_at
        self.calls = 0
        self.puts: list[tuple[str, bytes]] = []

    def put(self, key: str, data: bytes) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise StoreError(f"injected failure of put #{self.calls} ({key})")
        self.store.put(key, data)
        self.puts.append((key, data))

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.store.list(prefix)


def chunk_name(first: int, last: int) -> str:
    return f"events/{first:010d}-{last:010d}.jsonl"


def contents(store: Store) -> dict[str, bytes]:
    return {key: store.get(key) for key in store.list("")}


def assert_session_complete(store: Store, s: Session, manifest: bool = True) -> list[str]:
    """Every event 1..n exactly once across the chunks, the chain intact, the manifest right.
    Returns the chunk keys."""
    index = json.loads(store.get(session_index_key(s.sid)))
    assert index["prefix"] == s.prefix
    chunks = list(store.list(s.prefix + "events/"))
    lines: list[bytes] = []
    for key in chunks:
        data = store.get(key)
        assert data.endswith(b"\n")
        part = data[:-1].split(b"\n")
        first, last = json.loads(part[0])["seq"], json.loads(part[-1])["seq"]
        assert key == s.prefix + chunk_name(first, last)
        lines.extend(part)
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, s.seq + 1))
    assert lines == s.lines
    prev = genesis(s.sid)
    for line in lines:
        assert json.loads(line)["prev"] == prev
        prev = event_hash(line)
    if manifest:
        m = Manifest.model_validate_json(store.get(manifest_key(s.prefix)))
        assert (m.events, m.last_seq, m.final_hash) == (s.seq, s.seq, prev)
        assert m.session_id == s.sid
    return chunks


# ---------------------------------------------------------------------------------- FileStore
def test_objects_and_keys_as_documented(tmp_path: Path) -> None:
    spool, durable = new_spool(tmp_path / "spool")
    a, b = Session("a-1"), Session("b-2", identity="jane@example.org")
    for record in (a.start(), b.start(), a.statement(), b.statement(), a.statement()):
        spool.append(*record)
    a.end(spool)
    spool.append(*b.statement("SELECT 2"))
    spool.close()
    (segment,) = spool.sealed()

    store = LoggingStore(FileStore(tmp_path / "sink"))
    shipper = Shipper(spool.segments, store)
    shipper.ship_all()

    assert spool.sealed() == []
    assert not segment.exists()
    assert shipper.segments == 1
    objects = contents(store)
    index_a = {
        "sessionId": "a-1",
        "connection": CONNECTION,
        "identity": IDENTITY,
        "start": a.start_iso,
        "day": a.day,
        "prefix": a.prefix,
    }
    index_b = {**index_a, "sessionId": "b-2", "identity": "jane@example.org", "prefix": b.prefix}
    index_b.update(start=b.start_iso, day=b.day)
    assert set(objects) == {
        f"sessions/orders-db/{a.day}/a-1/events/0000000001-0000000004.jsonl",
        f"sessions/orders-db/{a.day}/a-1/manifest.json",
        f"sessions/orders-db/{b.day}/b-2/events/0000000001-0000000003.jsonl",
        "index/sessions/a-1.json",
        "index/sessions/b-2.json",
        f"index/identities/{IDENTITY_KEY}/{a.day}/a-1.json",
        f"index/identities/jane@example.org/{b.day}/b-2.json",
    }
    assert objects[a.prefix + chunk_name(1, 4)] == b"\n".join(a.lines) + b"\n"
    assert objects[b.prefix + chunk_name(1, 3)] == b"\n".join(b.lines) + b"\n"
    assert json.loads(objects["index/sessions/a-1.json"]) == index_a
    assert json.loads(objects[f"index/identities/{IDENTITY_KEY}/{a.day}/a-1.json"]) == index_a
    assert json.loads(objects["index/sessions/b-2.json"]) == index_b
    manifest = json.loads(objects[a.prefix + "manifest.json"])
    assert manifest.pop("signature") is None
    assert manifest == a.manifest
    assert manifest["finalHash"] == event_hash(a.lines[-1])

    order = [key for key, _ in store.puts]
    assert order.index(a.prefix + "manifest.json") > order.index(a.prefix + chunk_name(1, 4))
    assert shipper.objects == len(order) == 7
    assert durable.ticket == 8


def test_a_session_across_segments_is_one_chunk_per_segment(tmp_path: Path) -> None:
    spool, durable = new_spool(tmp_path / "spool", segment_bytes=1024)
    a = Session("a-1")
    ticket = spool.append(*a.start())
    for i in range(30):
        durable.wait(ticket)
        ticket = spool.append(*a.statement(f"SELECT {i}, '{'x' * 40}'"))
    a.end(spool)
    spool.close()
    segments = spool.sealed()
    assert len(segments) >= 3

    store = FileStore(tmp_path / "sink")
    Shipper(spool.segments, store).ship_all()
    assert spool.sealed() == []
    chunks = assert_session_complete(store, a)
    assert len(chunks) >= 3  # (the last segment may hold the manifest alone)
    ranges = [tuple(int(n) for n in key[-27:-6].split("-")) for key in chunks]
    assert ranges[0][0] == 1
    assert ranges[-1][1] == a.seq
    for (_, last), (first, _) in itertools.pairwise(ranges):
        assert first == last + 1
    # the index is written once, by the segment that holds the session's start
    assert list(store.list("index/sessions/")) == ["index/sessions/a-1.json"]


@pytest.fixture(scope="module")
def two_segments(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int], Session]:
    """A spool of two sealed segments (a and b in the first; b ends in the second), and how
    many puts shipping each segment makes."""
    base = tmp_path_factory.mktemp("two-segments")
    spool, _ = new_spool(base / "spool")
    a, b = Session("a-1"), Session("b-2", identity="jane@example.org")
    for record in (a.start(), b.start(), a.statement(), b.statement()):
        spool.append(*record)
    spool.close()
    spool, _ = new_spool(base / "spool")
    for record in (a.statement("SELECT 2"), b.statement("SELECT 2")):
        spool.append(*record)
    b.end(spool)
    spool.close()
    assert len(spool.sealed()) == 2

    counts = []
    shipping = reopen(shutil.copytree(base / "spool", base / "counting"))
    store = LoggingStore(FileStore(base / "sink"))
    for path in shipping.sealed():
        before = store.calls
        Shipper(shipping.segments, store).ship(path)
        counts.append(store.calls - before)
    shipping.close()
    assert counts == [2 + 2 * 2, 2 + 1]  # chunks, then two index objects per start; manifest
    return base, counts, b


@pytest.mark.parametrize("fail_at", range(1, 10))
def test_a_segment_is_deleted_only_after_every_put(
    tmp_path: Path, two_segments: tuple[Path, list[int], Session], fail_at: int
) -> None:
    base, counts, b = two_segments
    spool = reopen(shutil.copytree(base / "spool", tmp_path / "spool"))
    segments = spool.sealed()
    store = LoggingStore(FileStore(tmp_path / "sink"), fail_at=fail_at)
    shipper = Shipper(spool.segments, store)

    with pytest.raises(StoreError, match=f"put #{fail_at}"):
        shipper.ship_all()
    failing = 0 if fail_at <= counts[0] else 1
    assert spool.sealed() == segments[failing:]  # the failing segment stays, whole
    assert segments[failing].read_bytes() == (base / "spool" / segments[failing].name).read_bytes()
    first_try = dict(store.puts[sum(counts[:failing]) :])

    store.fail_at = None
    before = len(store.puts)
    shipper.ship_all()
    assert spool.sealed() == []
    retried = dict(store.puts[before:])
    for key, data in first_try.items():  # the same keys again, with the same bytes
        assert retried.get(key) == data, key
    assert contents(store) == contents(FileStore(base / "sink"))
    assert_session_complete(store, b)
    assert spool.stats.bytes == 0
    assert spool.stats.segments == 0
    spool.close()


def test_the_manifest_is_signed_with_the_signing_key(tmp_path: Path) -> None:
    spool, _ = new_spool(tmp_path / "spool")
    a = Session("a-1")
    for record in (a.start(), a.statement()):
        spool.append(*record)
    a.end(spool)
    spool.close()
    key = Ed25519PrivateKey.generate()
    store = FileStore(tmp_path / "sink")
    Shipper(spool.segments, store, signing_key=key).ship_all()

    manifest = Manifest.model_validate_json(store.get(manifest_key(a.prefix)))
    assert manifest.signature is not None
    assert manifest.signature.alg == "Ed25519"
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert manifest.signature.public_key == base64.b64encode(raw).decode()
    assert manifest_signature_ok(manifest, key.public_key())
    assert not manifest_signature_ok(manifest, Ed25519PrivateKey.generate().public_key())
    altered = manifest.model_copy(update={"events": manifest.events - 1})
    assert not manifest_signature_ok(altered, key.public_key())
    assert manifest.model_dump(by_alias=True, exclude={"signature"}) == a.manifest
    assert_session_complete(store, a)


# ---------------------------------------------------------------------------------- S3
@pytest.fixture
def s3_store(s3: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Store:
    s3.isolate(monkeypatch, tmp_path)
    bucket = s3.make_bucket(f"ship-{uuid.uuid4().hex[:12]}")
    return S3Store(bucket, "pgwarden", endpoint_url=s3.endpoint_url)


@pytest.fixture
def shippers() -> Iterator[list[tuple[Spool, Shipper]]]:
    started: list[tuple[Spool, Shipper]] = []
    yield started
    for spool, shipper in started:
        spool.close()
        shipper.stop(5)


def shipping(
    directory: Path, store: Store, shippers: list[tuple[Spool, Shipper]], **options: Any
) -> tuple[Spool, Durable, Shipper]:
    """A running spool whose sealed segments a running shipper uploads."""
    woken: list[Shipper] = []
    spool, durable = new_spool(directory, on_sealed=lambda: woken[0].wake(), **options)
    shipper = Shipper(spool.segments, store, backoff=(0.05, 0.5))
    woken.append(shipper)
    shippers.append((spool, shipper))
    shipper.start()
    return spool, durable, shipper


def write_session(spool: Spool, durable: Durable, s: Session, n: int, group: int = 20) -> None:
    """`n` events in groups of `group` (each group durable before the next: several segments)."""
    ticket = spool.append(*s.start())
    while s.seq < n - 1:
        durable.wait(ticket)
        for _ in range(min(group, n - 1 - s.seq)):
            ticket = spool.append(*s.statement(f"SELECT {s.seq}, '{'x' * 60}'"))
    s.end(spool)
    assert s.seq == n


def test_a_long_session_arrives_complete_in_s3(
    tmp_path: Path, s3_store: S3Store, shippers: list[tuple[Spool, Shipper]]
) -> None:
    spool, durable, shipper = shipping(tmp_path / "spool", s3_store, shippers, segment_bytes=4096)
    a, b = Session("a-1"), Session("b-2", identity="jane@example.org")
    spool.append(*b.start())
    write_session(spool, durable, a, 400)
    spool.append(*b.statement())
    b.end(spool)
    spool.close()
    wait_for(lambda: spool.sealed() == [], what="every segment shipped")
    assert shipper.stop(5)

    assert shipper.segments >= 3
    chunks = assert_session_complete(s3_store, a)
    assert len(chunks) >= 3
    assert_session_complete(s3_store, b)
    assert json.loads(s3_store.get(f"index/identities/{IDENTITY_KEY}/{a.day}/a-1.json")) == {
        "sessionId": "a-1",
        "connection": CONNECTION,
        "identity": IDENTITY,
        "start": a.start_iso,
        "day": a.day,
        "prefix": a.prefix,
    }
    assert shipper.error is None
    assert spool.stats.bytes == 0


def test_shipping_resumes_after_s3_was_down(
    tmp_path: Path, s3: MotoServer, s3_store: S3Store, shippers: list[tuple[Spool, Shipper]]
) -> None:
    s3.down()
    try:
        spool, durable, shipper = shipping(
            tmp_path / "spool", s3_store, shippers, segment_bytes=4096
        )
        a = Session("a-1")
        write_session(spool, durable, a, 200)
        wait_for(lambda: shipper.error is not None, what="the shipper to notice S3 is down")
        wait_for(lambda: len(spool.sealed()) >= 3, what="segments sealed while S3 is down")
        assert "a-1" not in str(s3.client().list_objects_v2(Bucket=s3_store.bucket))
        assert shipper.failures >= 1
    finally:
        s3.up()
    spool.close()
    wait_for(
        lambda: spool.sealed() == [] and shipper.error is None,
        timeout=20,
        what="the spool to drain after S3 came back",
    )
    assert shipper.stop(5)
    assert list(spool.dir.glob("*.seg")) == []
    assert list(spool.dir.glob("*.open")) == []
    assert spool.stats.bytes == 0
    assert_session_complete(s3_store, a)


# ---------------------------------------------------------------------------------- the process
class StuckStore:
    """A sink whose every put hangs (pickled into the shipper's process)."""

    def __init__(self, root: Path) -> None:
        self.store = FileStore(root)
        self.url = self.store.url

    def put(self, key: str, data: bytes) -> None:
        time.sleep(3600)

    def get(self, key: str) -> bytes:
        return self.store.get(key)

    def list(self, prefix: str) -> Iterator[str]:
        return self.store.list(prefix)


@pytest.fixture
def processes() -> Iterator[list[ShipperProcess]]:
    started: list[ShipperProcess] = []
    yield started
    for process in started:
        process.spool.close()
        process.stop(5)


def shipping_process(
    directory: Path, store: Store, processes: list[ShipperProcess]
) -> tuple[Spool, Durable, ShipperProcess]:
    """A running spool whose sealed segments a shipper process uploads."""
    woken: list[ShipperProcess] = []
    spool, durable = new_spool(directory, on_sealed=lambda: woken[0].wake(), segment_bytes=4096)
    process = ShipperProcess(recording_config(directory, directory.parent / "unused"), spool, store)
    woken.append(process)
    processes.append(process)
    process.start()
    return spool, durable, process


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_shipper_process_ships_and_the_spool_counts_what_it_removed(
    tmp_path: Path, processes: list[ShipperProcess]
) -> None:
    store = FileStore(tmp_path / "sink")
    spool, durable, process = shipping_process(tmp_path / "spool", store, processes)
    a = Session("a-1")
    write_session(spool, durable, a, 300)
    spool.close()
    wait_for(lambda: spool.sealed() == [] and spool.stats.bytes == 0, what="every segment")
    assert spool.stats.segments == 0
    assert process.stop(5)
    assert process._proc is not None
    assert process._proc.returncode == 0
    assert process.segments >= 3
    assert process.objects >= process.segments
    assert process.error is None
    assert process.last_success > 0
    assert_session_complete(store, a)


def test_a_shipper_process_that_dies_is_restarted(
    tmp_path: Path, processes: list[ShipperProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shipper_process, "RESTART_DELAY", 0.05)
    store = FileStore(tmp_path / "sink")
    spool, durable, process = shipping_process(tmp_path / "spool", store, processes)
    a, b = Session("a-1"), Session("b-2")
    write_session(spool, durable, a, 100)
    wait_for(lambda: process.segments >= 2, what="segments shipped by the first process")
    shipped = process.objects
    assert process._proc is not None
    first = process._proc.pid
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: process.restarts == 1, what="a new shipper process")
    assert process._proc.pid != first
    assert process.error is not None
    assert "exited (code -9)" in process.error
    assert process.failures == 1  # counted in pgwarden_recording_ship_failures
    write_session(spool, durable, b, 100)
    spool.close()
    wait_for(lambda: spool.stats.bytes == 0, what="every segment")
    assert process.error is None  # the new process reported its first success
    assert process.objects > shipped  # the counts go on from the first process's
    assert process.stop(5)
    assert_session_complete(store, a)
    assert_session_complete(store, b)


def test_the_shipper_process_dies_with_the_proxy(tmp_path: Path) -> None:
    """A killed proxy takes its shipper along: a restarted proxy never ships beside it."""
    script = f"""
import sys, time
from pathlib import Path
from pgwarden.api.config import Recording
from pgwarden.recording.store import FileStore
from pgwarden_proxy.recording.shipper_process import ShipperProcess
from pgwarden_proxy.recording.spool import Spool
spool = Spool(Path({str(tmp_path / "spool")!r}), segment_bytes=1 << 20, max_bytes=1 << 30,
              ship_interval=60, on_durable=lambda t: None, on_failed=lambda m: None)
spool.open()
config = Recording.model_validate(
    {{"spoolDir": str(spool.dir), "sink": {{"file": {{"dir": {str(tmp_path / "sink")!r}}}}}}})
process = ShipperProcess(config, spool, FileStore(Path({str(tmp_path / "sink")!r})))
process.start()
print(process._proc.pid, flush=True)
time.sleep(60)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proxy = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proxy.stdout is not None
        child = int(proxy.stdout.readline())
        assert alive(child)
    finally:
        proxy.kill()
        proxy.wait()
    wait_for(lambda: not alive(child), timeout=5, what="the shipper process to die")


def test_a_stuck_sink_does_not_hold_the_stop_up(
    tmp_path: Path, processes: list[ShipperProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shipper_process, "EXIT_GRACE", 0.5)
    spool, durable, process = shipping_process(
        tmp_path / "spool", StuckStore(tmp_path / "sink"), processes
    )
    write_session(spool, durable, Session("a-1"), 100)
    spool.close()
    assert not process.stop(0.2)  # segments left for the next start
    assert process._proc is not None
    assert process._proc.returncode is not None  # gone: its upload is abandoned, not waited for
    assert spool.sealed()


def test_the_shipper_process_ships_to_s3(
    tmp_path: Path, s3_store: S3Store, processes: list[ShipperProcess]
) -> None:
    """The S3 store is pickled into the child (which makes its own client)."""
    spool, durable, process = shipping_process(tmp_path / "spool", s3_store, processes)
    a = Session("a-1")
    write_session(spool, durable, a, 200)
    spool.close()
    wait_for(lambda: spool.stats.bytes == 0, what="every segment")
    assert process.stop(5)
    assert_session_complete(s3_store, a)
    copy = pickle.loads(pickle.dumps(s3_store))
    assert (copy.url, copy.endpoint_url, copy.region) == (
        s3_store.url,
        s3_store.endpoint_url,
        s3_store.region,
    )


def test_a_shipper_process_that_cannot_be_started_again_is_retried(
    tmp_path: Path, processes: list[ShipperProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shipper_process, "RESTART_DELAY", 0.05)
    store = FileStore(tmp_path / "sink")
    spool, durable, process = shipping_process(tmp_path / "spool", store, processes)
    real_popen = subprocess.Popen
    attempts: list[int] = []

    def failing_once(*args: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError(24, "Too many open files")
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", failing_once)  # (shipper_process uses it)
    assert process._proc is not None
    os.kill(process._proc.pid, signal.SIGKILL)
    wait_for(lambda: process.restarts == 1, what="a new shipper process, at the second attempt")
    assert len(attempts) == 2
    a = Session("a-1")
    write_session(spool, durable, a, 100)
    spool.close()
    wait_for(lambda: spool.stats.bytes == 0, what="every segment")
    assert process.error is None
    assert process.stop(5)
    assert_session_complete(store, a)
