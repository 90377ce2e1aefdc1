"""Statement events serialise every field; the log handler batches lines for a few milliseconds;
statement events skip the logging machinery only when nothing else listens."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
from collections.abc import Iterator

import pytest

from pgwarden import logs
from pgwarden.logs import FLUSH_DELAY, BatchingStreamHandler, JsonFormatter
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
