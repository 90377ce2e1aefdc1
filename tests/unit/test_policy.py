"""Policies combine as ARCHITECTURE.md says; refusals name the policy, the class, and a way out."""

from __future__ import annotations

from typing import Any

import pytest

from pgwarden.api.config import NamedPolicy
from pgwarden_proxy.policy import EffectivePolicy
from pgwarden_proxy.sql.classify import StatementInfo, analyze


def pol(name: str, **spec: Any) -> NamedPolicy:
    return NamedPolicy.model_validate({"name": name, "spec": spec})


def one(sql: str) -> StatementInfo:
    (st,) = analyze(sql)
    return st


READ_ONLY = EffectivePolicy.combine([pol("ro", access="read-only")])


def test_grants_add_up_and_restrictions_add_up() -> None:
    eff = EffectivePolicy.combine(
        [
            pol("b-writer", access="read-write", guardrails={"deny": ["truncate"], "maxRows": 500}),
            pol(
                "a-reader",
                access="read-only",
                guardrails={
                    "deny": ["ddl"],
                    "denyFunctions": ["Pg_Sleep"],
                    "maxRows": 100,
                    "statementTimeout": "30s",
                },
            ),
        ]
    )
    assert eff.as_dict() == {
        "policies": ["a-reader", "b-writer"],
        "access": "read-write",
        "deny": ["ddl", "truncate"],
        "denyFunctions": ["pg_sleep"],
        "maxRows": 100,
        "statementTimeout": 30.0,
        "approvals": [],
        "masking": [],
        "recording": "statements",
    }
    assert eff.decide(one("UPDATE t SET a = 1 WHERE id = 2")).allowed
    d = eff.decide(one("TRUNCATE t"))
    assert (d.allowed, d.policy) == (False, "b-writer")
    assert d.error is not None
    assert d.error.sqlstate == "42501"
    assert d.error.message.startswith("pgwarden: ")
    assert '"truncate"' in d.error.message
    assert '"b-writer"' in d.error.message
    d = eff.decide(one("SELECT pg_sleep(1)"))
    assert (d.allowed, d.policy) == (False, "a-reader")


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO t VALUES (1)",
        "WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d",
        "EXPLAIN ANALYZE DELETE FROM t WHERE id = 1",
        "CREATE TABLE x AS SELECT 1",
        "SELECT 1 INTO newtable",
        "DO $$ BEGIN END $$",
        "CALL p()",
        "TRUNCATE t",
        "GRANT SELECT ON t TO public",
        "SET ROLE postgres",
        "SELECT pg_read_file('/etc/passwd')",
        "COPY t FROM STDIN",
        "SELECT pg_terminate_backend(1)",
    ],
)
def test_read_only_refuses_every_change(sql: str) -> None:
    d = READ_ONLY.decide(one(sql))
    assert not d.allowed, sql
    assert d.policy == "ro"
    assert d.error is not None
    assert d.error.hint


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM t WHERE id = 1",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "EXPLAIN SELECT 1",
        "BEGIN",
        "COMMIT",
        "SET search_path = public",
        "COPY t TO STDOUT",
    ],
)
def test_read_only_allows_reading(sql: str) -> None:
    assert READ_ONLY.decide(one(sql)).allowed, sql


def test_unknown_is_refused_only_where_something_is_restricted() -> None:
    st = one("SELEKT 1")
    d = READ_ONLY.decide(st)
    assert not d.allowed
    assert d.error is not None
    assert "cannot classify" in d.error.message
    open_policy = EffectivePolicy.combine([pol("rw", access="read-write")])
    assert not open_policy.restricts
    assert open_policy.decide(st).allowed


def test_unqualified_write_hint_says_add_a_where_clause() -> None:
    eff = EffectivePolicy.combine(
        [pol("rw", access="read-write", guardrails={"deny": ["unqualified-write"]})]
    )
    d = eff.decide(one("DELETE FROM t"))
    assert d.error is not None
    assert "WHERE" in (d.error.hint or "")
    assert eff.decide(one("DELETE FROM t WHERE id = 1")).allowed


@pytest.mark.parametrize(
    "sql",
    [
        "SET default_transaction_read_only = off",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "BEGIN READ WRITE",
        "SET TRANSACTION READ WRITE",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "RESET ALL",
    ],
)
def test_read_only_mode_cannot_be_switched_off(sql: str) -> None:
    d = READ_ONLY.decide(one(sql))
    assert not d.allowed, sql
    assert d.error is not None
    assert "fixes for this session" in d.error.message or "read-only" in d.error.message


def test_statement_timeout_is_a_startup_setting_the_client_cannot_change() -> None:
    eff = EffectivePolicy.combine(
        [
            pol("slow", access="read-write", guardrails={"statementTimeout": "1m"}),
            pol("fast", access="read-write", guardrails={"statementTimeout": "250ms"}),
        ]
    )
    assert eff.upstream_settings() == {"statement_timeout": "250"}
    assert READ_ONLY.upstream_settings() == {"default_transaction_read_only": "on"}
    d = eff.decide(one("SET statement_timeout = 0"))
    assert (d.allowed, d.policy) == (False, "fast")
    assert eff.decide(one("SET search_path = public")).allowed
    assert eff.decide(one("BEGIN READ WRITE")).allowed  # read-write access: nothing fixed there
