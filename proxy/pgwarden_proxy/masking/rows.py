"""Rewriting result rows: DataRow and COPY text rows, only in the columns a rule touches.

A result's RowDescription decides, once per result, what happens to its rows: a column is
masked when its origin (table OID, attribute number) has a column rule, or when the statement's
lineage derives it from one; detectors scan the columns of string types. A result with neither
gets no `ResultMask` and its rows pass as bytes, undecoded.

A masked column is announced as `text` in the RowDescription the client receives: the masked
value ("[redacted]", "a***@example.org", a hash) is no value of the original type. Text is
the same bytes in the text and binary formats, so the client's format codes stay valid.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pgwarden.api.policy import MaskStrategy
from pgwarden_proxy.masking.catalog import Catalog
from pgwarden_proxy.masking.detectors import NULL, DetectorSet
from pgwarden_proxy.masking.planner import StatementPlan, column_rule
from pgwarden_proxy.masking.rules import ColumnRule, MaskRules, strongest
from pgwarden_proxy.masking.strategies import REDACTED, Masker
from pgwarden_proxy.wire.framing import ProtocolViolation

try:  # the same walk in C (setup.py builds it where a compiler is found)
    from pgwarden_proxy.wire import _rowwalk

    NATIVE_WALK = True
except ImportError:  # pragma: no cover - only where the extension was not built
    NATIVE_WALK = False

TEXT_OID = 25
JSONB_OID = 3802
# text, varchar, bpchar, name, json, xml, unknown, "char", jsonb: values a detector can read
STRING_TYPES = frozenset({25, 1043, 1042, 19, 114, 142, 705, 18, JSONB_OID})

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD_TAIL = struct.Struct("!IhIhih")  # table OID, attnum, type OID, typlen, typmod, format
_NULL = b"\xff\xff\xff\xff"
_ROW_HEAD = struct.Struct("!ih")  # a DataRow's length and field count
_MESSAGE_HEAD = struct.Struct("!ci")
_SAME = b""  # sentinel (by identity): the value is not changed
_MEMO_LIMIT = 4096  # values remembered per column (masked values of repeated inputs)
_MEMO_VALUE_LIMIT = 256  # bytes: longer values are masked each time


@dataclass(frozen=True, slots=True)
class _Column:
    index: int
    masker: Masker | None  # the column's rule (whole value)
    detect: bool  # run the detectors on it
    jsonb_binary: bool  # jsonb in binary format: one version byte, then the text


class Rewriter:
    """Turns values into masked values (shared by DataRow and COPY rows).

    `line_detectors` serve COPY rows, where a finding cannot make its whole value NULL: there
    the `null` strategy redacts instead.
    """

    def __init__(
        self,
        maskers: Callable[[ColumnRule], Masker],
        detectors: DetectorSet | None,
        line_detectors: DetectorSet | None,
    ) -> None:
        self.maskers = maskers
        self.detectors = detectors
        self.line_detectors = line_detectors

    def value(self, col: _Column, raw: bytes, encoding: str) -> bytes | None:
        text = raw[1:] if col.jsonb_binary else raw
        s = text.decode(encoding, errors="replace")
        if col.masker is not None:
            out = col.masker.mask(s)
            return None if out is None else out.encode(encoding, errors="replace")
        assert self.detectors is not None
        found = self.detectors.scan(s)
        if found is None:
            return raw
        if found is NULL:
            return None
        new = found.encode(encoding, errors="replace")
        return raw[:1] + new if col.jsonb_binary else new


def _constant_field(col: _Column) -> bytes | None:
    """The field a value becomes when the strategy ignores the value (redact, null)."""
    if col.masker is None:
        return None
    if col.masker.strategy is MaskStrategy.NULL:
        return _NULL
    if col.masker.strategy is MaskStrategy.REDACT:
        marker = REDACTED.encode()
        return _I32.pack(len(marker)) + marker
    return None


class ResultMask:
    """The columns of one result that change, and how; `row()` rewrites one DataRow."""

    __slots__ = ("_encoding", "_native_plan", "_plan", "_rewriter", "rows_from")

    def __init__(
        self, columns: list[_Column], rewriter: Rewriter, encoding: str, *, native: bool = True
    ) -> None:
        self._rewriter = rewriter
        self._encoding = encoding
        # per column, in column order: its index, its memo of masked fields, the column, and
        # the field every value becomes when that does not depend on the value (redact, null)
        self._plan: list[tuple[int, dict[bytes, bytes], _Column, bytes | None]] = [
            (c.index, {}, c, _constant_field(c)) for c in columns
        ]
        self._native_plan = tuple((i, memo, const) for i, memo, _, const in self._plan)
        native = native and NATIVE_WALK
        self.rows_from: Callable[[bytes, int, int], tuple[bytes, int, int, int]] = (
            self._native_rows_from if native else self._python_rows_from
        )

    @classmethod
    def build(
        cls,
        row_description: bytes,
        plan: StatementPlan | None,
        rules: MaskRules,
        catalog: Catalog,
        rewriter: Rewriter,
        encoding: str,
    ) -> tuple[ResultMask | None, bytes]:
        """The mask of a result (None: rows pass untouched) and the RowDescription to send."""
        body = row_description
        (count,) = _I16.unpack_from(body, 0)
        pos = 2
        columns: list[_Column] = []
        out = bytearray(body[:2])
        outputs = plan.outputs if plan is not None else None
        if outputs is not None and len(outputs) != count:
            # the plan does not fit this result (a stale catalog, a function's columns): every
            # column takes the strongest rule the statement's lineage found anywhere
            outputs = (strongest(outputs),) * count
        for i in range(count):
            end = body.index(b"\x00", pos) + 1
            table, attnum, type_oid, _, _, fmt = _FIELD_TAIL.unpack_from(body, end)
            rule: ColumnRule | None = None
            if rules.columns:
                origin = None
                if table:
                    rel = catalog.by_oid(table)
                    if rel is not None:
                        origin = column_rule(catalog, rules, rel, attnum)
                derived = outputs[i] if outputs is not None and i < len(outputs) else None
                rule = strongest([origin, derived])
            detect = rewriter.detectors is not None and type_oid in STRING_TYPES
            out += body[pos:end]
            if rule is not None:
                out += _FIELD_TAIL.pack(table, attnum, TEXT_OID, -1, -1, fmt)
                columns.append(_Column(i, rewriter.maskers(rule), False, False))
            else:
                out += body[end : end + 18]
                if detect:
                    columns.append(_Column(i, None, True, type_oid == JSONB_OID and fmt == 1))
            pos = end + 18
        if not columns:
            return None, body
        return cls(columns, rewriter, encoding), bytes(out)

    def rows(self, data: bytes) -> bytes:
        """Whole DataRow messages back to back in, the same rows masked out."""
        out, end, _, _ = self.rows_from(data, 0, len(data) + 1)
        if end != len(data):
            raise ProtocolViolation("a DataRow too short to hold its field count")
        return out

    # rows_from(data, start, limit): the complete DataRows of `data` from `start` (up to another
    # message type, an incomplete row, or the end), masked: (the masked rows, where they end,
    # how many, their wire bytes before masking). A row longer than `limit` is a protocol
    # violation. It is the scanner's row walk too (`Scanner.row_rewriter`), so each row is read
    # once. Only the fields up to the last masked column are walked. Values come out of a
    # per-column memo where they can (strategies and detectors are deterministic), as the field
    # to write, length word included; `_SAME` when the value stays.

    def _native_rows_from(self, data: bytes, start: int, limit: int) -> tuple[bytes, int, int, int]:
        return _rowwalk.rows_from(
            data, start, limit, self._native_plan, self._missed, _SAME, ProtocolViolation
        )

    def _missed(self, position: int, raw: bytes) -> bytes:
        """The field of a value the memo of the plan's `position`-th column does not hold."""
        _, memo, col, _ = self._plan[position]
        return self._remember(memo, col, raw)

    def _remember(self, memo: dict[bytes, bytes], col: _Column, raw: bytes) -> bytes:
        """The field of a value its column's memo lacks, kept there while the memo has room."""
        field = self._field(col, raw, self._encoding)
        if len(raw) <= _MEMO_VALUE_LIMIT and len(memo) < _MEMO_LIMIT:
            memo[raw] = field
        return field

    def _python_rows_from(self, data: bytes, start: int, limit: int) -> tuple[bytes, int, int, int]:
        """The reference walk (and where the C one is not built)."""
        if len(self._plan) == 1:
            return self._one_column_from(data, start, limit)
        unpack = _I32.unpack_from
        head = _ROW_HEAD.unpack_from
        pack_head = _MESSAGE_HEAD.pack
        plan = self._plan  # (column index, memo, column) in column order
        parts: list[bytes] = []
        done = start  # data[done:pos] is unchanged and not yet in parts
        pos = start
        n = len(data)
        rows = 0
        while n - pos >= 7 and data[pos] == 68:  # D
            length, count = head(data, pos + 1)
            end = pos + 1 + length
            if end > n:
                break
            if length < 6 or length > limit:
                raise ProtocolViolation(f"invalid length {length} for message 'D'")
            rows += 1
            p = pos + 7
            index = 0
            kept = pos + 5  # start of this row's body not yet copied
            at = -1  # where this row's header goes in parts, once a field changes
            for target, memo, col, const in plan:
                if target >= count:
                    break
                while index < target:
                    (flen,) = unpack(data, p)
                    p += 4 + (flen if flen > 0 else 0)
                    index += 1
                (flen,) = unpack(data, p)
                index += 1
                if flen < 0:  # NULL stays NULL
                    p += 4
                    continue
                nxt = p + 4 + flen
                if const is not None:
                    field = const
                else:
                    raw = data[p + 4 : nxt]
                    field = memo.get(raw)  # type: ignore[assignment]
                    if field is None:
                        field = self._remember(memo, col, raw)
                if field is not _SAME:
                    if at < 0:
                        if pos > done:
                            parts.append(data[done:pos])
                        at = len(parts)
                        parts.append(_SAME)  # the header, once the length is known
                    parts.append(data[kept:p])
                    parts.append(field)
                    length += len(field) - (nxt - p)
                    kept = nxt
                p = nxt
            if at >= 0:
                parts.append(data[kept:end])
                parts[at] = pack_head(b"D", length)
                done = end
            pos = end
        if not parts:
            return data[start:pos], pos, rows, pos - start
        parts.append(data[done:pos])
        return b"".join(parts), pos, rows, pos - start

    def _one_column_from(self, data: bytes, start: int, limit: int) -> tuple[bytes, int, int, int]:
        """`rows_from` for the common case of one masked column, with less work per row."""
        unpack = _I32.unpack_from
        head = _ROW_HEAD.unpack_from
        pack_head = _MESSAGE_HEAD.pack
        ((target, memo, col, const),) = self._plan
        skip = range(target)
        parts: list[bytes] = []
        append = parts.append
        done = start
        pos = start
        n = len(data)
        rows = 0
        while n - pos >= 7 and data[pos] == 68:  # D
            length, count = head(data, pos + 1)
            end = pos + 1 + length
            if end > n:
                break
            if length < 6 or length > limit:
                raise ProtocolViolation(f"invalid length {length} for message 'D'")
            rows += 1
            if target < count:
                p = pos + 7
                for _ in skip:
                    flen = unpack(data, p)[0]
                    p += 4 + (flen if flen > 0 else 0)
                flen = unpack(data, p)[0]
                if flen >= 0:
                    nxt = p + 4 + flen
                    field = const
                    if field is None:
                        raw = data[p + 4 : nxt]
                        field = memo.get(raw)
                        if field is None:
                            field = self._remember(memo, col, raw)
                    if field is not _SAME:
                        # fewer, larger pieces: the rows before (rarely any), the rewritten
                        # head of this row up to its new value, what follows the value
                        if done != pos:
                            append(data[done:pos])
                        append(
                            pack_head(b"D", length + len(field) - 4 - flen)
                            + data[pos + 5 : p]
                            + field
                        )
                        if nxt != end:
                            append(data[nxt:end])
                        done = end
            pos = end
        if not parts:
            return data[start:pos], pos, rows, pos - start
        parts.append(data[done:pos])
        return b"".join(parts), pos, rows, pos - start

    def _field(self, col: _Column, raw: bytes, encoding: str) -> bytes:
        new = self._rewriter.value(col, raw, encoding)
        if new is raw:
            return _SAME
        return _NULL if new is None else _I32.pack(len(new)) + new


class CopyMask:
    """COPY ... TO STDOUT rows in text or csv format: one CopyData message per row."""

    __slots__ = ("_columns", "_csv", "_encoding", "_rewriter")

    def __init__(
        self,
        outputs: Sequence[ColumnRule | None],
        rewriter: Rewriter,
        encoding: str,
        csv: bool,
    ) -> None:
        self._columns = {
            i: rewriter.maskers(rule) for i, rule in enumerate(outputs) if rule is not None
        }
        self._rewriter = rewriter
        self._encoding = encoding
        self._csv = csv

    def row(self, body: bytes) -> bytes:
        line = body.decode(self._encoding, errors="replace")
        if self._columns:
            line = self._mask_columns(line)
        detectors = self._rewriter.line_detectors
        if detectors is not None:
            found = detectors.scan(line)
            if isinstance(found, str):
                line = found
        data = line.encode(self._encoding, errors="replace")
        return b"d" + _I32.pack(len(data) + 4) + data

    def _mask_columns(self, line: str) -> str:
        newline = line.endswith("\n")
        fields = _split_csv(line.rstrip("\n")) if self._csv else line.rstrip("\n").split("\t")
        for i, masker in self._columns.items():
            if i >= len(fields):
                continue
            value = fields[i]
            if (self._csv and value == "") or (not self._csv and value == "\\N"):
                continue  # NULL
            plain = _csv_unquote(value) if self._csv else _text_unescape(value)
            masked = masker.mask(plain)
            if masked is None:
                fields[i] = "" if self._csv else "\\N"
            else:
                fields[i] = _csv_quote(masked) if self._csv else _text_escape(masked)
        return (",".join(fields) if self._csv else "\t".join(fields)) + ("\n" if newline else "")


_TEXT_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}


def _text_unescape(value: str) -> str:
    if "\\" not in value:
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            out.append(_TEXT_ESCAPES.get(nxt, nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _text_escape(value: str) -> str:
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _split_csv(line: str) -> list[str]:
    """Split one CSV line into raw fields (quotes kept), as COPY writes it."""
    fields: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in line:
        if ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            fields.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    fields.append("".join(cur))
    return fields


def _csv_unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1].replace('""', '"')
    return value


def _csv_quote(value: str) -> str:
    if value == "" or any(c in value for c in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value
