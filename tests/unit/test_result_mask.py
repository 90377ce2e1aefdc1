"""ResultMask rewrites exactly the masked fields of every row, whatever the rows hold."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.api.policy import Detector, MaskStrategy
from pgwarden_proxy.masking.detectors import DetectorSet
from pgwarden_proxy.masking.rows import CopyMask, ResultMask, Rewriter, _Column
from pgwarden_proxy.masking.rules import ColumnRule
from pgwarden_proxy.masking.strategies import Masker
from pgwarden_proxy.wire.framing import Message, Rows, Scanner
from pgwarden_proxy.wire.messages import frame

D = ord("D")

KEY = b"k" * 32
field = st.one_of(st.none(), st.text(max_size=40).map(str.encode))
rows = st.lists(st.lists(field, min_size=0, max_size=6), max_size=30)


def datarow(values: list[bytes | None]) -> bytes:
    body = struct.pack("!h", len(values)) + b"".join(
        b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v for v in values
    )
    return b"D" + struct.pack("!i", len(body) + 4) + body


def parse(data: bytes) -> list[list[bytes | None]]:
    out = []
    pos = 0
    while pos < len(data):
        assert data[pos : pos + 1] == b"D"
        (length,) = struct.unpack_from("!i", data, pos + 1)
        (count,) = struct.unpack_from("!h", data, pos + 5)
        p = pos + 7
        values: list[bytes | None] = []
        for _ in range(count):
            (n,) = struct.unpack_from("!i", data, p)
            values.append(None if n < 0 else data[p + 4 : p + 4 + n])
            p += 4 + max(n, 0)
        assert p == pos + 1 + length
        out.append(values)
        pos = p
    return out


@settings(max_examples=200, deadline=None)
@given(rows, st.sets(st.integers(0, 6), max_size=3), st.sampled_from(list(MaskStrategy)))
def test_masked_fields_change_and_the_others_stay(
    table: list[list[bytes | None]], masked: set[int], strategy: MaskStrategy
) -> None:
    masker = Masker(strategy, KEY)
    rewriter = Rewriter(lambda rule: masker, None, None)
    mask = ResultMask([_Column(i, masker, False, False) for i in sorted(masked)], rewriter, "utf-8")
    data = b"".join(datarow(r) for r in table)
    for _ in range(2):  # the second pass comes from the per-column memo
        out = parse(mask.rows(data))
        assert len(out) == len(table)
        for before, after in zip(table, out, strict=True):
            assert len(before) == len(after)
            for i, (b, a) in enumerate(zip(before, after, strict=True)):
                if i not in masked or b is None:
                    assert a == b
                else:
                    expected = masker.mask(b.decode())
                    assert a == (None if expected is None else expected.encode())


def test_detectors_rewrite_findings_only() -> None:
    masker = Masker(MaskStrategy.REDACT, KEY)
    detectors = DetectorSet([(Detector.EMAIL, masker)])
    rewriter = Rewriter(lambda rule: masker, detectors, detectors)
    mask = ResultMask([_Column(1, None, True, False)], rewriter, "utf-8")
    data = datarow([b"1", b"write to a@example.org"]) + datarow([b"2", b"nothing"])
    assert parse(mask.rows(data)) == [[b"1", b"write to [redacted]"], [b"2", b"nothing"]]


def test_copy_text_and_csv_rows_are_masked_by_column() -> None:
    masker = Masker(MaskStrategy.REDACT, KEY)
    rewriter = Rewriter(lambda rule: masker, None, None)
    rule = ColumnRule("email", MaskStrategy.REDACT, "p")
    text = CopyMask([None, rule], rewriter, "utf-8", csv=False)
    assert text.row(b"1\ta\\tb@example.org\n")[5:] == b"1\t[redacted]\n"
    assert text.row(b"2\t\\N\n")[5:] == b"2\t\\N\n"  # NULL stays NULL
    csv = CopyMask([None, rule, None], rewriter, "utf-8", csv=True)
    assert csv.row(b'1,"x,@y.org",3\n')[5:] == b"1,[redacted],3\n"


@settings(max_examples=200, deadline=None)
@given(
    rows,
    st.lists(st.integers(0, 5000), max_size=20),
    st.sampled_from([MaskStrategy.REDACT, MaskStrategy.HASH]),
)
def test_the_scanner_rewrites_rows_as_it_finds_them_under_any_split(
    table: list[list[bytes | None]], cuts: list[int], strategy: MaskStrategy
) -> None:
    masker = Masker(strategy, KEY)
    rewriter = Rewriter(lambda rule: masker, None, None)
    data = (
        b"".join(datarow(r) for r in table[: len(table) // 2])
        + frame(b"N", b"notice\x00")
        + b"".join(datarow(r) for r in table[len(table) // 2 :])
        + frame(b"C", b"SELECT 1\x00")
    )
    reference = ResultMask([_Column(1, masker, False, False)], rewriter, "utf-8")
    expected = b""
    for item in Scanner(streamed=(D,), counted=D, max_message=1 << 20).feed(data):
        if isinstance(item, Message):
            expected += item.raw
        else:
            assert isinstance(item, bytes)
            expected += item
    # what the proxy sends: every DataRow masked by the reference, other messages as they are
    expected_rows = parse_messages(expected)
    mask = ResultMask([_Column(1, masker, False, False)], rewriter, "utf-8")
    scanner = Scanner(streamed=(D,), counted=D, max_message=1 << 20)
    scanner.whole_rows = True
    scanner.row_rewriter = mask.rows_from
    got = b""
    for part in chunks_of(data, cuts):
        for item in scanner.feed(part):
            if isinstance(item, Rows):
                got += item.data if item.rewritten else mask.rows(item.data)
            elif isinstance(item, Message):
                got += item.raw
            else:
                got += item
    masked = [(t, reference.rows(raw) if t == b"D" else raw) for t, raw in expected_rows]
    assert got == b"".join(raw for _, raw in masked)


def parse_messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from("!i", data, pos + 1)
        out.append((data[pos : pos + 1], data[pos : pos + 1 + length]))
        pos += 1 + length
    return out


def chunks_of(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out
