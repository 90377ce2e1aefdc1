"""Incremental framing of typed v3 messages, sans-IO.

The scanner cuts a byte stream into messages without ever holding a bulk message whole: types
marked as *streamed* (DataRow, CopyData) pass through as raw byte runs, whatever their size and
however the stream is split; every other message is yielded whole so the proxy can read it. The
consumer may change which types stream between two yielded items (masking needs rows decoded
from the RowDescription on), which is why `feed` is a generator.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass

_HDR = struct.Struct("!BI")

CountRows = Callable[[bytes, int, int, int], tuple[int, int, int]]


def _native_count_rows() -> CountRows | None:
    """The per-row loop in C, where setup.py could build it (a compiler was found)."""
    try:
        from pgwarden_proxy.wire._rowwalk import count_rows
    except ImportError:  # pragma: no cover - only where the extension was not built
        return None
    return count_rows


_count_rows = _native_count_rows()

# PostgreSQL caps most frontend messages at PQ_SMALL_MESSAGE_LIMIT; these may be large.
LARGE_FRONTEND_TYPES = frozenset(b"QPBFdfp")
SMALL_MESSAGE_LIMIT = 10_000
# A DataRow or CopyData can be up to 1 GB in PostgreSQL; beyond that a length is nonsense.
STREAM_LIMIT = (1 << 30) + 64


class ProtocolViolation(Exception):
    """The peer sent bytes that are not the protocol; the connection must be closed (08P01)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs twice as much
class Message:
    """One whole message. `rows`/`row_bytes`: DataRows streamed since the previous Message.
    Treated as immutable: a changed message is a new Message."""

    type: int
    body: bytes
    raw: bytes
    rows: int = 0
    row_bytes: int = 0


class Rows:
    """Whole rows (DataRow messages) back to back, for a consumer that rewrites them;
    `rewritten` when the scanner's `row_rewriter` already did."""

    __slots__ = ("count", "data", "rewritten")

    def __init__(self, data: bytes, count: int, rewritten: bool = False) -> None:
        self.data = data
        self.count = count
        self.rewritten = rewritten


# (data, start, longest row) -> (rewritten rows, their end, how many, their bytes before)
RowRewriter = Callable[[bytes, int, int], tuple[bytes, int, int, int]]


class Scanner:
    """Splits one direction of a session into `bytes` runs (streamed) and `Message`s.

    `streamed` holds message type bytes whose bodies pass through unread; `counted` is the type
    whose messages are counted as rows (DataRow). Limits: a whole (non-streamed) message larger
    than `max_message` — or than SMALL_MESSAGE_LIMIT for frontend types PostgreSQL keeps small
    when `frontend` is set — is a ProtocolViolation, so an absurd length costs no memory.
    """

    __slots__ = (
        "_counted",
        "_dropping",
        "_frontend",
        "_max_message",
        "_partial",
        "_row_bytes",
        "_rows",
        "_skip",
        "dropped",
        "row_budget",
        "row_rewriter",
        "streamed",
        "whole_rows",
    )

    def __init__(
        self,
        *,
        streamed: Iterable[int],
        counted: int | None = None,
        max_message: int,
        frontend: bool = False,
    ) -> None:
        self.streamed = set(streamed)
        self._counted = counted
        self._max_message = max_message
        self._frontend = frontend
        self._partial = b""  # an incomplete header or whole message carried to the next feed
        self._skip = 0  # bytes of a streamed message still to pass through
        self._rows = 0
        self._row_bytes = 0
        # maxRows: counted messages still to pass (None: no limit); beyond it they are dropped
        self.row_budget: int | None = None
        self.dropped = 0
        self._dropping = False  # the streamed message being skipped is dropped, not passed
        # rows of the counted type arrive as `Rows` of whole messages (masking rewrites them)
        # instead of byte runs; the consumer may switch this between two yielded items
        self.whole_rows = False
        self.row_rewriter: RowRewriter | None = None  # rewrites whole rows as it finds them

    @property
    def at_boundary(self) -> bool:
        """True when no message is half-way through: a message may be injected here."""
        return not self._partial and not self._skip

    def feed(self, data: bytes) -> Iterator[bytes | Message | Rows]:
        if self._partial:
            data = self._partial + data
            self._partial = b""
        n = len(data)
        pos = 0
        run_start = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                dropping = self._dropping
                if not self._skip:
                    self._dropping = False  # that message ends exactly here
                if not dropping:
                    yield data
                return
            pos = self._skip
            self._skip = 0
            if self._dropping:
                run_start = pos
                self._dropping = False
        unpack = _HDR.unpack_from
        streamed = self.streamed
        counted = self._counted
        # a whole message up to this length needs no closer look (see _check_length)
        quick = min(SMALL_MESSAGE_LIMIT, self._max_message) if self._frontend else self._max_message
        while pos < n:
            if n - pos < 5:
                break
            typ, length = unpack(data, pos)
            end = pos + 1 + length
            if typ in streamed:
                if length < 4 or length > STREAM_LIMIT:
                    raise ProtocolViolation(f"invalid length {length} for message {chr(typ)!r}")
                if typ == counted and self.whole_rows:
                    # rows to rewrite: yielded as Rows, whole messages only
                    if pos > run_start:
                        yield data[run_start:pos]
                    pos = yield from self._whole_rows(data, pos)
                    run_start = pos
                    if pos >= n or n - pos < 5:
                        break
                    typ, length = unpack(data, pos)
                    if typ == counted and pos + 1 + length > n:
                        break  # an incomplete row: kept for the next feed
                    continue
                if typ == counted:
                    budget = self.row_budget
                    if budget is None and _count_rows is not None:
                        # a result streaming through: its complete rows at once (in C); an
                        # incomplete or invalid one is left to the loop below
                        after, k, nbytes = _count_rows(data, pos, typ, STREAM_LIMIT)
                        if k:
                            self._rows += k
                            self._row_bytes += nbytes
                            pos = after
                            continue
                    if budget is not None:
                        if budget <= 0:  # over maxRows: drop this row
                            if pos > run_start:
                                yield data[run_start:pos]
                            self.dropped += 1
                            if end > n:
                                self._skip = end - n
                                self._dropping = True
                                pos = run_start = n
                                break
                            pos = run_start = end
                            continue
                        self.row_budget = budget - 1
                    self._rows += 1
                    self._row_bytes += length + 1
                if end > n:
                    self._skip = end - n
                    pos = n
                    break
                pos = end
                continue
            if length < 4 or length > quick:
                self._check_length(typ, length)
            if pos > run_start:
                yield data[run_start:pos]
            run_start = pos
            if end > n:
                break
            msg = Message(typ, data[pos + 5 : end], data[pos:end], self._rows, self._row_bytes)
            self._rows = 0
            self._row_bytes = 0
            pos = run_start = end
            yield msg
            # the consumer may have changed `streamed` while suspended
            streamed = self.streamed
        if run_start < pos:
            yield data if run_start == 0 and pos == n else data[run_start:pos]
        if pos < n:
            self._partial = data[pos:]

    def _whole_rows(self, data: bytes, pos: int) -> Generator[Rows, None, int]:
        """Consecutive complete rows from `pos` as Rows runs (maxRows applied); the end."""
        rewrite = self.row_rewriter
        if rewrite is not None and self.row_budget is None:
            # one walk that finds the rows and rewrites them (the masking hot path)
            out, end, k, nbytes = rewrite(data, pos, self._max_message)
            if end > pos:
                self._rows += k
                self._row_bytes += nbytes
                yield Rows(out, k, rewritten=True)
                return end
        n = len(data)
        unpack = _HDR.unpack_from
        counted = self._counted
        limit = self._max_message
        budget = self.row_budget  # kept in a local: this loop runs once per row
        start = pos
        k = 0
        row_bytes = 0
        while n - pos >= 5:
            typ, length = unpack(data, pos)
            if typ != counted:
                break
            if length < 4 or length > limit:
                raise ProtocolViolation(f"invalid length {length} for message {chr(typ)!r}")
            end = pos + 1 + length
            if end > n:
                break
            if budget is not None:
                if budget <= 0:  # over maxRows: this row is dropped
                    if pos > start:
                        self._rows += k
                        yield Rows(data[start:pos], k)
                    k = 0
                    self.dropped += 1
                    pos = start = end
                    continue
                budget -= 1
            k += 1
            row_bytes += length + 1
            pos = end
        self.row_budget = budget
        self._rows += k
        self._row_bytes += row_bytes
        if pos > start:
            yield Rows(data[start:pos], k)
        return pos

    def _check_length(self, typ: int, length: int) -> None:
        if length < 4:
            raise ProtocolViolation(f"invalid length {length} for message {chr(typ)!r}")
        limit = self._max_message
        if self._frontend and typ not in LARGE_FRONTEND_TYPES:
            limit = SMALL_MESSAGE_LIMIT
        if length > limit:
            raise ProtocolViolation(
                f"message {chr(typ)!r} of {length} bytes exceeds the limit of {limit} bytes"
            )
