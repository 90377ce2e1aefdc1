"""The fast path of prepared statements (wire/_fastpath.c, session.py `_fast_*`) against the
Python path it shortcuts: the same traffic, through a proxy with the fast path on and through
one with it off, must give the client the same answers (rows, errors with their SQLSTATE,
notices, settings) and give the same statement events, field by field but for timing and the
session id, in order.

The Python path (session.py and tracker.py) is the reference: the fast path only takes the
executions of statements that the policy lets run as they are, and hands everything it does not
expect back to that path, so any difference here is a bug of the fast path (or of the handover).
Each test also checks that its ON run really used the fast path and its OFF run never did, so a
change that quietly stops the fast path from being taken fails here instead of passing
vacuously.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import os
import select
import struct
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import asyncpg
import psycopg
import pytest
from psycopg import pq

from pgwarden.api.config import ProxyConfig
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden_proxy import fastpath
from pgwarden_proxy.events import SessionEvent, StatementEvent
from pgwarden_proxy.session import Session
from pgwarden_proxy.wire import messages as m
from tests.integration.conftest import (
    APP_DB,
    APP_USER,
    Database,
    MakeProxy,
    RunningProxy,
    base_config,
)
from tests.integration.rawpg import RawClient

if TYPE_CHECKING:
    from pgwarden_proxy.fastpath import FastStatement
    from pgwarden_proxy.wire._fastpath import Done

pytestmark = pytest.mark.skipif(
    fastpath.FastPath is None, reason="the C fast path is not built (no C compiler at install)"
)

Conn = psycopg.Connection[tuple[Any, ...]]
Workload = Callable[[RunningProxy], list[Any]]  # runs the traffic: what the client got

# Every field of an event is compared but these: when it ran, and the session's random id.
_NOT_COMPARED = frozenset({"session_id", "start", "duration_ms"})
_COMPARED = tuple(f.name for f in dataclasses.fields(StatementEvent) if f.name not in _NOT_COMPARED)


# ---------------------------------------------------------------------------- the harness
@dataclasses.dataclass
class _Spy:
    """What the sessions of one run did, counted on the proxy's thread."""

    queued: int = 0  # executions that took the fast path (their event built by `_fast_event`)
    done: int = 0  # of those, the ones the C walk saw through to CommandComplete
    with_fast: int = 0  # sessions that started relaying with a fast path
    without_fast: int = 0  # ... and without


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> _Spy:
    """Counts fast-path use by wrapping Session methods on the class (all proxies, all runs)."""
    s = _Spy()
    fast_event = Session._fast_event
    fast_done = Session._fast_done
    start_relay = Session._start_relay

    def counted_event(
        self: Session,
        entry: FastStatement,
        params: list[str | None] | None,
        bind: bytes,
        start: float,
    ) -> StatementEvent:
        s.queued += 1
        return fast_event(self, entry, params, bind, start)

    def counted_done(self: Session, done: list[Done]) -> None:
        s.done += len(done)
        fast_done(self, done)

    def counted_start(self: Session) -> None:
        if self._fast is None:
            s.without_fast += 1
        else:
            s.with_fast += 1
        start_relay(self)

    monkeypatch.setattr(Session, "_fast_event", counted_event)
    monkeypatch.setattr(Session, "_fast_done", counted_done)
    monkeypatch.setattr(Session, "_start_relay", counted_start)
    return s


@dataclasses.dataclass
class Run:
    got: list[Any]  # what the client got
    events: list[list[dict[str, Any]]]  # each session's statement events, compared fields
    statements: list[int]  # each session's statement count (its session_end event)
    spy: _Spy


def _comparable(ev: StatementEvent) -> dict[str, Any]:
    return {name: getattr(ev, name) for name in _COMPARED}


def _watch_sessions(proxy: RunningProxy, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Returns a wait for every session of the proxy to have ended: then all its statement
    events are in, whatever the client did last (a statement in flight when it closed)."""
    cond = threading.Condition()
    sink = proxy.sink
    record = sink.session

    def session(ev: SessionEvent) -> None:
        with cond:
            record(ev)
            cond.notify_all()

    monkeypatch.setattr(sink, "session", session)

    def all_ended() -> bool:
        starts = sum(e.type == "session_start" for e in sink.sessions)
        ends = sum(e.type == "session_end" for e in sink.sessions)
        return starts > 0 and starts == ends

    def wait() -> None:
        with cond:
            assert cond.wait_for(all_ended, timeout=30), "sessions did not end"

    return wait


def _first_difference(off: list[list[dict[str, Any]]], on: list[list[dict[str, Any]]]) -> str:
    """Where the events of the two runs part, field by field (for the assertion message)."""
    for i, (a, b) in enumerate(zip(off, on, strict=False)):
        for j, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                fields = {k: {"off": x.get(k), "on": y.get(k)} for k in x if x.get(k) != y.get(k)}
                return f"session {i}, event {j} ({x.get('statement')!r}): {fields}"
        if len(a) != len(b):
            return f"session {i}: {len(a)} events with the fast path off, {len(b)} on"
    return f"{len(off)} sessions with the fast path off, {len(on)} on"


class Differential:
    """Runs a workload with the fast path off, then on, and compares the two runs."""

    def __init__(self, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, spy: _Spy) -> None:
        self._make_proxy = make_proxy
        self._monkeypatch = monkeypatch
        self._spy = spy

    def run(self, workload: Workload, *, enabled: bool, **overrides: Any) -> Run:
        # read by each new session (fastpath.new_fast_path), so it holds for this run's sessions
        self._monkeypatch.setattr(fastpath, "ENABLED", enabled)
        counts = dataclasses.replace(self._spy)
        proxy = self._make_proxy(**overrides)
        ended = _watch_sessions(proxy, self._monkeypatch)
        got = workload(proxy)
        ended()
        groups: dict[str, list[dict[str, Any]]] = {}
        for ev in proxy.sink.statements:
            groups.setdefault(ev.session_id, []).append(_comparable(ev))
        statements = [
            int(e.details["statements"]) for e in proxy.sink.sessions if e.type == "session_end"
        ]
        spy = self._spy
        used = _Spy(
            spy.queued - counts.queued,
            spy.done - counts.done,
            spy.with_fast - counts.with_fast,
            spy.without_fast - counts.without_fast,
        )
        # concurrent sessions may start in any order: compare them in a canonical one
        return Run(got, sorted(groups.values(), key=repr), sorted(statements), used)

    def compare(
        self,
        workload: Workload,
        *,
        min_queued: int = 1,
        min_done: int = 1,
        **overrides: Any,
    ) -> tuple[Run, Run]:
        """(off, on), once they were found the same; `min_*`: how much the ON run must have
        used the fast path (see _Spy)."""
        off = self.run(workload, enabled=False, **overrides)
        on = self.run(workload, enabled=True, **overrides)
        assert off.spy == _Spy(0, 0, 0, off.spy.without_fast), "the OFF run used the fast path"
        assert off.spy.without_fast > 0
        assert on.spy.without_fast == 0
        assert on.spy.with_fast > 0
        assert on.spy.queued >= min_queued, f"the fast path was hardly used: {on.spy}"
        assert on.spy.done >= min_done, f"the fast path was hardly used: {on.spy}"
        assert on.got == off.got
        assert on.events == off.events, _first_difference(off.events, on.events)
        assert on.statements == off.statements
        return off, on


@pytest.fixture
def differ(make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, spy: _Spy) -> Differential:
    return Differential(make_proxy, monkeypatch, spy)


# ---------------------------------------------------------------------------- client helpers
def _error(e: psycopg.Error) -> tuple[str, str | None, str | None, str]:
    return (type(e).__name__, e.sqlstate, e.diag.message_primary, str(e).partition("\n")[0])


def _execute(
    conn: Conn, query: str, params: Sequence[object] = (), *, binary: bool = False
) -> object:
    """One prepared execution (server-side, named): its status and rows, or its error."""
    try:
        cur = conn.execute(query, params, prepare=True, binary=binary)
    except psycopg.Error as e:
        return _error(e)
    rows = cur.fetchall() if cur.description is not None else None
    return (cur.statusmessage, cur.rowcount, rows)


def _notices(conn: Conn) -> list[tuple[str | None, str | None]]:
    got: list[tuple[str | None, str | None]] = []
    conn.add_notice_handler(lambda d: got.append((d.severity, d.message_primary)))
    return got


def _result(res: pq.abc.PGresult) -> object:
    """A libpq result as the client sees it."""
    status = pq.ExecStatus(res.status)
    if status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.NONFATAL_ERROR):
        return (
            status.name,
            res.error_field(pq.DiagnosticField.SQLSTATE),
            res.error_field(pq.DiagnosticField.MESSAGE_PRIMARY),
        )
    rows = [tuple(res.get_value(r, c) for c in range(res.nfields)) for r in range(res.ntuples)]
    return (status.name, res.command_status, rows)


@dataclasses.dataclass
class Libpq:
    """A bare libpq connection (psycopg.pq): statement names and messages under our control.
    Only its asynchronous calls: psycopg's binary pq keeps the GIL in libpq's blocking ones
    (PQconnectdb, PQexec...), which would stop the proxy's thread in this process."""

    pg: pq.abc.PGconn
    notices: list[tuple[str | None, str | None]]

    def _answer(self) -> object:
        pg = self.pg
        while pg.flush():
            select.select([], [pg.socket], [], 10)
        results: list[object] = []
        while True:
            while pg.is_busy():
                ready, _, _ = select.select([pg.socket], [], [], 10)
                assert ready, "no answer"
                pg.consume_input()
            res = pg.get_result()
            if res is None:
                return results[0] if len(results) == 1 else results
            results.append(_result(res))

    def prepare(self, name: bytes, sql: bytes) -> object:  # Parse, Sync
        self.pg.send_prepare(name, sql)
        return self._answer()

    def run(self, name: bytes, *params: bytes | None) -> object:  # Bind, Describe, Execute, Sync
        self.pg.send_query_prepared(name, params)
        return self._answer()

    def query(self, sql: bytes) -> object:  # the simple protocol
        self.pg.send_query(sql)
        return self._answer()

    def close(self, name: bytes) -> object:  # Close statement, Sync
        self.pg.send_close_prepared(name)
        return self._answer()


@contextlib.contextmanager
def _libpq(proxy: RunningProxy) -> Iterator[Libpq]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:  # its pgconn is nonblocking
        yield Libpq(conn.pgconn, _notices(conn))


# ---------------------------------------------------------------------------- psycopg
def test_psycopg_text_parameters(differ: Differential) -> None:
    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for i in range(30):
                # text parameters (%t), a NULL among them, and text that is not ASCII
                label = None if i % 4 == 3 else f"ünïcode ✓ {i}"
                got.append(
                    _execute(
                        conn, "SELECT %t::int * 2, %t::text, %t::text IS NULL", (i, label, label)
                    )
                )
        # another client encoding: parameters that are not UTF-8 (both paths decode them so)
        dsn = proxy.dsn(client_encoding="LATIN1")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for word in ("café", "naïve", "plain"):
                got.append(_execute(conn, "SELECT 'é' || %t::text", (word,)))
        return got

    _, on = differ.compare(workload, min_queued=28, min_done=28)
    latin1 = [e for group in on.events for e in group if e["statement"] == "SELECT 'é' || $1::text"]
    assert [e["parameters"] for e in latin1] == [["caf\ufffd"], ["na\ufffdve"], ["plain"]]


def test_psycopg_binary_parameters(differ: Differential) -> None:
    """Binary parameters: the event renders them from the Bind body and the Parse types."""
    query = (
        "SELECT %b::int8 + 1, %b::text, %b::bytea, %b::float8, %b::bool, %b::date, %b::uuid,"
        " %b::numeric, %b::timestamptz, %b::int4"
    )

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for i in range(20):
                params = (
                    10**12 + i,
                    f"t{i}",
                    bytes([i, 0, 255]),
                    i / 8,
                    i % 2 == 0,
                    datetime.date(2024, 1, 1 + i),
                    uuid.UUID(int=i),
                    "12.50",  # text in a binary slot: psycopg sends it as text (format 0)
                    datetime.datetime(2024, 5, 6, 7, 8, i, tzinfo=datetime.UTC),
                    None,
                )
                got.append(_execute(conn, query, params, binary=i % 2 == 1))
        return got

    differ.compare(workload, min_queued=15, min_done=15)


def test_psycopg_failing_executions(differ: Differential) -> None:
    """Errors at Execute (1/0), at Bind (bad input) and after some rows were sent, with
    executions that work in between and after."""

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for value in ["5", "0", "2", "0", "abc", "1", "0", "4", "x", "10"]:
                got.append(_execute(conn, "SELECT 100 / %t::int", (value,)))
            for value in ["0", "3", "9", "5"]:  # rows 1 to 5; 3 and 5 fail after 2 and 4 rows
                got.append(
                    _execute(
                        conn, "SELECT 10 / (g - %t::int) FROM generate_series(1, 5) g", (value,)
                    )
                )
        return got

    _, on = differ.compare(workload, min_queued=12, min_done=6)
    outcome = [
        (e["parameters"], e["rows"], e["command_tag"], e["error"] and e["error"]["sqlstate"])
        for e in on.events[0]
    ]
    assert outcome == [
        (["5"], 1, "SELECT 1", None),
        (["0"], 0, None, "22012"),
        (["2"], 1, "SELECT 1", None),
        (["0"], 0, None, "22012"),
        (["abc"], 0, None, "22P02"),  # at Bind
        (["1"], 1, "SELECT 1", None),
        (["0"], 0, None, "22012"),
        (["4"], 1, "SELECT 1", None),
        (["x"], 0, None, "22P02"),
        (["10"], 1, "SELECT 1", None),
        (["0"], 5, "SELECT 5", None),
        (["3"], 2, None, "22012"),  # the rows sent before the error count
        (["9"], 5, "SELECT 5", None),
        (["5"], 4, None, "22012"),
    ]


def test_psycopg_pipeline(differ: Differential) -> None:
    """Pipelined executions of two prepared statements, with statements the fast path does not
    take (not prepared) among them, and one failing in the middle of a pipeline: the server
    skips the rest up to the Sync, and so do the events."""
    div = "SELECT 100 / %t::int, %t::text"
    rows = "SELECT g FROM generate_series(1, %t::int) g"

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            got.append(_execute(conn, div, ("1", "prepare")))  # prepared outside the pipeline
            got.append(_execute(conn, rows, ("1",)))
            for values in (["1", "2", "4", "5"], ["1", "2", "0", "4", "5"], ["7", "8"]):
                curs: list[psycopg.Cursor[tuple[Any, ...]]] = []
                try:
                    with conn.pipeline():
                        for v in values:
                            curs.append(conn.execute(div, (v, f"p{v}"), prepare=True))
                            curs.append(conn.execute(rows, (v,), prepare=True))
                            if v == "2":  # the extended protocol with Parse: the Python path
                                curs.append(conn.execute("SELECT %t::int + 1", (v,), prepare=False))
                except psycopg.Error as e:
                    got.append(_error(e))
                for cur in curs:
                    try:
                        got.append(cur.fetchall())
                    except psycopg.Error as e:
                        got.append(_error(e))
            got.append(_execute(conn, div, ("50", "after")))
        return got

    _, on = differ.compare(workload, min_queued=5, min_done=5)
    outcome = [(e["parameters"], e["error"] and e["error"]["sqlstate"]) for e in on.events[0]]
    first = [(["1", "p1"], None), (["1"], None)]
    assert outcome == [
        (["1", "prepare"], None),
        (["1"], None),
        *first,
        (["2", "p2"], None),
        (["2"], None),
        (["2"], None),
        (["4", "p4"], None),
        (["4"], None),
        (["5", "p5"], None),
        (["5"], None),
        *first,
        (["2", "p2"], None),
        (["2"], None),
        (["2"], None),
        (["0", "p0"], "22012"),  # and nothing for the four executions the server skipped
        (["7", "p7"], None),
        (["7"], None),
        (["8", "p8"], None),
        (["8"], None),
        (["50", "after"], None),
    ]


def test_transaction_blocks(differ: Differential) -> None:
    """BEGIN, prepared INSERT/UPDATE/DELETE/SELECT, COMMIT; then a block that fails and is
    rolled back: rows and command tags of the writes, and the aborted block's errors."""

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn()) as conn:
            conn.execute("CREATE TEMP TABLE fp_items (id int PRIMARY KEY, v text)")
            conn.commit()
            for i in range(6):
                got.append(_execute(conn, "INSERT INTO fp_items VALUES (%t, %t)", (i, f"v{i}")))
            got.append(_execute(conn, "UPDATE fp_items SET v = v || '!' WHERE id < %t", (4,)))
            got.append(_execute(conn, "DELETE FROM fp_items WHERE id = %t RETURNING v", (5,)))
            got.append(
                _execute(conn, "SELECT id, v FROM fp_items WHERE id >= %t ORDER BY id", (0,))
            )
            conn.commit()
            got.append(_execute(conn, "INSERT INTO fp_items VALUES (%t, %t)", (10, "ten")))
            got.append(_execute(conn, "INSERT INTO fp_items VALUES (%t, %t)", (1, "dup")))  # 23505
            got.append(
                _execute(conn, "SELECT id, v FROM fp_items WHERE id >= %t ORDER BY id", (0,))
            )
            got.append(conn.info.transaction_status.name)
            conn.rollback()
            got.append(
                _execute(conn, "SELECT id, v FROM fp_items WHERE id >= %t ORDER BY id", (0,))
            )
            got.append(_execute(conn, "UPDATE fp_items SET v = v WHERE id < %t", (100,)))
            conn.rollback()
        return got

    _, on = differ.compare(workload, min_queued=8, min_done=8)
    prepared = [e for e in on.events[0] if e["protocol"] == "extended"]
    assert [
        (e["command_tag"], e["rows"], e["error"] and e["error"]["sqlstate"]) for e in prepared
    ] == [
        *[("INSERT 0 1", 1, None)] * 6,
        ("UPDATE 4", 4, None),
        ("DELETE 1", 1, None),
        ("SELECT 5", 5, None),
        ("INSERT 0 1", 1, None),
        (None, 0, "23505"),
        (None, 0, "25P02"),  # the block is aborted
        ("SELECT 5", 5, None),
        ("UPDATE 5", 5, None),
    ]


def test_notices_notifications_and_parameter_status(differ: Differential) -> None:
    """What the server sends besides the answer, in the middle of a prepared statement's
    answer: a NOTICE (RAISE NOTICE), a notification to the session itself (pg_notify, sent
    before ReadyForQuery) and a ParameterStatus (set_config of a reported setting)."""
    noisy = "SELECT g, pg_temp.fp_noisy(g) FROM generate_series(1, %t::int) g"
    noisy_sql = noisy.replace("%t", "$1")

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            notices = _notices(conn)
            notifies: list[tuple[str, str]] = []
            conn.add_notify_handler(lambda n: notifies.append((n.channel, n.payload)))
            conn.execute(  # a NOTICE for every even row, between the rows
                "CREATE FUNCTION pg_temp.fp_noisy(n int) RETURNS int LANGUAGE plpgsql AS"
                " $$BEGIN IF n % 2 = 0 THEN RAISE NOTICE 'noisy %', n; END IF; RETURN n; END$$"
            )
            conn.execute("LISTEN fp_channel")
            for i in range(1, 6):
                got.append(_execute(conn, noisy, (i,)))
                got.append(_execute(conn, "SELECT %t::int + 1", (i,)))  # quiet, in between
                got.append(_execute(conn, "SELECT pg_notify('fp_channel', %t)", (f"n{i}",)))
            for name in ("fp-a", "fp-b", "fp-c"):
                got.append(
                    _execute(conn, "SELECT set_config('application_name', %t, false)", (name,))
                )
                got.append(conn.info.parameter_status("application_name"))
                got.append(_execute(conn, "SELECT %t::int + 1", (7,)))
            got.extend((notices, notifies))
        return got

    off, on = differ.compare(workload, min_queued=15, min_done=5)
    assert off.got[-2:] == [
        [("NOTICE", f"noisy {g}") for n in range(1, 6) for g in range(2, n + 1, 2)],
        [("fp_channel", f"n{i}") for i in range(1, 6)],
    ]
    rows = [(e["rows"], e["command_tag"]) for e in on.events[0] if e["statement"] == noisy_sql]
    assert rows == [(n, f"SELECT {n}") for n in range(1, 6)]


def test_a_setting_that_fools_the_parser_ends_the_session(differ: Differential) -> None:
    """standard_conforming_strings turned off inside a function (nothing in the statement says
    so, so the fast path takes it): its ParameterStatus ends the session on both paths."""

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            notices = _notices(conn)  # libpq hands an error that comes while idle to these
            conn.execute(
                "CREATE FUNCTION pg_temp.fp_sneaky(v text) RETURNS int LANGUAGE plpgsql AS"
                " $$BEGIN PERFORM set_config('standard_conforming_strings', v, false);"
                " RETURN 1; END$$"
            )
            for value in ("on", "on", "off"):
                got.append(_execute(conn, "SELECT pg_temp.fp_sneaky(%t)", (value,)))
            got.append(_execute(conn, "SELECT %t::int", (1,)))
            got.extend((conn.closed, notices))
        return got

    off, on = differ.compare(workload, min_queued=3, min_done=2)
    assert off.got[-3][0] == "OperationalError"
    assert off.got[-2] is True
    (severity, message) = off.got[-1][0]
    assert severity == "FATAL"
    assert "cannot read SQL the way the database does" in message
    assert [e["parameters"] for e in on.events[0][-3:]] == [["on"], ["on"], ["off"]]


def test_large_result(differ: Differential) -> None:
    """An answer of ~23 MB spans many reads: the C walk stops at the first message cut by the
    end of a read and the Python path carries on; rows and bytes must add up the same. Also
    pipelined, between small answers."""
    query = "SELECT g, repeat('x', 100) FROM generate_series(1, %t::int) g"

    def digest(cur: psycopg.Cursor[tuple[Any, ...]]) -> object:
        h = hashlib.sha256()
        count = 0
        for row in cur:
            h.update(repr(row).encode())
            count += 1
        return (cur.statusmessage, count, h.hexdigest())

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for n in (3, 200_000, 5, 200_000, 7):
                got.append(digest(conn.execute(query, (n,), prepare=True)))
            with conn.pipeline():
                curs = [conn.execute(query, (n,), prepare=True) for n in (2, 200_000, 4, 6)]
            got.extend(digest(cur) for cur in curs)
        return got

    _, on = differ.compare(workload, min_queued=6, min_done=3)
    big = [e for e in on.events[0] if e["rows"] == 200_000]
    assert len(big) == 3
    assert big[0]["bytes"] == big[1]["bytes"] == big[2]["bytes"] > 200_000 * 100


# ---------------------------------------------------------------------------- asyncpg
def _records(rows: list[asyncpg.Record]) -> list[tuple[object, ...]]:
    return [tuple(r) for r in rows]


def test_asyncpg_prepared(differ: Differential) -> None:
    """asyncpg: named statements, binary parameters and results, Bind/Execute/Sync without a
    Describe; its statement cache; unnamed statements (cache off); a cursor (row limits)."""
    query = "SELECT g, md5(g::text), $2::text FROM generate_series(1, $1::int) g"

    async def main(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        conn = await asyncpg.connect(proxy.url())
        try:
            stmt = await conn.prepare(query)
            for n in range(1, 16):
                got.append(_records(await stmt.fetch(n, f"n{n}")))
            for i in range(5):  # the statement cache: named statements too
                got.append(_records(await conn.fetch("SELECT $1::int8 * 3", i)))
            for i in range(2):  # fetchval: Execute with a row limit (the Python path)
                got.append(await conn.fetchval("SELECT $1::int8 * 3", i))
            for value in (0, 1, 0, 2):
                try:
                    got.append(_records(await conn.fetch("SELECT 1 / $1::int", value)))
                except asyncpg.PostgresError as e:
                    got.append((type(e).__name__, e.sqlstate))
            async with conn.transaction():  # a cursor: a named portal, a row limit
                cur = await stmt.cursor(50, "c")
                got.append(_records(await cur.fetch(20)))
        finally:
            await conn.close()
        unnamed = await asyncpg.connect(proxy.url(), statement_cache_size=0)
        try:
            for i in range(5):  # unnamed: asyncpg sends Parse again with each Bind (Python path)
                got.append(_records(await unnamed.fetch("SELECT $1::text || '?'", f"u{i}")))
        finally:
            await unnamed.close()
        return got

    def workload(proxy: RunningProxy) -> list[Any]:
        return asyncio.run(main(proxy))

    _, on = differ.compare(workload, min_queued=20, min_done=20)
    suspended = [e for group in on.events for e in group if e["suspended"]]
    assert len(suspended) == 3  # the two fetchval and the cursor's fetch


# ---------------------------------------------------------------------------- statement names
def test_deallocate_and_prepare_again(differ: Differential) -> None:
    """One name for one statement, then another: the events always name the one that ran.
    SQL PREPARE/EXECUTE/DEALLOCATE (simple protocol), and protocol-level Parse, Close and
    executions of the same names (libpq)."""

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            for sql in (
                "PREPARE fp_s (int) AS SELECT $1 + 1",
                "EXECUTE fp_s(1)",
                "PREPARE fp_s (text) AS SELECT upper($1)",  # 42P05: the first one stays
                "EXECUTE fp_s(2)",
                "DEALLOCATE fp_s",
                "PREPARE fp_s (text) AS SELECT upper($1)",
                "EXECUTE fp_s('abc')",
                "DEALLOCATE fp_s",
                "EXECUTE fp_s('abc')",  # 26000
            ):
                try:
                    got.append(conn.execute(sql).fetchall() if "EXECUTE" in sql else sql)
                except psycopg.Error as e:
                    got.append(_error(e))
        with _libpq(proxy) as pg:
            got.append(pg.prepare(b"fp_p", b"SELECT $1::int * 10"))
            got.extend(pg.run(b"fp_p", str(i).encode()) for i in range(3))
            got.append(pg.query(b"DEALLOCATE fp_p"))
            got.append(pg.run(b"fp_p", b"3"))  # 26000
            got.append(pg.prepare(b"fp_p", b"SELECT $1::text || '!'"))
            got.extend(pg.run(b"fp_p", str(i).encode()) for i in range(3))
            got.append(pg.prepare(b"fp_p", b"SELECT 0"))  # 42P05: the second one stays
            got.append(pg.run(b"fp_p", b"still"))
            got.append(pg.close(b"fp_p"))
            got.append(pg.run(b"fp_p", b"closed"))  # 26000
            got.append(pg.prepare(b"fp_p", b"SELECT $1::int - 1"))
            got.extend(pg.run(b"fp_p", str(i).encode()) for i in range(3))
            got.append(pg.query(b"PREPARE fp_q AS SELECT $1::int + 100"))  # SQL, run by Bind
            got.append(pg.run(b"fp_q", b"1"))
            got.append(pg.query(b"DEALLOCATE ALL"))
            got.append(pg.run(b"fp_p", b"gone"))  # 26000
            got.append(pg.prepare(b"fp_p", b"SELECT $1::int * 1000"))
            got.append(pg.run(b"fp_p", b"5"))
        return got

    _, on = differ.compare(workload, min_queued=10, min_done=10)
    # the protocol-level executions, by the statement each event names
    libpq = next(g for g in on.events if any(e["statement"] == "SELECT $1::int * 10" for e in g))
    ran = [
        (e["statement"], e["parameters"], e["error"] and e["error"]["sqlstate"])
        for e in libpq
        if e["protocol"] == "extended"
    ]
    assert ran == [
        ("SELECT $1::int * 10", ["0"], None),
        ("SELECT $1::int * 10", ["1"], None),
        ("SELECT $1::int * 10", ["2"], None),
        ("", ["3"], "26000"),
        ("SELECT $1::text || '!'", ["0"], None),
        ("SELECT $1::text || '!'", ["1"], None),
        ("SELECT $1::text || '!'", ["2"], None),
        ("SELECT $1::text || '!'", ["still"], None),
        ("", ["closed"], "26000"),
        ("SELECT $1::int - 1", ["0"], None),
        ("SELECT $1::int - 1", ["1"], None),
        ("SELECT $1::int - 1", ["2"], None),
        ("PREPARE fp_q AS SELECT $1::int + 100", ["1"], None),
        ("", ["gone"], "26000"),
        ("SELECT $1::int * 1000", ["5"], None),
    ]


def test_unusual_answers_and_statements(differ: Differential) -> None:
    """Answers the fast path does not expect or rarely sees (no rows, an empty statement,
    NULLs), transaction control as prepared statements, and statements the server dropped
    while the proxy still knows them (the unnamed one, by a simple Query; all, by DISCARD)."""

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with _libpq(proxy) as pg:
            got.append(pg.query(b"CREATE TEMP TABLE fp_odd (x int)"))
            for name, sql in (
                (b"fp_none", b"SELECT x FROM fp_odd WHERE x > $1::int"),
                (b"fp_null", b"SELECT NULL::text, $1::text, NULLIF($1::int, 1)"),
                (b"fp_empty", b""),
                (b"fp_begin", b"BEGIN"),
                (b"fp_ins", b"INSERT INTO fp_odd VALUES ($1::int)"),
                (b"fp_commit", b"COMMIT"),
                (b"fp_rollback", b"ROLLBACK"),
                (b"", b"SELECT $1::int * 7"),  # the unnamed statement
            ):
                got.append(pg.prepare(name, sql))
            for i in range(3):
                got.append(pg.run(b"fp_none", str(i).encode()))
                got.append(pg.run(b"fp_null", str(i).encode()))
                got.append(pg.run(b"fp_null", None))
                got.append(pg.run(b"fp_empty"))
                got.append(pg.run(b"fp_begin"))
                got.append(pg.run(b"fp_ins", str(i).encode()))
                got.append(pg.run(b"fp_commit" if i % 2 else b"fp_rollback"))
                got.append(pg.run(b"fp_commit"))  # outside a block: a WARNING, COMMIT
                got.append(pg.run(b"", str(i).encode()))
            got.append(pg.query(b"SELECT count(*) FROM fp_odd"))
            got.append(pg.query(b"SELECT 1"))  # drops the unnamed statement on the server
            got.append(pg.run(b"", b"9"))  # 26000
            got.append(pg.query(b"DISCARD ALL"))
            got.append(pg.run(b"fp_none", b"0"))  # 26000
            got.append(pg.notices)
        return got

    off, on = differ.compare(workload, min_queued=20, min_done=20)
    assert off.got[-1] == [("WARNING", "there is no transaction in progress")] * 3
    tags = [e["command_tag"] for e in on.events[0] if e["protocol"] == "extended"]
    assert tags[:9] == [
        "SELECT 0",
        "SELECT 1",
        "SELECT 1",
        None,  # EmptyQueryResponse
        "BEGIN",
        "INSERT 0 1",
        "ROLLBACK",
        "COMMIT",
        "SELECT 1",
    ]


# ---------------------------------------------------------------------------- raw protocol
def _parse_msg(name: bytes, sql: bytes, types: Sequence[int] = ()) -> bytes:
    body = name + b"\0" + sql + b"\0" + struct.pack(f"!h{len(types)}I", len(types), *types)
    return m.frame(b"P", body)


def _bind_msg(
    statement: bytes,
    params: Sequence[bytes | None],
    formats: Sequence[int] = (),
    portal: bytes = b"",
) -> bytes:
    body = portal + b"\0" + statement + b"\0"
    body += struct.pack(f"!h{len(formats)}h", len(formats), *formats)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return m.frame(b"B", body + struct.pack("!h", 0))  # results in text


def _execute_msg(portal: bytes = b"", limit: int = 0) -> bytes:
    return m.frame(b"E", portal + b"\0" + struct.pack("!i", limit))


_DESCRIBE = m.frame(b"D", b"P\0")
_EXECUTE = _execute_msg()
_SYNC = m.sync()
_FLUSH = m.frame(b"H")


def _query_msg(sql: bytes) -> bytes:
    return m.frame(b"Q", sql + b"\0")


def test_raw_protocol_sequences(differ: Differential) -> None:
    """What drivers seldom send: several executions in one read, with and without Describe;
    format codes one per parameter; binary values with and without types at Parse; a Sync
    alone; a Flush and the Sync later; the unnamed portal executed again in a block (without
    a Bind, so on the Python path, after a Bind on the fast path); row limits; a Bind with the
    wrong number of parameters; a message cut across two writes; a named portal; a Close in
    the same read as an execution."""

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        c = RawClient(proxy.port)
        try:
            assert c.startup(proxy.token())[-1][0] == b"Z"

            def exchange(data: bytes, until: bytes = b"Z") -> None:
                c.send(data)
                got.append(c.until(until))

            exchange(
                _parse_msg(b"s1", b"SELECT $1::int + 1", [23])
                + _parse_msg(b"s2", b"SELECT $1::text || coalesce($2::text, '-')")
                + _parse_msg(b"s3", b"SELECT generate_series(1, $1::int)")
                + _SYNC
            )
            one = struct.pack("!i", 1)
            # (a read ending in a Describe is refused: it is taken only before its Execute)
            c.send(_bind_msg(b"s1", [b"1"]) + _EXECUTE + _bind_msg(b"s1", [b"2"]) + _DESCRIBE)
            exchange(_EXECUTE + _SYNC)
            c.send(_bind_msg(b"s1", [b"3"]) + _EXECUTE + _bind_msg(b"s1", [b"4"]) + _EXECUTE)
            exchange(_SYNC)
            exchange(_bind_msg(b"s2", [b"a", b"b"], [0, 0]) + _DESCRIBE + _EXECUTE + _SYNC)
            exchange(_bind_msg(b"s2", [b"a", None], [0]) + _DESCRIBE + _EXECUTE + _SYNC)
            exchange(_bind_msg(b"s1", [one], [1]) + _DESCRIBE + _EXECUTE + _SYNC)  # int4 typed
            exchange(_bind_msg(b"s3", [one], [1]) + _DESCRIBE + _EXECUTE + _SYNC)  # untyped
            exchange(_SYNC)
            exchange(_bind_msg(b"s1", [b"5"]) + _DESCRIBE + _EXECUTE + _FLUSH, until=b"C")
            exchange(_SYNC)
            exchange(_query_msg(b"BEGIN"))
            exchange(_bind_msg(b"s3", [b"3"]) + _DESCRIBE + _EXECUTE + _SYNC)
            exchange(_EXECUTE + _SYNC)  # the same portal again: "SELECT 0"
            exchange(_bind_msg(b"s3", [b"3"]) + _execute_msg(limit=2) + _EXECUTE + _SYNC)
            exchange(_query_msg(b"COMMIT"))
            exchange(_bind_msg(b"s1", [b"1", b"2"]) + _EXECUTE + _SYNC)  # 08P01 at Bind
            data = _bind_msg(b"s1", [b"6"]) + _DESCRIBE + _EXECUTE + _SYNC
            c.send(data[:7])
            exchange(data[7:])
            exchange(_bind_msg(b"s1", [b"7"], portal=b"p") + _execute_msg(b"p") + _SYNC)
            close = m.frame(b"C", b"Ss1\0")
            exchange(_bind_msg(b"s1", [b"8"]) + _EXECUTE + close + _SYNC)
            exchange(_bind_msg(b"s1", [b"9"]) + _EXECUTE + _SYNC)  # 26000
            c.send(m.terminate())
        finally:
            c.close()
        return got

    _, on = differ.compare(workload, min_queued=8, min_done=8)
    outcome = [
        (e["statement"], e["parameters"], e["rows"], e["command_tag"], e["suspended"])
        for e in on.events[0]
    ]
    s1, s2, s3 = (
        "SELECT $1::int + 1",
        "SELECT $1::text || coalesce($2::text, '-')",
        "SELECT generate_series(1, $1::int)",
    )
    assert outcome == [
        (s1, ["1"], 1, "SELECT 1", False),
        (s1, ["2"], 1, "SELECT 1", False),
        (s1, ["3"], 1, "SELECT 1", False),
        (s1, ["4"], 1, "SELECT 1", False),
        (s2, ["a", "b"], 1, "SELECT 1", False),
        (s2, ["a", None], 1, "SELECT 1", False),
        (s1, ["1"], 1, "SELECT 1", False),
        (s3, ["\\x00000001"], 1, "SELECT 1", False),
        (s1, ["5"], 1, "SELECT 1", False),
        ("BEGIN", None, 0, "BEGIN", False),
        (s3, ["3"], 3, "SELECT 3", False),
        (s3, ["3"], 0, "SELECT 0", False),
        (s3, ["3"], 2, None, True),
        (s3, ["3"], 1, "SELECT 1", False),
        ("COMMIT", None, 0, "COMMIT", False),
        (s1, ["1", "2"], 0, None, False),
        (s1, ["6"], 1, "SELECT 1", False),
        (s1, ["7"], 1, "SELECT 1", False),
        (s1, ["8"], 1, "SELECT 1", False),
        ("", ["9"], 0, None, False),
    ]


# ---------------------------------------------------------------------------- policy reloads
def _policies(access: str, deny: Sequence[str] = ()) -> list[dict[str, Any]]:
    spec: dict[str, Any] = {"subjects": {"groups": ["ai-agents"]}, "access": access}
    if deny:
        spec["guardrails"] = {"deny": list(deny)}
    return [{"name": "agents", "spec": spec}]


def _reload(
    proxy: RunningProxy, db: Database, issuer: LocalIssuer, policies: list[dict[str, Any]]
) -> None:
    """What a changed config file does (ConfigWatcher.reload_now), on the proxy's loop; done
    when this returns: sessions see the new policy from their next client message."""
    config = ProxyConfig.model_validate(base_config(db.pg, db.password, issuer, policies=policies))

    async def apply() -> None:
        proxy.thread.server.apply_config(config)

    proxy.thread.call(apply())


@pytest.mark.parametrize(
    "denied",
    [_policies("read-only"), _policies("read-write", deny=["write"])],
    ids=["read-only", "deny-write"],
)
def test_reload_denies_a_prepared_statement(
    differ: Differential, db: Database, issuer: LocalIssuer, denied: list[dict[str, Any]]
) -> None:
    """A reload that denies an INSERT already prepared (and registered with the fast path):
    its next executions are refused the same way; a reload back lets it run again."""
    insert = "INSERT INTO fp_reload VALUES (%t)"
    select = "SELECT count(*) FROM fp_reload WHERE x >= %t"

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TEMP TABLE fp_reload (x int)")
            for i in range(3):
                got.append(_execute(conn, insert, (i,)))
                got.append(_execute(conn, select, (0,)))
            _reload(proxy, db, issuer, denied)
            for i in range(3):
                got.append(_execute(conn, insert, (10 + i,)))
                got.append(_execute(conn, select, (0,)))
            _reload(proxy, db, issuer, _policies("read-write"))
            got.append(_execute(conn, insert, (20,)))
            got.append(_execute(conn, select, (0,)))
        return got

    _, on = differ.compare(workload, min_queued=6, min_done=6)
    refused = [e for e in on.events[0] if e["decision"] == "refuse"]
    assert len(refused) == 3
    assert all(e["statement"] == "INSERT INTO fp_reload VALUES ($1)" for e in refused)
    assert all(e["error"] and e["error"]["sqlstate"] == "42501" for e in refused)


@pytest.fixture
def people(db: Database) -> Iterator[str]:
    """A table to mask (a real one: the proxy's catalog reads it from another connection)."""
    dsn = db.pg.dsn(user=APP_USER, password=db.password, dbname=APP_DB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "DROP TABLE IF EXISTS fp_people;"
            " CREATE TABLE fp_people (id int PRIMARY KEY, email text);"
            " INSERT INTO fp_people SELECT g, 'user' || g || '@example.org'"
            " FROM generate_series(1, 10) g"
        )
    yield "fp_people"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE fp_people")


@pytest.mark.parametrize(
    "changed",
    [
        {"guardrails": {"maxRows": 3}},
        {"masking": [{"columns": ["fp_people.email"], "strategy": "redact"}]},
    ],
    ids=["max-rows", "masking"],
)
def test_reload_changes_what_is_done_to_results(
    differ: Differential,
    db: Database,
    issuer: LocalIssuer,
    people: str,
    changed: dict[str, object],
) -> None:
    """A reload that makes the session cut rows (maxRows) or mask them, for a statement that
    was prepared (and on the fast path) before: the fast path must let go of it."""
    select = f"SELECT id, email FROM {people} WHERE id <= %t::int ORDER BY id"
    policies = _policies("read-write")
    spec = policies[0]["spec"]

    def workload(proxy: RunningProxy) -> list[Any]:
        got: list[object] = []
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            notices = _notices(conn)
            for n in (1, 5, 10):
                got.append(_execute(conn, select, (n,)))
            _reload(proxy, db, issuer, [{"name": "agents", "spec": {**spec, **changed}}])
            for n in (1, 5, 10):
                got.append(_execute(conn, select, (n,)))
            _reload(proxy, db, issuer, policies)
            for n in (1, 5):
                got.append(_execute(conn, select, (n,)))
            got.append(notices)
        return got

    # the first execution after each reload takes the Python path (the session takes the new
    # policy there), the others the fast path while the policy lets them
    _, on = differ.compare(workload, min_queued=4, min_done=4)
    rows = [(e["parameters"], e["rows"], e["command_tag"]) for e in on.events[0]]
    cut = "guardrails" in changed
    assert rows == [
        (["1"], 1, "SELECT 1"),
        (["5"], 5, "SELECT 5"),
        (["10"], 10, "SELECT 10"),
        (["1"], 1, "SELECT 1"),
        (["5"], 3 if cut else 5, "SELECT 3" if cut else "SELECT 5"),
        (["10"], 3 if cut else 10, "SELECT 3" if cut else "SELECT 10"),
        (["1"], 1, "SELECT 1"),
        (["5"], 5, "SELECT 5"),
    ]


def test_reload_that_adds_masking_masks_statements_prepared_before(
    make_proxy: MakeProxy, db: Database, issuer: LocalIssuer, people: str
) -> None:
    proxy = make_proxy()
    select = f"SELECT id, email FROM {people} WHERE id <= %t::int ORDER BY id"
    masked = _policies("read-write")
    masked[0]["spec"]["masking"] = [{"columns": [f"{people}.email"], "strategy": "redact"}]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        assert _execute(conn, select, (1,)) == ("SELECT 1", 1, [(1, "user1@example.org")])
        _reload(proxy, db, issuer, masked)
        assert _execute(conn, select, (1,)) == ("SELECT 1", 1, [(1, "[redacted]")])


# ---------------------------------------------------------------------------- pgbench
def _pgbench(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["pgbench", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _pgbench_tables(db: Database) -> None:
    """pgbench's tables at scale 1, made directly in the database unless they are there."""
    dsn = db.pg.dsn(user=APP_USER, password=db.password, dbname=APP_DB)
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('pgbench_accounts') IS NOT NULL").fetchone()
        if row is not None and row[0]:
            count = conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone()
            if count == (100_000,):
                return
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PGHOST": "127.0.0.1",
        "PGPORT": str(db.pg.port),
        "PGDATABASE": APP_DB,
        "PGUSER": APP_USER,
        "PGPASSWORD": db.password,
        "PGSSLMODE": "disable",
    }
    init = _pgbench(env, "-i", "-q", "-s", "1")
    assert init.returncode == 0, init.stderr


def test_pgbench_prepared_select_only(differ: Differential, db: Database) -> None:
    """pgbench -M prepared -S: libpq's Bind/Describe/Execute/Sync, two clients at once. Its
    random account ids are the same in both runs (a fixed seed), so everything is compared."""
    _pgbench_tables(db)

    def workload(proxy: RunningProxy) -> list[Any]:
        args = ["-n", "-M", "prepared", "-S", "-t", "200", "-c", "2", "--random-seed", "7"]
        run = _pgbench(proxy.libpq_env(), *args)
        assert run.returncode == 0, run.stderr
        return [line for line in run.stdout.splitlines() if "transactions" in line]

    _, on = differ.compare(workload, min_queued=300, min_done=300)
    selects = [e for group in on.events for e in group if e["command"] == "SELECT"]
    reads = [e for e in selects if str(e["statement"]).startswith("SELECT abalance")]
    assert len(reads) == 400
    assert all(e["rows"] == 1 and e["decision"] == "allow" for e in reads)
