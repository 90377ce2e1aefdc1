"""Real drivers through the proxy: every part of the protocol relays faithfully."""

from __future__ import annotations

import asyncio
import hashlib
import io
import select
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest
from psycopg import pq

from pgwarden_proxy.wire import messages as m
from tests.integration.conftest import RunningProxy
from tests.integration.rawpg import RawClient, error_fields


def wait_for(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def test_simple_and_extended_queries_with_events(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(application_name="relay-test"), autocommit=True) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        cur = conn.execute("SELECT %s::int * 2, %s::text", (21, "x"))  # extended protocol
        assert cur.fetchone() == (42, "x")
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM nope")
        conn.execute("CREATE TEMP TABLE t (a int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 5)")
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (5,)
    wait_for(lambda: any(s.type == "session_end" for s in proxy.sink.sessions))
    evs = proxy.sink.statements
    by_text = {e.statement: e for e in evs}
    ext = by_text["SELECT $1::int * 2, $2::text"]
    assert ext.protocol == "extended"
    assert ext.parameters == ["21", "x"]
    assert ext.rows == 1
    assert ext.command_tag == "SELECT 1"
    assert ext.classes == ("read",)
    assert ext.fingerprint
    assert ext.identity == "agent@example.com"
    err = by_text["SELECT * FROM nope"]
    assert err.error
    assert err.error["sqlstate"] == "42P01"
    ins = by_text["INSERT INTO t SELECT generate_series(1, 5)"]
    assert ins.rows == 5
    assert "write" in ins.classes
    start = next(s for s in proxy.sink.sessions if s.type == "session_start")
    assert start.details["application_name"] == "relay-test"
    assert start.details["policies"] == ["agents"]


def test_multi_statement_simple_query_gives_one_event_each(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SELECT 1; SELECT 2, 3; SELECT generate_series(1, 4)")
    evs = [e for e in proxy.sink.statements if e.protocol == "simple"]
    assert [e.rows for e in evs[-3:]] == [1, 1, 4]
    assert [e.statement for e in evs[-3:]] == [
        "SELECT 1",
        "SELECT 2, 3",
        "SELECT generate_series(1, 4)",
    ]


def test_named_prepared_statements_and_pipeline_mode(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(5):  # prepare_threshold=0: psycopg uses named server-side statements
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        # psycopg raises a pipeline's first error when the pipeline ends (as it does direct)
        curs: list[psycopg.Cursor[tuple[int]]] = []

        def pipeline_with_error() -> None:
            with conn.pipeline():
                curs.extend(conn.execute("SELECT %s::int", (i,)) for i in range(50))
                conn.execute("SELECT 1/0")

        with pytest.raises(psycopg.errors.DivisionByZero):
            pipeline_with_error()
        assert [c.fetchone() for c in curs] == [(i,) for i in range(50)]
        with conn.pipeline():
            c1 = conn.execute("SELECT 10")
            c2 = conn.execute("SELECT 11")
        assert c1.fetchone() == (10,)
        assert c2.fetchone() == (11,)
    evs = [e for e in proxy.sink.statements if e.statement == "SELECT $1::int"]
    assert len(evs) == 50
    assert sorted(str((e.parameters or [""])[0]) for e in evs) == sorted(map(str, range(50)))
    div = [e for e in proxy.sink.statements if e.statement == "SELECT 1/0"]
    assert div
    assert div[0].error
    assert div[0].error["sqlstate"] == "22012"


def test_server_side_cursor_fetches_in_portions(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn()) as conn, conn.cursor(name="c") as cur:
        cur.itersize = 100
        cur.execute("SELECT g FROM generate_series(1, 1000) g")
        assert sum(r[0] for r in cur) == 500500


def test_asyncpg(proxy: RunningProxy) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(proxy.url())
        try:
            assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
            stmt = await conn.prepare("SELECT g, md5(g::text) FROM generate_series(1, $1) g")
            rows = await stmt.fetch(1000)
            assert len(rows) == 1000
            async with conn.transaction():
                cur = await conn.cursor("SELECT g FROM generate_series(1, 300) g")
                assert len(await cur.fetch(120)) == 120
            await conn.execute("CREATE TEMP TABLE c (a int, b text)")
            await conn.copy_records_to_table("c", records=[(i, str(i)) for i in range(2000)])
            assert await conn.fetchval("SELECT count(*) FROM c") == 2000
        finally:
            await conn.close()

    asyncio.run(main())


def test_psql_and_listen_notify(proxy: RunningProxy) -> None:
    out = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", "SELECT 'hello from psql'", "-c", "SHOW application_name"],
        env=proxy.libpq_env(PGAPPNAME="psql-test"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hello", "from", "psql", "psql-test"]

    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as listener,
        psycopg.connect(proxy.dsn(), autocommit=True) as sender,
    ):
        listener.execute("LISTEN jobs")
        sender.execute("NOTIFY jobs, 'payload-1'")
        sender.execute("SELECT pg_notify('jobs', 'payload-2')")
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == ["payload-1", "payload-2"]


def test_notices_and_parameter_status(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        notices: list[str] = []
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        conn.execute("DO $$BEGIN RAISE NOTICE 'careful: %', 42; END$$")
        assert notices == ["careful: 42"]
        conn.execute("SET TimeZone = 'Asia/Tokyo'")
        assert conn.info.parameter_status("TimeZone") == "Asia/Tokyo"


def test_large_rows_both_ways(proxy: RunningProxy) -> None:
    blob = bytes(range(256)) * (48 * 1024 * 4)  # 48 MiB
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE big (b bytea)")
        conn.execute("INSERT INTO big VALUES (%b)", (blob,))
        got = conn.execute("SELECT b FROM big", binary=True).fetchone()
        assert got is not None
        assert hashlib.sha256(got[0]).digest() == hashlib.sha256(blob).digest()
        text = conn.execute("SELECT repeat('x', 30 * 1024 * 1024)").fetchone()
        assert text is not None
        assert len(text[0]) == 30 * 1024 * 1024


def test_copy_in_and_out_100mb(proxy: RunningProxy) -> None:
    line = b"%d\t" + b"y" * 90 + b"\n"
    n = 1_100_000  # ~105 MB
    digest_in = hashlib.sha256()
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE bulk (id int, payload text)")
        with conn.cursor() as cur, cur.copy("COPY bulk FROM STDIN") as copy:
            batch = io.BytesIO()
            for i in range(n):
                row = line % i
                digest_in.update(row)
                batch.write(row)
                if batch.tell() > 1 << 20:
                    copy.write(batch.getvalue())
                    batch = io.BytesIO()
            copy.write(batch.getvalue())
        assert conn.execute("SELECT count(*) FROM bulk").fetchone() == (n,)
        digest_out = hashlib.sha256()
        size = 0
        with (
            conn.cursor() as cur,
            cur.copy("COPY (SELECT * FROM bulk ORDER BY id) TO STDOUT") as copy,
        ):
            for chunk in copy:
                digest_out.update(chunk)
                size += len(chunk)
        assert size > 100_000_000
        assert digest_out.hexdigest() == digest_in.hexdigest()
    copy_out = [e for e in proxy.sink.statements if e.statement.startswith("COPY (SELECT")]
    assert copy_out
    assert copy_out[0].command_tag == f"COPY {n}"
    assert copy_out[0].rows == n


def _copy_in(conn: psycopg.Connection, data: bytes, fail: bool = False) -> None:
    with conn.cursor() as cur, cur.copy("COPY cf FROM STDIN") as copy:
        copy.write(data)
        if fail:
            raise psycopg.errors.QueryCanceled("client aborts the copy")


def test_copy_fail_and_copy_error_keep_the_session_usable(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE cf (a int)")
        with pytest.raises(psycopg.errors.QueryCanceled):
            _copy_in(conn, b"1\n", fail=True)
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            _copy_in(conn, b"not-a-number\n")
        assert conn.execute("SELECT count(*) FROM cf").fetchone() == (0,)


def _copy_in_extended(pg: pq.abc.PGconn, sql: bytes, data: bytes | None) -> list[pq.abc.PGresult]:
    """COPY FROM STDIN sent as libpq's PQexecParams sends it: Parse, Bind, Describe, Execute,
    Sync; then the data, CopyDone (or CopyFail) and a second Sync, which is the one the server
    answers (it ignores a Sync during copy-in). Only libpq's asynchronous calls: a blocking one
    would hold the GIL, and with it the proxy's thread in this process."""

    def wait(read: bool) -> None:
        ready = select.select([pg.socket] if read else [], [] if read else [pg.socket], [], 10)
        assert ready[0] or ready[1], "no answer"

    def results() -> list[pq.abc.PGresult]:
        out: list[pq.abc.PGresult] = []
        while True:
            while pg.is_busy():
                wait(True)
                pg.consume_input()
            res = pg.get_result()
            if res is None or (out and res.status == pq.ExecStatus.COPY_IN):
                return out
            out.append(res)
            if res.status == pq.ExecStatus.COPY_IN:
                return out

    pg.send_query_params(sql, None)
    while pg.flush():
        wait(False)
    got = results()
    if got[-1].status != pq.ExecStatus.COPY_IN:
        return got
    if data is not None:
        pg.put_copy_data(data)
    pg.put_copy_end(None if data is not None else b"changed my mind")
    while pg.flush():
        wait(False)
    return results()


def test_copy_in_through_the_extended_protocol_keeps_the_session_in_step(
    proxy: RunningProxy,
) -> None:
    """After such a COPY, the next statements get their own answers and events."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE c (a int)")
        pg = conn.pgconn  # nonblocking
        (done,) = _copy_in_extended(pg, b"COPY c FROM STDIN", b"1\n2\n3\n")
        assert done.command_status == b"COPY 3"
        (failed,) = _copy_in_extended(pg, b"COPY c FROM STDIN", None)  # CopyFail
        assert failed.error_field(pq.DiagnosticField.SQLSTATE) == b"57014"
        (bad,) = _copy_in_extended(pg, b"COPY c FROM STDIN", b"x\n")  # an error mid-copy
        assert bad.error_field(pq.DiagnosticField.SQLSTATE) == b"22P02"
        (no_table,) = _copy_in_extended(pg, b"COPY nope FROM STDIN", b"1\n")  # never starts
        assert no_table.error_field(pq.DiagnosticField.SQLSTATE) == b"42P01"
        assert conn.execute("SELECT generate_series(1, 3)").fetchall() == [(1,), (2,), (3,)]
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        assert conn.execute("SELECT count(*) FROM c").fetchone() == (3,)
    wait_for(lambda: any(s.type == "session_end" for s in proxy.sink.sessions))
    evs = [
        (e.statement, e.rows, e.command_tag, e.error and e.error["sqlstate"])
        for e in proxy.sink.statements
    ]
    assert evs[1:] == [
        ("COPY c FROM STDIN", 3, "COPY 3", None),
        ("COPY c FROM STDIN", 0, None, "57014"),
        ("COPY c FROM STDIN", 0, None, "22P02"),
        ("COPY nope FROM STDIN", 0, None, "42P01"),
        ("SELECT generate_series(1, 3)", 3, "SELECT 3", None),
        ("SELECT 1 / 0", 0, None, "22012"),
        ("SELECT count(*) FROM c", 1, "SELECT 1", None),
    ]


def test_transactions_pass_through(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn()) as conn:
        conn.execute("CREATE TEMP TABLE tx (a int)")
        conn.commit()
        conn.execute("INSERT INTO tx VALUES (1)")
        conn.rollback()
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM tx").fetchone() == (0,)


def test_function_call_messages_are_refused(proxy: RunningProxy) -> None:
    c = RawClient(proxy.port)
    assert c.startup(proxy.token())[-1][0] == b"Z"
    # FunctionCall of pg_backend_pid (oid 2026) with no arguments, text result
    c.send(m.frame(b"F", (2026).to_bytes(4, "big") + b"\x00\x00" + b"\x00\x00" + b"\x00\x00"))
    (t, body), (z, status) = c.recv(), c.recv()
    assert t == b"E"
    assert z == b"Z"
    assert status == b"I"
    f = error_fields(body)
    assert f["C"] == "42501"
    assert "fast-path function calls" in f["M"]
    # inside a transaction block the server's transaction fails too, like the client's view
    c.send(m.frame(b"Q", b"BEGIN\x00"))
    assert c.until(b"Z")[-1][1] == b"T"
    c.send(m.frame(b"F", (2026).to_bytes(4, "big") + b"\x00\x00" * 3))
    assert c.until(b"Z")[-1][1] == b"E"
    c.send(m.frame(b"Q", b"SELECT 1\x00"))
    msgs = c.until(b"Z")
    assert error_fields(msgs[0][1])["C"] == "25P02"  # in failed transaction, as promised
    c.send(m.frame(b"Q", b"ROLLBACK\x00"))
    assert c.until(b"Z")[-1][1] == b"I"
    c.close()


def test_hundred_concurrent_sessions(proxy: RunningProxy) -> None:
    token = proxy.token()
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            with psycopg.connect(proxy.dsn(token), autocommit=True) as conn:
                for j in range(5):
                    r = conn.execute("SELECT %s::int, pg_backend_pid()", (i * 10 + j,)).fetchone()
                    assert r is not None
                    assert r[0] == i * 10 + j
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    wait_for(lambda: sum(s.type == "session_end" for s in proxy.sink.sessions) == 100, 10)


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(proxy: RunningProxy, mode: str) -> None:
    env = proxy.libpq_env()
    if mode == "simple":  # initialisation: DDL, COPY, VACUUM through the proxy
        init = subprocess.run(
            ["pgbench", "-i", "-q", "-s", "1"], env=env, capture_output=True, text=True, timeout=120
        )
        assert init.returncode == 0, init.stderr
    else:
        ready = subprocess.run(
            ["psql", "-X", "-A", "-t", "-c", "SELECT count(*) FROM pgbench_accounts"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if ready.stdout.strip() != "100000":
            assert subprocess.run(["pgbench", "-i", "-q", "-s", "1"], env=env).returncode == 0
    run = subprocess.run(
        ["pgbench", "-n", "-M", mode, "-c", "4", "-j", "2", "-t", "50"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "number of transactions actually processed: 200/200" in run.stdout
    assert "number of failed transactions: 0" in run.stdout


@pytest.mark.parametrize(
    "setting", ["SET standard_conforming_strings = off", "SET client_encoding = 'SJIS'"]
)
def test_settings_that_would_fool_the_parser_end_the_session(
    proxy: RunningProxy, setting: str
) -> None:
    c = RawClient(proxy.port)
    assert c.startup(proxy.token())[-1][0] == b"Z"
    c.send(m.frame(b"Q", m.cstr(setting)))
    answer = c.until(b"Z")  # the SET ran; the FATAL follows its answer
    assert [t for t, _ in answer][-3:] == [b"C", b"S", b"Z"]
    t, body = c.recv()
    fields = error_fields(body)
    assert (t, fields["S"], fields["C"]) == (b"E", "FATAL", "42501")
    assert "cannot read SQL the way the database does" in fields["M"]
    assert c.closed()
