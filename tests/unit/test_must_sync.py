"""Which statements run only once their recorded event is fsynced (docs/recording.md)."""

from __future__ import annotations

import pytest

from pgwarden_proxy.events import StatementEvent
from pgwarden_proxy.session import _must_sync
from pgwarden_proxy.sql.classify import Analyzer

ANALYZER = Analyzer()


def event(sql: str, decision: str = "allow") -> StatementEvent:
    info = ANALYZER.analyze(sql)[0]
    return StatementEvent(
        "s", "c", "who", sql, None, tuple(sorted(info.classes)), info.command, None, "simple",
        decision, None, 0.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sql", "outside", "inside"),
    [
        ("SELECT * FROM t", False, False),
        ("BEGIN", False, False),
        ("SAVEPOINT a", False, False),
        ("ROLLBACK", False, False),
        ("UPDATE t SET a = 1 WHERE id = 2", True, False),  # inside: lasts only through COMMIT
        ("DELETE FROM t", True, False),
        ("CREATE TABLE x (a int)", True, False),
        ("SET search_path = x", True, False),
        ("COMMIT", True, True),  # makes the block's changes last
        ("END", True, True),
        ("PREPARE TRANSACTION 'x'", True, True),
        ("COMMIT PREPARED 'x'", True, True),
        ("SELECT pg_terminate_backend(42)", True, True),  # acts outside any transaction
        ("COPY t TO PROGRAM 'cat'", True, True),
        ("DO $$ BEGIN END $$", True, True),
        ("SELECT nextval('s')", True, False),
    ],
)
def test_what_waits_for_the_fsync(sql: str, outside: bool, inside: bool) -> None:
    assert _must_sync(event(sql), in_block=False) is outside
    assert _must_sync(event(sql), in_block=True) is inside


def test_refused_never_waits_and_held_always_does() -> None:
    assert _must_sync(event("DROP TABLE t", "refuse"), in_block=False) is False
    assert _must_sync(event("SELECT 1", "hold"), in_block=True) is True
