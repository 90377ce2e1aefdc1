"""Access and guardrails in the data path: refusals are 42501, whole, and keep the state in step."""

from __future__ import annotations

import psycopg
import pytest

from tests.integration.conftest import MakeProxy, RunningProxy

POLICIES = [
    {
        "name": "agents-readonly",
        "spec": {
            "subjects": {"groups": ["ai-agents"]},
            "access": "read-only",
            "guardrails": {"denyFunctions": ["pg_sleep"]},
        },
    }
]


@pytest.fixture
def ro(make_proxy: MakeProxy) -> RunningProxy:
    return make_proxy(policies=POLICIES)


@pytest.fixture
def table(make_proxy: MakeProxy) -> None:
    rw = make_proxy()  # the base policy: read-write, nothing denied
    with psycopg.connect(rw.dsn(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS enforced")
        conn.execute("CREATE TABLE enforced (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO enforced VALUES (1, 'one')")


def count(proxy: RunningProxy) -> int:
    with psycopg.connect(proxy.dsn()) as conn:
        row = conn.execute("SELECT count(*) FROM enforced").fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.usefixtures("table")
def test_read_only_refuses_a_write_with_a_reason(ro: RunningProxy) -> None:
    with psycopg.connect(ro.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT v FROM enforced").fetchall() == [("one",)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute("DELETE FROM enforced WHERE id = 1")
        diag = e.value.diag
        assert diag.sqlstate == "42501"
        assert diag.message_primary is not None
        assert diag.message_primary.startswith("pgwarden: DELETE is refused")
        assert '"agents-readonly"' in diag.message_primary
        assert '"write"' in diag.message_primary
        assert diag.message_hint is not None
        assert "SELECT" in diag.message_hint
        # the session goes on
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert count(ro) == 1
    refused = [e for e in ro.sink.statements if e.decision == "refuse"]
    assert [(e.statement, e.classes, e.policy) for e in refused] == [
        ("DELETE FROM enforced WHERE id = 1", ("write",), "agents-readonly")
    ]
    start = next(s for s in ro.sink.sessions if s.type == "session_start")
    assert start.details["effective_policy"]["access"] == "read-only"
    assert start.details["effective_policy"]["denyFunctions"] == ["pg_sleep"]


@pytest.mark.usefixtures("table")
def test_a_multi_statement_query_is_refused_whole(ro: RunningProxy) -> None:
    with psycopg.connect(ro.dsn(), autocommit=True) as conn:
        cur = conn.cursor()
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            # no parameters: psycopg sends one simple Query holding three statements
            cur.execute("SELECT 1; INSERT INTO enforced VALUES (2, 'two'); SELECT 3")
    assert count(ro) == 1


@pytest.mark.usefixtures("table")
def test_a_refusal_inside_a_transaction_aborts_it_on_the_server_too(ro: RunningProxy) -> None:
    with psycopg.connect(ro.dsn()) as conn:
        conn.execute("SELECT 1")  # psycopg opened a transaction
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE enforced SET v = 'x' WHERE id = 1")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT v FROM enforced").fetchone() == ("one",)


def test_denied_functions_and_unknown_statements(ro: RunningProxy) -> None:
    with psycopg.connect(ro.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_sleep"):
            conn.execute("SELECT pg_sleep(0)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="cannot classify"):
            conn.execute("SELEKT 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="server-files"):
            conn.execute("SELECT pg_read_file('/etc/hostname')")
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_read_only_and_timeout_hold_upstream(make_proxy: MakeProxy) -> None:
    p = make_proxy(
        policies=[
            {
                "name": "ro-fast",
                "spec": {
                    "subjects": {"groups": ["ai-agents"]},
                    "access": "read-only",
                    "guardrails": {"statementTimeout": "300ms"},
                },
            }
        ]
    )
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        # the database itself holds the session read-only, whatever the classifier thinks
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("300ms",)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="fixes for this session"):
            conn.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("BEGIN READ WRITE")
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(2)")
        conn.execute("RESET search_path")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_max_rows_cuts_each_result_with_a_notice(make_proxy: MakeProxy) -> None:
    p = make_proxy(
        policies=[
            {
                "name": "capped",
                "spec": {
                    "subjects": {"groups": ["ai-agents"]},
                    "access": "read-only",
                    "guardrails": {"maxRows": 5},
                },
            },
            {
                "name": "generous",
                "spec": {"subjects": {"groups": ["ai-agents"]}, "guardrails": {"maxRows": 50}},
            },
        ]
    )
    notices: list[str] = []
    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        cur = conn.execute("SELECT g, repeat('x', g) FROM generate_series(1, 1000) g")
        assert [r[0] for r in cur.fetchall()] == [1, 2, 3, 4, 5]
        assert cur.rowcount == 5
        # extended protocol, several results in one pipeline, each capped on its own
        with conn.pipeline():
            c1 = conn.execute("SELECT generate_series(1, %s)", (7,))
            c2 = conn.execute("SELECT generate_series(1, %s)", (3,))
        assert len(c1.fetchall()) == 5
        assert len(c2.fetchall()) == 3
        assert conn.execute("SELECT 42").fetchone() == (42,)
    assert len(notices) == 2
    assert notices[0].startswith(
        'pgwarden: the result was cut at 5 rows (maxRows of policy "capped")'
    )
    assert "995 more rows" in notices[0]
    rows = [(e.statement[:30], e.rows) for e in p.sink.statements]
    assert ("SELECT g, repeat('x', g) FROM ", 5) in rows
