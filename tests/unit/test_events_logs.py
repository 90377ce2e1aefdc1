"""Statement events serialise every field; the log handler batches lines for a few milliseconds;
statement events skip the logging machinery only when nothing else listens; the C statement
line (_eventline.c) is the Python line."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
from collections.abc import Iterator
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden import logs
from pgwarden.api.statements import StatementClass
from pgwarden.logs import FLUSH_DELAY, BatchingStreamHandler, JsonFormatter
from pgwarden_proxy import events
from pgwarden_proxy.events import LogEventSink, StatementEvent


def test_statement_event_as_dict_has_every_field() -> None:
    ev = StatementEvent(
        "s", "c", "who", "SELECT $1", "fp", ("read",), "SELECT", ["1"], "extended", "allow", None, 0
    )
    d = ev.as_dict()
    # seq and result belong to the session recording, not to the log line
    assert set(d) == {f.name for f in dataclasses.fields(StatementEvent)} - {"seq", "result"}
    assert d["start"] == "1970-01-01T00:00:00.000000Z"
    assert json.loads(json.dumps(d))["classes"] == ["read"]


def test_batching_handler_writes_a_burst_at_once() -> None:
    class Counting(io.StringIO):
        writes = 0

        def write(self, s: str) -> int:
            self.writes += 1
            return super().write(s)

    stream = Counting()
    handler = BatchingStreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("test.batching")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("outside a loop")  # written at once
        assert stream.writes == 1

        async def burst() -> int:
            for i in range(100):
                log.info("line", extra={"i": i})
            before = stream.writes
            await asyncio.sleep(0)
            assert stream.writes == before  # still waiting, for more lines to join
            await asyncio.sleep(FLUSH_DELAY * 3)
            return before

        assert asyncio.run(burst()) == 1
        assert stream.writes == 2
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x.get("i") for x in lines[1:]] == list(range(100))
    finally:
        log.removeHandler(handler)


def _event() -> StatementEvent:
    return StatementEvent(
        "s1",
        "conn",
        "alice@example.org",
        'SELECT "é", $1 -- \\ \n',
        "fp",
        ("read",),
        "SELECT",
        ["x\u0000y", None],
        "extended",
        "allow",
        "ro",
        1.5,
        0.25,
        1,
        40,
        "SELECT 1",
        {"sqlstate": "42501", "message": "pgwarden: no"},
    )


@pytest.fixture
def configured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        logs._configured.clear()


def _only_ours() -> None:
    # pytest's own capture handlers join the root logger for each test phase
    logging.getLogger().handlers[:] = logs._configured


def test_statement_line_is_what_the_formatter_writes(configured: io.StringIO) -> None:
    _only_ours()
    ev = _event()
    LogEventSink().statement(ev)  # outside a loop: written at once, by the direct path
    direct = json.loads(configured.getvalue())
    record = logging.LogRecord("pgwarden.events", logging.INFO, "", 0, "statement", (), None)
    record.event = ev.as_dict()
    formatted = json.loads(JsonFormatter().format(record))
    assert direct.pop("time")[:4] == formatted.pop("time")[:4]
    assert direct == formatted


def test_statement_events_go_through_logging_when_another_handler_listens(
    configured: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("pgwarden.events")
    assert logs.event_writer(log) is None  # caplog's handler is on the root logger too
    with caplog.at_level(logging.INFO):
        LogEventSink().statement(_event())
    assert [r.getMessage() for r in caplog.records] == ["statement"]
    assert json.loads(configured.getvalue())["event"]["identity"] == "alice@example.org"


def test_statement_events_off_write_nothing(configured: io.StringIO) -> None:
    _only_ours()
    assert logs.event_writer(logging.getLogger("pgwarden.events")) is not None
    LogEventSink(statements=False).statement(_event())
    assert configured.getvalue() == ""


def test_lines_left_when_a_loop_stops_are_written_by_the_next_loop_or_at_flush(
    configured: io.StringIO,
) -> None:
    _only_ours()
    log = logging.getLogger("pgwarden.test")

    async def one(msg: str, wait: float) -> None:
        log.info(msg)
        await asyncio.sleep(wait)

    asyncio.run(one("first", 0))  # the loop is gone before its flush was due
    assert configured.getvalue() == ""
    asyncio.run(one("second", FLUSH_DELAY * 3))  # a new loop on this thread flushes both
    assert [json.loads(x)["msg"] for x in configured.getvalue().splitlines()] == ["first", "second"]
    asyncio.run(one("third", 0))
    logs.flush()  # what the proxy does when its loop has stopped
    assert json.loads(configured.getvalue().splitlines()[-1])["msg"] == "third"


# ---------------------------------------------------------------------------------- the C line
native_line = pytest.mark.skipif(
    events.statement_line is None, reason="the C line is not built (no C compiler at install)"
)
texts = st.text(max_size=40) | st.sampled_from(['"', "\\", "\x00\x1f\x7f", "\u2028é😀", "\t\n\r"])
maybe = st.none() | texts


@st.composite
def statement_events(draw: st.DrawFn) -> StatementEvent:
    return StatementEvent(
        draw(texts),
        draw(texts),
        draw(texts),
        draw(texts),
        draw(maybe),
        tuple(draw(st.lists(texts | st.sampled_from(list(StatementClass)), max_size=3))),
        draw(texts),
        draw(st.none() | st.lists(maybe, max_size=4)),
        draw(st.sampled_from(["simple", "extended", "fastpath"])),
        draw(st.sampled_from(["allow", "refuse", "approved"])),
        draw(maybe),
        draw(st.floats(0, 4e9) | st.integers(0, 4_000_000_000)),
        draw(st.floats(0, 1e7) | st.sampled_from([0.0005, 0.0015, 2.0004999, 1e15, 1e16])),
        draw(st.integers(0, 2**64 - 1)),
        draw(st.integers(0, 2**40)),
        draw(maybe),
        draw(st.none() | st.just({"sqlstate": "42501", "message": 'no "way"'})),
        draw(st.booleans()),
        draw(st.none() | st.just({"request": "r1", "state": "Approved", "decidedBy": None})),
    )


@native_line
@settings(max_examples=500, deadline=None)
@given(ev=statement_events(), now=st.floats(0, 4e9))
def test_the_c_line_is_the_python_line(ev: StatementEvent, now: float) -> None:
    """Character for character, or None where it leaves the line to Python (dicts, ints beyond
    64 bits, a start that is not a float, a duration of 1e15 ms or more)."""
    sink = LogEventSink()
    assert events.statement_line is not None
    line = events.statement_line(ev, sink._middle, now)
    left_to_python = (
        ev.error is not None
        or ev.approval is not None
        or ev.rows >= 2**63
        or not isinstance(ev.start, float)
        or ev.duration_ms >= 1e15
    )
    if left_to_python:
        assert line is None
        return
    with mock.patch("time.time", return_value=now):
        assert line == logs.event_line("pgwarden.events", "statement", ev.as_dict())


@native_line
def test_the_c_line_leaves_what_it_cannot_write_to_python() -> None:
    sink = LogEventSink()
    assert events.statement_line is not None
    ev = _event()
    assert events.statement_line(ev, sink._middle, 0.0) is None  # an error dict
    ev.error = None
    ev.classes = (StatementClass.READ,)  # as sessions give them: a StrEnum
    assert events.statement_line(ev, sink._middle, 0.0) is not None
    ev.parameters = ["\ud800"]  # a lone surrogate: orjson refuses it, so must the sink's caller
    assert events.statement_line(ev, sink._middle, 0.0) is None
    ev.parameters = [1]  # type: ignore[list-item]
    assert events.statement_line(ev, sink._middle, 0.0) is None
    with pytest.raises(TypeError):
        events.statement_line(ev, b"middle", 0.0)  # type: ignore[arg-type]
