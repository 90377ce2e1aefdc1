"""Level `results`: the rows a client received (after masking), capped, with a digest of all."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")


def column_names(row_description: bytes, encoding: str) -> list[str]:
    n = _I16.unpack_from(row_description, 0)[0]
    names, pos = [], 2
    for _ in range(n):
        end = row_description.index(b"\x00", pos)
        names.append(row_description[pos:end].decode(encoding, errors="replace"))
        pos = end + 1 + 18  # table oid, attnum, type oid, typlen, typmod, format
    return names


def _value(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError:
        return "\\x" + raw.hex()


class ResultCapture:
    """Feed it the DataRow messages as sent to the client; `take()` ends one statement's result."""

    def __init__(self, max_rows: int, max_bytes: int) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.encoding = "utf-8"
        self._reset()

    def _reset(self) -> None:
        self.columns: list[str] | None = None
        self.rows: list[list[str | None]] = []
        self.total = 0
        self.kept_bytes = 0
        self.truncated = False
        self._digest: Any = None

    def describe(self, row_description: bytes) -> None:
        self.columns = column_names(row_description, self.encoding)

    def feed(self, data: bytes, count: int) -> None:
        if self._digest is None:
            self._digest = hashlib.sha256()
        self._digest.update(data)
        self.total += count
        if self.truncated:
            return
        pos, end = 0, len(data)
        while pos < end:
            length = _I32.unpack_from(data, pos + 1)[0]
            body_end = pos + 1 + length
            if len(self.rows) >= self.max_rows:
                self.truncated = True
                return
            row, size = self._row(data, pos + 5, body_end)
            if self.kept_bytes + size > self.max_bytes:
                self.truncated = True
                return
            self.kept_bytes += size
            self.rows.append(row)
            pos = body_end

    def _row(self, data: bytes, pos: int, end: int) -> tuple[list[str | None], int]:
        n = _I16.unpack_from(data, pos)[0]
        pos += 2
        row: list[str | None] = []
        size = 0
        for _ in range(n):
            length = _I32.unpack_from(data, pos)[0]
            pos += 4
            if length < 0:
                row.append(None)
                continue
            row.append(_value(data[pos : pos + length], self.encoding))
            size += length
            pos += length
        return row, size

    def take(self) -> dict[str, Any] | None:
        """The result of the statement that just ended (None when it returned no rows)."""
        if self._digest is None and self.columns is None:
            return None
        result = {
            "columns": self.columns,
            "rows": self.rows,
            "capturedRows": len(self.rows),
            "totalRows": self.total,
            "truncated": self.truncated,
            "digest": "sha256:" + (self._digest or hashlib.sha256()).hexdigest(),
        }
        self._reset()
        return result
