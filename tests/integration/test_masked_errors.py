"""Masked values never leak through the server's errors and notices (masking/errors.py).

PostgreSQL quotes data in ErrorResponse and NoticeResponse fields: a failed cast quotes its
input, a constraint violation echoes the key or the whole failing row in DETAIL, a parse error
its input in CONTEXT, a trigger's RAISE NOTICE whatever it was given. Under masking the proxy
withholds those values from the client, the recording and the log, and keeps the SQLSTATE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from pgwarden.recording.store import FileStore
from pgwarden_proxy.masking.errors import NOTES, Scope, redact_report
from pgwarden_proxy.wire.framing import ProtocolViolation
from tests.integration.conftest import APP_DB, APP_USER, Database, MakeProxy, RunningProxy
from tests.integration.test_recording import complete, recording, session_ids, statements

EMAILS = ["alice@example.org", "bob@example.net"]
SSNS = ["123-45-6789", "234-56-7891"]
WITHHELD = "(pgwarden: value withheld: the statement reads masked columns)"


@pytest.fixture(scope="module")
def people(db: Database) -> Iterator[None]:
    dsn = f"host=127.0.0.1 port={db.pg.port} dbname={APP_DB} user={APP_USER} password={db.password}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """
            DROP SCHEMA IF EXISTS merr CASCADE;
            CREATE SCHEMA merr;
            CREATE TABLE merr.people (
                id int PRIMARY KEY, name text NOT NULL, email text UNIQUE,
                ssn varchar(11) UNIQUE, notes text
            );
            INSERT INTO merr.people VALUES
                (1, 'Alice', 'alice@example.org', '123-45-6789', 'prefers mail'),
                (2, 'Bob', 'bob@example.net', '234-56-7891', 'likes calls');
            CREATE TABLE merr.orders (
                id int PRIMARY KEY, ssn varchar(11) REFERENCES merr.people (ssn)
            );
            INSERT INTO merr.orders VALUES (1, '123-45-6789');
            CREATE TABLE merr.plain (id int, label text);
            INSERT INTO merr.plain VALUES (1, 'one');
            CREATE FUNCTION merr.tell() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN RAISE NOTICE 'changing the row of %', OLD.ssn; RETURN NEW; END $$;
            CREATE TRIGGER tell BEFORE UPDATE ON merr.people
                FOR EACH ROW EXECUTE FUNCTION merr.tell();
            """
        )
    yield
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA merr CASCADE")


def policy_proxy(make_proxy: MakeProxy, *rules: dict[str, Any], **overrides: Any) -> RunningProxy:
    spec = {"subjects": {"groups": ["ai-agents"]}, "access": "read-write", "masking": list(rules)}
    return make_proxy(policies=[{"name": "pii", "spec": spec}], **overrides)


COLUMN_RULES = (
    {"columns": ["merr.people.email"], "strategy": "redact"},
    {"columns": ["*.ssn"], "strategy": "partial"},
)


@pytest.fixture
def masked(make_proxy: MakeProxy, people: None) -> RunningProxy:
    return policy_proxy(make_proxy, *COLUMN_RULES)


def leaks(value: object) -> bool:
    text = str(value)
    return any(v in text for v in EMAILS + SSNS) or "alice" in text.lower()


def notice_log(conn: psycopg.Connection[Any]) -> list[tuple[str | None, ...]]:
    """The notices a connection gets (a Diagnostic is only valid inside the handler)."""
    notices: list[tuple[str | None, ...]] = []
    conn.add_notice_handler(
        lambda d: notices.append((d.severity, d.sqlstate, d.message_primary, d.context))
    )
    return notices


def every_field(e: psycopg.Error) -> str:
    d = e.diag
    fields = (
        d.message_primary,
        d.message_detail,
        d.message_hint,
        d.context,
        d.internal_query,
        d.severity,
    )
    return "\n".join([str(e), *(f or "" for f in fields)])


@pytest.mark.parametrize(
    ("sql", "sqlstate"),
    [
        ("SELECT ssn::int FROM merr.people", "22P02"),
        ("SELECT CAST(email AS inet) FROM merr.people", "22P02"),
        ("SELECT email::jsonb FROM merr.people", "22P02"),  # DETAIL and CONTEXT echo the input
        ("SELECT ssn::date FROM merr.people", None),  # 22007 or 22008 by DateStyle
        ("SELECT id FROM merr.people WHERE ssn::int > 0", "22P02"),  # a filter reads it too
        ("SELECT upper(email)::numeric FROM merr.people", "22P02"),
    ],
)
def test_cast_errors_on_masked_columns_withhold_the_value(
    masked: RunningProxy, sql: str, sqlstate: str | None
) -> None:
    with psycopg.connect(masked.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DataError) as simple:
            conn.execute(sql)  # simple protocol
        with pytest.raises(psycopg.errors.DataError) as extended:
            conn.execute(sql + " LIMIT %s", (5,))  # extended protocol
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the session goes on
    for e in (simple.value, extended.value):
        assert e.sqlstate is not None
        assert e.sqlstate.startswith("22"), e.sqlstate
        if sqlstate is not None:
            assert e.sqlstate == sqlstate
        assert e.diag.severity == "ERROR"
        assert not leaks(every_field(e)), every_field(e)
        assert (e.diag.message_primary or "").endswith(WITHHELD)
        assert "[redacted]" in every_field(e)


def test_the_cast_error_keeps_its_shape(masked: RunningProxy) -> None:
    with (
        psycopg.connect(masked.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InvalidTextRepresentation) as e,
    ):
        conn.execute("SELECT ssn::int FROM merr.people")
    assert e.value.diag.message_primary == (
        f'invalid input syntax for type integer: "[redacted]" {WITHHELD}'
    )


def test_asyncpg_sees_the_sqlstate_but_not_the_value(masked: RunningProxy) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(masked.url())
        try:
            with pytest.raises(asyncpg.exceptions.InvalidTextRepresentationError) as e:
                await conn.fetch("SELECT ssn::int FROM merr.people WHERE id = $1", 1)
            assert e.value.sqlstate == "22P02"
            assert not leaks(e.value.as_dict()), e.value.as_dict()
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    ("sql", "error", "detail"),
    [
        # the client supplied this value, but it is the masked column's stored value too
        (
            "INSERT INTO merr.people (id, name, email) VALUES (3, 'Eve', 'alice@example.org')",
            psycopg.errors.UniqueViolation,
            "Key (email)=([redacted]) already exists.",
        ),
        # a write that shows values it never supplied: the key still referenced ...
        (
            "DELETE FROM merr.people WHERE id = 1",
            psycopg.errors.ForeignKeyViolation,
            'Key (ssn)=([redacted]) is still referenced from table "orders".',
        ),
        # ... and the whole failing row
        (
            "UPDATE merr.people SET name = NULL WHERE id = 1",
            psycopg.errors.NotNullViolation,
            "Failing row contains ([redacted]).",
        ),
    ],
)
def test_constraint_violations_withhold_row_values(
    masked: RunningProxy, sql: str, error: type[psycopg.Error], detail: str
) -> None:
    with psycopg.connect(masked.dsn(), autocommit=True) as conn:
        notices = notice_log(conn)
        with pytest.raises(error) as e:
            conn.execute(sql)
    assert e.value.diag.message_detail == detail
    assert e.value.diag.table_name in ("people", "orders")
    assert e.value.diag.schema_name == "merr"
    assert not leaks(every_field(e.value).replace(sql, "")), every_field(e.value)
    assert bool(notices) == sql.startswith("UPDATE")  # the trigger's
    assert not leaks(notices), notices


def test_a_trigger_notice_echoing_a_masked_value_is_withheld(masked: RunningProxy) -> None:
    with psycopg.connect(masked.dsn(), autocommit=True) as conn:
        notices = notice_log(conn)
        conn.execute("UPDATE merr.people SET notes = notes WHERE id = 1")
    ((severity, sqlstate, message, context),) = notices
    assert (severity, sqlstate) == ("NOTICE", "00000")
    assert message == f"[redacted] {WITHHELD}"
    assert not leaks(context), context


def test_do_blocks_are_refused_under_masking(masked: RunningProxy, db: Database) -> None:
    # a DO block is an anonymous function: its code could read a masked column and hand the
    # value on (RAISE, an error, a write elsewhere), so like other non-built-in code it is refused
    with (
        psycopg.connect(masked.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="DO block") as e,
    ):
        conn.execute(
            "DO $$BEGIN INSERT INTO merr.plain SELECT 9, email FROM merr.people; "
            "RAISE NOTICE '%', (SELECT ssn FROM merr.people LIMIT 1); END$$"
        )
    assert 'masking of policy "pii"' in str(e.value)
    assert db.pg.sql("SELECT count(*) FROM merr.plain", dbname=APP_DB).strip() == "1"


def test_detectors_mask_personal_data_in_any_error(make_proxy: MakeProxy, people: None) -> None:
    proxy = policy_proxy(make_proxy, {"detectors": ["email", "us-ssn"], "strategy": "partial"})
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InvalidTextRepresentation) as e,
    ):
        conn.execute("SELECT 'bob@example.com'::int")
    assert e.value.diag.message_primary == (
        'invalid input syntax for type integer: "b***@example.com" (pgwarden: personal data masked)'
    )
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InvalidTextRepresentation) as e,
    ):
        conn.execute("SELECT 'no personal data'::int")
    assert (
        e.value.diag.message_primary == 'invalid input syntax for type integer: "no personal data"'
    )
    # and the same detectors run where column rules apply too
    proxy = policy_proxy(make_proxy, *COLUMN_RULES, {"detectors": ["email"], "strategy": "redact"})
    with (
        psycopg.connect(proxy.dsn(), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InvalidTextRepresentation) as e,
    ):
        conn.execute("SELECT label::int FROM merr.plain UNION ALL SELECT 'bob@example.com'::int")
    assert "bob@example.com" not in every_field(e.value)


def test_errors_pass_unchanged_when_nothing_is_masked(make_proxy: MakeProxy, people: None) -> None:
    proxy = make_proxy()  # the default policy: read-write, no masking
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as e:
            conn.execute("SELECT ssn::int FROM merr.people WHERE id = 1")
        assert (
            e.value.diag.message_primary == 'invalid input syntax for type integer: "123-45-6789"'
        )
        with pytest.raises(psycopg.errors.UniqueViolation) as u:
            conn.execute(
                "INSERT INTO merr.people (id, name, email) VALUES (3, 'E', %s)", (EMAILS[0],)
            )
        assert u.value.diag.message_detail == f"Key (email)=({EMAILS[0]}) already exists."
        notices = notice_log(conn)
        conn.execute("UPDATE merr.people SET notes = notes WHERE id = 1")
        assert [n[2] for n in notices] == [f"changing the row of {SSNS[0]}"]


def test_errors_that_carry_no_data_pass_unchanged_under_masking(masked: RunningProxy) -> None:
    with psycopg.connect(masked.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DatatypeMismatch) as e:
            conn.execute("SELECT id FROM merr.people WHERE name")  # reads a masked table
        assert e.value.diag.message_primary == (
            "argument of WHERE must be type boolean, not type text"
        )
        assert e.value.diag.statement_position == "34"
        with pytest.raises(psycopg.errors.DivisionByZero) as z:
            conn.execute("SELECT 1 / 0 FROM merr.people")
        assert z.value.diag.message_primary == "division by zero"
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as c:
            conn.execute("SELECT label::int FROM merr.plain")  # no masked column read
        assert c.value.diag.message_primary == (
            'invalid input syntax for type integer: "[redacted]" '
            "(pgwarden: value withheld: this session masks columns)"
        )


def test_recording_and_log_hold_no_masked_value(
    make_proxy: MakeProxy, people: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy = policy_proxy(make_proxy, *COLUMN_RULES, recording=recording(tmp_path))
    failing = [
        "SELECT ssn::int FROM merr.people",
        "SELECT email::jsonb FROM merr.people",
        "DELETE FROM merr.people WHERE id = 1",
        "UPDATE merr.people SET name = NULL WHERE id = 2",
    ]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for sql in failing:
            with pytest.raises(psycopg.Error):
                conn.execute(sql)
        conn.execute("UPDATE merr.people SET notes = notes WHERE id = 2")  # a notice
    proxy.thread.stop(grace=2)
    store = FileStore(tmp_path / "recordings")
    (sid,) = session_ids(proxy)
    by_text = {s["statement"]: s for s in statements(complete(store, sid)).values()}
    cast = by_text["SELECT ssn::int FROM merr.people"]["outcome"]["error"]
    assert cast == {
        "sqlstate": "22P02",
        "message": f'invalid input syntax for type integer: "[redacted]" {WITHHELD}',
    }
    for sql in failing:
        assert by_text[sql]["outcome"]["error"]["sqlstate"].startswith("2"), by_text[sql]
    everything = b"".join(
        p.read_bytes() for p in (tmp_path / "recordings").rglob("*") if p.is_file()
    )
    for value in EMAILS + SSNS:
        assert value.encode() not in everything, value
    # what the log sink writes (the events) and what was logged
    errors = [e.error for e in proxy.sink.statements if e.error is not None]
    assert len(errors) == len(failing)
    assert not leaks(errors), errors
    assert not leaks(caplog.text)


# ------------------------------------------------------------ the redaction itself (no I/O)
def report(**fields: str) -> bytes:
    return b"".join(k.encode() + v.encode() + b"\x00" for k, v in fields.items()) + b"\x00"


def fields_of(body: bytes | None) -> dict[str, str]:
    assert body is not None
    assert body.endswith(b"\x00\x00")
    return {chr(f[0]): f[1:].decode() for f in body[:-1].split(b"\x00") if f}


@pytest.mark.parametrize(
    ("detail", "expected"),
    [
        ("Key (email)=(a@b.org) already exists.", "Key (email)=([redacted]) already exists."),
        (
            "Key (lower(email))=(a) b)=(c) already exists.",
            "Key (lower(email))=([redacted]) already exists.",
        ),
        (
            'Key (a, b)=(1, x) is not present in table "t") is not present in table "u".',
            'Key (a, b)=([redacted]) is not present in table "u".',
        ),
        (
            "Key (r)=([1,2)) conflicts with existing key (r)=([1,3)).",
            "Key (r)=([redacted]) conflicts with existing key (r)=([redacted]).",
        ),
        ("Key (a)=(5) is duplicated.", "Key (a)=([redacted]) is duplicated."),
        (
            "Partition key of the failing row contains (a)=(5).",
            "Partition key of the failing row contains (a)=([redacted]).",
        ),
        ("Failing row contains (1, null, 123-45-6789).", "Failing row contains ([redacted])."),
        ("Key (a)=(x) something new", "Key (a)=([redacted])"),
    ],
)
def test_row_echoes_keep_column_names_only(detail: str, expected: str) -> None:
    for scope in Scope:
        body = redact_report(
            report(S="ERROR", C="23505", M="duplicate key", D=detail, n="c"), "utf-8", scope, None
        )
        got = fields_of(body)
        assert got["D"] == expected
        assert got["n"] == "c"
        # user code (OPAQUE) may raise any SQLSTATE: its message is not trusted either
        primary = "[redacted]" if scope is Scope.OPAQUE else "duplicate key"
        assert got["M"] == f"{primary} {NOTES[scope]}"


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ('invalid input syntax for type integer: "12"3"', 'integer: "[redacted]"'),
        ('value "99999999999" is out of range for type integer', 'value "[redacted]" is out'),
        ('invalid byte sequence for encoding "UTF8": 0xe9 0x41', '"[redacted]": [redacted]'),
        ("requested character too large for encoding: 123456", "encoding: [redacted]"),
        ("setseed parameter 12345 is out of allowed range", "parameter [redacted] is out"),
    ],
)
def test_data_exceptions_lose_their_values(message: str, expected: str) -> None:
    body = redact_report(report(S="ERROR", C="22P02", M=message), "utf-8", Scope.READS, None)
    got = fields_of(body)["M"]
    assert expected in got
    assert got.endswith(WITHHELD)
    for raw in ("12", "999", "0x", "123456", "12345", "3"):
        assert raw not in got.replace("UTF8", ""), got


def test_scopes_decide_what_is_withheld() -> None:
    notice = report(S="NOTICE", V="NOTICE", C="00000", M="ssn 123-45-6789", W="PL/pgSQL", P="3")
    assert redact_report(notice, "utf-8", Scope.SESSION, None) is None
    got = fields_of(redact_report(notice, "utf-8", Scope.READS, None))
    assert got == {
        "S": "NOTICE",
        "V": "NOTICE",
        "C": "00000",
        "M": f"[redacted] {WITHHELD}",
        "W": "[redacted]",
        "P": "3",
    }
    names = report(S="ERROR", C="42703", M='column "x" does not exist', H='Perhaps "c.email".')
    assert redact_report(names, "utf-8", Scope.READS, None) is None
    # code pgwarden cannot see chooses its SQLSTATE: no class is trusted
    assert fields_of(redact_report(names, "utf-8", Scope.OPAQUE, None))["H"] == "[redacted]"
    with pytest.raises(ProtocolViolation):
        redact_report(b"Mno terminator", "utf-8", Scope.READS, None)
