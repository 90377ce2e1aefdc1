"""Credentials in statement text never reach logs, recordings or approval requests."""

from __future__ import annotations

import pytest

from pgwarden_proxy.sql.secrets import redact


@pytest.mark.parametrize(
    ("sql", "secret"),
    [
        ("ALTER ROLE bob PASSWORD 'hunter2'", "hunter2"),
        ("alter user bob with password 'it''s secret' valid until 'infinity'", "it''s secret"),
        ("CREATE ROLE x LOGIN PASSWORD E'sec\\\\ret'", "sec"),
        ("ALTER USER bob PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi'", "SCRAM-SHA-256$4096"),
        (
            "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password 'pw1')",
            "pw1",
        ),
        (
            "CREATE SUBSCRIPTION s CONNECTION 'host=db user=r password=pw2 dbname=x' PUBLICATION p",
            "pw2",
        ),
        ("SELECT dblink_connect('dbname=x password = pw3')", "pw3"),
    ],
)
def test_a_credential_is_redacted(sql: str, secret: str) -> None:
    out = redact(sql)
    assert secret not in out
    assert "[redacted]" in out


def test_what_holds_no_credential_is_the_same_object() -> None:
    sql = "SELECT * FROM accounts WHERE id = 1"
    assert redact(sql) is sql
    # the word alone is not a credential
    assert redact("SELECT password_changed_at FROM users") == (
        "SELECT password_changed_at FROM users"
    )
