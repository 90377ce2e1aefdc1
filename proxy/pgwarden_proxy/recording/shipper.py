"""Uploads sealed spool segments to the sink, one chunk object per session, then deletes them.

A segment is deleted only after the sink confirmed every object made from it; a failure is
retried with backoff, from the same segment, and uploads are idempotent (same keys, same bytes),
so a crash at any point ships everything exactly once in the end. The proxy runs the shipper in
a process of its own (shipper_process).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import orjson

from pgwarden.api.config import Recording
from pgwarden.recording.format import (
    Manifest,
    SessionIndex,
    chunk_key,
    identity_index_key,
    manifest_key,
    session_index_key,
    session_prefix,
    sign_manifest,
)
from pgwarden.recording.store import FileStore, Store, StoreError
from pgwarden_proxy.recording.spool import SpoolError

log = logging.getLogger("pgwarden.recording")


def store_for(config: Recording) -> Store | None:
    sink = config.sink
    if sink is None:
        return None
    if sink.file is not None:
        return FileStore(sink.file.dir)
    assert sink.s3 is not None
    from pgwarden.recording.s3 import S3Store  # (boto3: only where S3 is the sink)

    return S3Store.from_sink(sink.s3)


def load_signing_key(config: Recording) -> Any:
    if config.signing_key_file is None:
        return None
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(config.signing_key_file.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise SpoolError(f"recording.signingKeyFile cannot be used: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise SpoolError("recording.signingKeyFile must hold an Ed25519 private key (PEM)")
    return key


class Segments(Protocol):
    """The sealed segments of a spool (spool.SealedSegments)."""

    def sealed(self) -> list[Path]: ...

    def read(self, path: Path) -> Iterator[bytes]: ...

    def shipped(self, path: Path) -> None: ...


class _Chunk:
    __slots__ = ("first", "last", "lines", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.lines: list[bytes] = []
        self.first = 0
        self.last = 0


class Shipper:
    def __init__(
        self,
        spool: Segments,
        store: Store,
        *,
        signing_key: Any = None,
        backoff: tuple[float, float] = (0.2, 30.0),
        on_status: Callable[[Shipper], None] = lambda shipper: None,
    ) -> None:
        self.spool = spool
        self.store = store
        self.signing_key = signing_key
        self.backoff = backoff
        self._on_status = on_status  # after each segment shipped and each failure
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: str | None = None  # the last failure, until a ship succeeds
        self.objects = 0
        self.segments = 0
        self.failures = 0
        self.last_success = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pgwarden-shipper", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float) -> bool:
        """Ship what is sealed, for up to `timeout` seconds; True when nothing is left."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():  # stuck in a call to the sink: leave it to the next start
                return False
        try:
            self.ship_all(deadline)
        except StoreError as e:
            log.warning(
                "recording: segments left in the spool for the next start", extra={"error": str(e)}
            )
        return not self.spool.sealed()

    def _run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                self.ship_all()
                delay = self.backoff[0]
                self._wake.wait(1.0)
            except StoreError as e:
                self.failures += 1
                if self.error is None:
                    log.warning(
                        "recording: the sink is unreachable, retrying", extra={"error": str(e)}
                    )
                self.error = str(e)
                self._on_status(self)
                self._wake.wait(delay)
                delay = min(delay * 2, self.backoff[1])
            except Exception as e:
                log.exception("recording: shipping failed")
                self.failures += 1
                self.error = f"shipping failed ({type(e).__name__}; see the log)"
                self._on_status(self)
                self._wake.wait(self.backoff[1])
            self._wake.clear()

    def ship_all(self, deadline: float | None = None) -> None:
        for path in self.spool.sealed():
            if deadline is not None and time.monotonic() > deadline:
                return
            self.ship(path)
            if self.error is not None:
                log.info("recording: the sink is reachable again")
                self.error = None
            self.last_success = time.time()
            self._on_status(self)

    def ship(self, path: Path) -> None:
        chunks: dict[str, _Chunk] = {}
        prefixes: dict[str, str] = {}
        indexes: list[SessionIndex] = []
        manifests: list[tuple[str, dict[str, Any]]] = []
        for payload in self.spool.read(path):
            obj = orjson.loads(payload)
            kind = obj.get("spool")
            if kind == "checkpoint":
                for sid, o in obj["open"].items():
                    prefixes[sid] = o["meta"]["prefix"]
                continue
            if kind == "manifest":
                manifests.append((obj["prefix"], obj["manifest"]))
                continue
            sid = obj["sessionId"]
            if obj["type"] == "session_start":
                day = obj["time"][:10]
                prefix = prefixes[sid] = session_prefix(obj["connection"], day, sid)
                indexes.append(
                    SessionIndex(
                        session_id=sid,
                        connection=obj["connection"],
                        identity=obj["identity"],
                        start=obj["time"],
                        day=day,
                        prefix=prefix,
                    )
                )
            chunk = chunks.get(sid)
            if chunk is None:
                chunk = chunks[sid] = _Chunk(prefixes[sid])
                chunk.first = obj["seq"]
            chunk.last = obj["seq"]
            chunk.lines.append(payload)
        for chunk in chunks.values():
            key = chunk_key(chunk.prefix, chunk.first, chunk.last)
            self._put(key, b"\n".join(chunk.lines) + b"\n")
        for index in indexes:
            body = index.model_dump_json(by_alias=True).encode()
            self._put(session_index_key(index.session_id), body)
            self._put(identity_index_key(index.identity, index.day, index.session_id), body)
        for prefix, raw in manifests:
            manifest = Manifest.model_validate(raw)
            if self.signing_key is not None:
                manifest = sign_manifest(manifest, self.signing_key)
            self._put(manifest_key(prefix), manifest.model_dump_json(by_alias=True).encode())
        self.spool.shipped(path)
        self.segments += 1

    def _put(self, key: str, data: bytes) -> None:
        self.store.put(key, data)
        self.objects += 1
