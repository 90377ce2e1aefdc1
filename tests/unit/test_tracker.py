"""Responses are matched to requests under pipelining, errors and refusals."""

from __future__ import annotations

from pgwarden_proxy.events import StatementEvent
from pgwarden_proxy.tracker import Kind, Op, Tracker
from pgwarden_proxy.wire.framing import Message
from pgwarden_proxy.wire.messages import ErrorInfo, frame


def msg(t: bytes, body: bytes = b"", rows: int = 0) -> Message:
    return Message(t[0], body, frame(t, body), rows, rows * 10)


def op(text: str) -> Op:
    return Op(
        StatementEvent(
            "s", "c", "who", text, None, ("read",), "SELECT", None, "extended", "allow", None, 0.0
        )
    )


def err(code: str) -> bytes:
    return b"SERROR\x00C" + code.encode() + b"\x00Mboom\x00\x00"


def test_pipelined_executes_get_their_own_rows_and_tags() -> None:
    done: list[StatementEvent] = []
    t = Tracker(done.append)
    a, b = op("a"), op("b")
    for kind, ops in [
        (Kind.PARSE, None),
        (Kind.BIND, None),
        (Kind.EXECUTE, [a]),
        (Kind.BIND, None),
        (Kind.EXECUTE, [b]),
        (Kind.SYNC, None),
    ]:
        t.request(kind, ops)
    for m_ in [
        msg(b"1"),
        msg(b"2"),
        msg(b"C", b"SELECT 3\x00", rows=3),
        msg(b"2"),
        msg(b"C", b"SELECT 1\x00", rows=1),
        msg(b"Z", b"I"),
    ]:
        assert t.server(m_) == m_.raw
    assert [(e.statement, e.rows, e.command_tag) for e in done] == [
        ("a", 3, "SELECT 3"),
        ("b", 1, "SELECT 1"),
    ]
    assert t.idle


def test_error_skips_the_rest_of_the_batch_up_to_sync() -> None:
    done: list[StatementEvent] = []
    t = Tracker(done.append)
    a, b = op("a"), op("b")
    for kind, ops in [
        (Kind.BIND, None),
        (Kind.EXECUTE, [a]),
        (Kind.BIND, None),
        (Kind.EXECUTE, [b]),
        (Kind.SYNC, None),
        (Kind.BIND, None),
    ]:
        t.request(kind, ops)
    t.server(msg(b"2"))
    t.server(msg(b"E", err("22012")))
    assert [p.kind for p in t.pending] == [Kind.SYNC, Kind.BIND]
    t.server(msg(b"Z", b"I"))
    assert [p.kind for p in t.pending] == [Kind.BIND]
    assert [(e.statement, e.error) for e in done] == [
        ("a", {"sqlstate": "22012", "message": "boom"})
    ]


def test_an_error_at_parse_or_bind_is_charged_to_the_next_execute_only() -> None:
    # a syntax error fails at Parse, a folded 1/0 at Bind: the statement still gets its event
    for failing in (Kind.PARSE, Kind.BIND):
        done: list[StatementEvent] = []
        t = Tracker(done.append)
        a, b = op("a"), op("b")
        t.request(failing, None)
        if failing is Kind.PARSE:
            t.request(Kind.BIND, None)
        for kind, ops in [(Kind.EXECUTE, [a]), (Kind.BIND, None), (Kind.EXECUTE, [b])]:
            t.request(kind, ops)
        t.request(Kind.SYNC, None)
        t.server(msg(b"E", err("42601")))
        t.server(msg(b"Z", b"I"))
        assert t.idle
        # b never ran (the server skipped it): no event claims it ran or failed
        assert [(e.statement, e.error) for e in done] == [
            ("a", {"sqlstate": "42601", "message": "boom"})
        ]


def test_simple_query_with_several_statements_stops_at_the_first_error() -> None:
    done: list[StatementEvent] = []
    t = Tracker(done.append)
    ops = [op("one"), op("two"), op("three")]
    t.request(Kind.QUERY, ops)
    t.server(msg(b"T", b"x"))
    t.server(msg(b"C", b"SELECT 2\x00", rows=2))
    t.server(msg(b"E", err("42P01")))
    t.server(msg(b"Z", b"I"))
    assert [(e.statement, e.rows, bool(e.error)) for e in done] == [
        ("one", 2, False),
        ("two", 0, True),
    ]
    assert t.idle


def test_refused_request_swaps_the_servers_error_for_ours() -> None:
    done: list[StatementEvent] = []
    t = Tracker(done.append)
    ours = ErrorInfo("42501", "pgwarden: no")
    t.request(Kind.QUERY, [op("DROP TABLE x")], refusal=ours)
    assert t.server(msg(b"E", err("26000"))) == ours.encode()
    z = msg(b"Z", b"E")
    assert t.server(z) == z.raw
    assert done[0].error == {"sqlstate": "42501", "message": "pgwarden: no"}
    assert t.transaction_status == b"E"


def test_asynchronous_messages_pass_when_idle() -> None:
    t = Tracker(lambda e: None)
    for m_ in [
        msg(b"A", b"\x00\x00\x00\x01ch\x00p\x00"),
        msg(b"N", b"x"),
        msg(b"S", b"a\x00b\x00"),
    ]:
        assert t.server(m_) == m_.raw
