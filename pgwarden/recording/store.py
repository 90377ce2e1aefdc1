"""Where recordings live: a key-value object store (S3, or a directory with the same layout).

Keys are relative to the store's root; `format.py` says which keys a recording uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlparse


class StoreError(Exception):
    """The store could not be reached or refused a call (retry later)."""


class NotFound(StoreError):
    pass


class Store(Protocol):
    url: str

    def put(self, key: str, data: bytes) -> None:
        """Durably store `data` (replacing what the key held); returns once the store confirmed."""

    def get(self, key: str) -> bytes:
        """Raises NotFound when the key does not exist."""

    def list(self, prefix: str) -> Iterator[str]:
        """Every key that starts with `prefix`, in byte order."""


class FileStore:
    """A directory as an object store: one file per key, written atomically and fsynced."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"not a store key: {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(f"cannot write {path}: {e.strerror or e}") from e

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise NotFound(key) from e
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror or e}") from e

    def list(self, prefix: str) -> Iterator[str]:
        # walk only the directory the prefix names (a listing by connection and day stays cheap)
        head, _, _ = prefix.rpartition("/")
        base = self.root / head if head else self.root
        if not base.is_dir():
            return
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith("."):  # a write in progress
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        yield from sorted(keys)


def open_store(url: str) -> Store:
    """`file:///dir` or `s3://bucket/prefix` (endpoint, region and credentials from the usual
    AWS environment variables, AWS_ENDPOINT_URL included)."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        from pgwarden.recording.s3 import S3Store

        if not parsed.netloc:
            raise ValueError(f"no bucket in {url!r} (expected s3://bucket/prefix)")
        return S3Store(parsed.netloc, parsed.path.lstrip("/"))
    raise ValueError(f"unsupported store {url!r}: use s3://bucket/prefix or file:///dir")
