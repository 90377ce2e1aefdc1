"""Statement events serialise every field; the log handler batches lines per loop turn."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging

from pgwarden.logs import BatchingStreamHandler, JsonFormatter
from pgwarden_proxy.events import StatementEvent


def test_statement_event_as_dict_has_every_field() -> None:
    ev = StatementEvent(
        "s", "c", "who", "SELECT $1", "fp", ("read",), "SELECT", ["1"], "extended", "allow", None, 0
    )
    d = ev.as_dict()
    # seq and result belong to the session recording, not to the log line
    assert set(d) == {f.name for f in dataclasses.fields(StatementEvent)} - {"seq", "result"}
    assert d["start"] == "1970-01-01T00:00:00.000000Z"
    assert json.loads(json.dumps(d))["classes"] == ["read"]


def test_batching_handler_writes_once_per_loop_turn() -> None:
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
            await asyncio.sleep(0)  # the end of this turn flushes
            return before

        assert asyncio.run(burst()) == 1
        assert stream.writes == 2
        lines = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [x.get("i") for x in lines[1:]] == list(range(100))
    finally:
        log.removeHandler(handler)
