"""The C row walk (wire/_rowwalk.c) gives exactly what the Python walk gives, and refuses
malformed rows instead of reading past them."""

from __future__ import annotations

import shutil
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.api.policy import Detector, MaskStrategy
from pgwarden_proxy.masking import rows as rows_module
from pgwarden_proxy.masking.detectors import DetectorSet
from pgwarden_proxy.masking.rows import ResultMask, Rewriter, _Column
from pgwarden_proxy.masking.strategies import Masker
from pgwarden_proxy.wire.framing import ProtocolViolation
from tests.unit.test_result_mask import datarow

native_only = pytest.mark.skipif(
    not rows_module.NATIVE_WALK, reason="the C row walk is not built (no C compiler at install)"
)

KEY = b"k" * 32
# values a detector finds, and others
value = st.one_of(
    st.none(),
    st.text(max_size=30).map(str.encode),
    st.sampled_from([b"mail a@example.org", b"4111 1111 1111 1111", b"123-45-6789", b""]),
)
table = st.lists(st.lists(value, min_size=0, max_size=7), max_size=25)
# per masked column: a strategy, or None for the detectors
column_kinds = st.dictionaries(
    st.integers(0, 7), st.one_of(st.none(), st.sampled_from(list(MaskStrategy))), max_size=4
)
tails = st.sampled_from(
    [b"", b"C\x00\x00\x00\x0dSELECT 1\x00", b"D\x00\x00\x00\x20\x00\x01", b"D\x00", b"Z"]
)


def masks(kinds: dict[int, MaskStrategy | None]) -> tuple[ResultMask, ResultMask]:
    detectors = DetectorSet(
        [
            (Detector.EMAIL, Masker(MaskStrategy.PARTIAL, KEY)),
            (Detector.CREDIT_CARD, Masker(MaskStrategy.REDACT, KEY)),
            (Detector.US_SSN, Masker(MaskStrategy.NULL, KEY)),
        ]
    )
    rewriter = Rewriter(lambda rule: Masker(MaskStrategy.REDACT, KEY), detectors, None)

    def columns() -> list[_Column]:
        return [
            _Column(i, None if s is None else Masker(s, KEY), s is None, False)
            for i, s in sorted(kinds.items())
        ]

    return (
        ResultMask(columns(), rewriter, "utf-8", native=True),
        ResultMask(columns(), rewriter, "utf-8", native=False),
    )


@native_only
@settings(max_examples=300, deadline=None)
@given(table, column_kinds, st.binary(max_size=9), tails)
def test_the_c_walk_gives_what_the_python_walk_gives(
    rows: list[list[bytes | None]],
    kinds: dict[int, MaskStrategy | None],
    before: bytes,
    tail: bytes,
) -> None:
    native, python = masks(kinds)
    data = before + b"".join(datarow(r) for r in rows) + tail
    for _ in range(2):  # the second pass takes values from the memos
        got = native.rows_from(data, len(before), 1 << 20)
        assert got == python.rows_from(data, len(before), 1 << 20)
        assert got[2] == len(rows)


@native_only
def test_a_row_over_the_limit_or_too_short_is_refused_by_both() -> None:
    native, python = masks({0: MaskStrategy.REDACT})
    long_row = datarow([b"x" * 100])
    short = b"D\x00\x00\x00\x05\x00\x00"  # a length that leaves no room for the count
    for mask in (native, python):
        with pytest.raises(ProtocolViolation, match="invalid length"):
            mask.rows_from(long_row, 0, 50)
        with pytest.raises(ProtocolViolation, match="invalid length"):
            mask.rows_from(short, 0, 1 << 20)


@native_only
@pytest.mark.parametrize(
    "row",
    [
        # a field length past the row's end
        b"D" + struct.pack("!ih", 10, 1) + struct.pack("!i", 1000),
        # a field count larger than the fields there are
        b"D" + struct.pack("!ih", 6, 3),
        # a skipped field that runs past the row into the next message
        b"D" + struct.pack("!ih", 10, 2) + struct.pack("!i", 50) + b"C" * 60,
    ],
)
def test_a_row_whose_fields_overrun_it_is_refused(row: bytes) -> None:
    native, _ = masks({0: MaskStrategy.HASH, 1: MaskStrategy.HASH})
    with pytest.raises(ProtocolViolation, match="run past its end"):
        native.rows_from(row, 0, 1 << 20)


@native_only
@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=7, max_size=80), st.integers(0, 6))
def test_any_bytes_give_rows_or_a_protocol_violation(junk: bytes, column: int) -> None:
    native, _ = masks({column: MaskStrategy.PARTIAL})
    data = b"D" + junk
    try:
        _, end, count, consumed = native.rows_from(data, 0, 1 << 20)
    except ProtocolViolation:
        return
    assert 0 <= end <= len(data)
    assert consumed == end
    assert count >= 0


@native_only
def test_bad_arguments_are_type_errors_not_crashes() -> None:
    from pgwarden_proxy.wire import _rowwalk

    walk: Any = _rowwalk.rows_from  # wrong on purpose

    def miss(i: int, raw: bytes) -> bytes:
        return raw

    with pytest.raises(TypeError):
        walk(b"", 0, 10, [], miss, b"", ProtocolViolation)
    with pytest.raises(TypeError):
        walk(b"", 0, 10, ((0, {}, 5),), miss, b"", ProtocolViolation)
    with pytest.raises(ValueError, match="increasing"):
        walk(b"", 0, 10, ((1, {}, None), (0, {}, None)), miss, b"", ValueError)
    with pytest.raises(ValueError, match="outside"):
        walk(b"D", 5, 10, (), miss, b"", ValueError)
    with pytest.raises(TypeError, match="must be bytes"):
        walk(datarow([b"v"]), 0, 100, ((0, {}, None),), lambda i, raw: 7, b"", ValueError)


def test_where_a_compiler_exists_the_walk_is_built() -> None:
    # setup.py builds it as an optional extension: this says when an install silently lost it
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the pure-Python walk is used")
    assert rows_module.NATIVE_WALK
