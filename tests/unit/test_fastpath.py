"""The C fast path (wire/_fastpath.c) on its own: which client reads it takes (and that it takes
nothing of the others), how it walks the server's answers, where it stops, and what it hands
back. tests/integration/test_fastpath.py checks that sessions give the same events with it
on and off."""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden_proxy import fastpath
from pgwarden_proxy.wire import messages as m
from pgwarden_proxy.wire.framing import SMALL_MESSAGE_LIMIT

pytestmark = pytest.mark.skipif(
    fastpath.FastPath is None, reason="the C fast path is not built (no C compiler at install)"
)

LIMIT = 1 << 20
ENTRY = object()


def new() -> fastpath.FastPath:
    assert fastpath.FastPath is not None
    f = fastpath.FastPath(LIMIT)
    f.register(b"s1", ENTRY)
    return f


def bind(
    statement: bytes = b"s1",
    params: tuple[bytes | None, ...] = (b"42",),
    formats: tuple[int, ...] = (),
    portal: bytes = b"",
) -> bytes:
    body = portal + b"\x00" + statement + b"\x00"
    body += struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
    body += struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    return m.frame(b"B", body + b"\x00\x00")  # no result formats


DESCRIBE = m.frame(b"D", b"P\x00")
EXECUTE = m.frame(b"E", b"\x00" + struct.pack("!i", 0))
SYNC = m.sync()
FLUSH = m.frame(b"H")
CYCLE = bind() + DESCRIBE + EXECUTE + SYNC  # what libpq's PQexecPrepared sends

BIND_COMPLETE = m.frame(b"2")
ROW_DESCRIPTION = m.frame(b"T", b"\x00\x01a\x00" + b"\x00" * 18)
DATA_ROW = m.frame(b"D", b"\x00\x01\x00\x00\x00\x0212")
COMPLETE = m.frame(b"C", b"SELECT 1\x00")
READY = m.frame(b"Z", b"I")
ANSWER = BIND_COMPLETE + ROW_DESCRIPTION + DATA_ROW + COMPLETE + READY


def test_a_cycle_is_queued_and_answered() -> None:
    f = new()
    before = time.time()
    assert f.client(CYCLE) == 1
    assert f.active
    end, done, status = f.server(ANSWER)
    assert (end, status) == (len(ANSWER), b"I")
    assert not f.active
    assert done is not None
    assert len(done) == 1
    entry, params, body, start, duration_ms, rows, nbytes, tag, note = done[0]
    assert note is None
    assert entry is ENTRY
    assert params == ["42"]
    assert tag == "SELECT 1"
    assert m.BindMessage.parse(body).statement == "s1"
    assert before <= start <= time.time()
    assert duration_ms >= 0
    assert (rows, nbytes) == (1, len(DATA_ROW))


def test_answers_may_come_in_pieces_at_message_boundaries() -> None:
    f = new()
    assert f.client(CYCLE + CYCLE) == 2
    first = BIND_COMPLETE + ROW_DESCRIPTION + DATA_ROW
    end, done, status = f.server(first)
    assert (end, done, status) == (len(first), None, None)
    assert f.active
    end, done, status = f.server(COMPLETE + READY + ANSWER)
    assert end == len(COMPLETE + READY + ANSWER)
    assert status == b"I"
    assert done is not None
    assert [d[5] for d in done] == [1, 1]
    assert not f.active


def test_pipelined_executions_and_flush() -> None:
    f = new()
    reads = bind(params=(b"1",)) + EXECUTE + FLUSH + bind(params=(None,)) + EXECUTE + SYNC
    assert f.client(reads) == 2
    answer = BIND_COMPLETE + COMPLETE + BIND_COMPLETE + DATA_ROW + COMPLETE + READY
    end, done, _ = f.server(answer)
    assert end == len(answer)
    assert done is not None
    assert [(d[1], d[5]) for d in done] == [(["1"], 0), ([None], 1)]


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(bind(statement=b"other") + EXECUTE + SYNC, id="unregistered statement"),
        pytest.param(bind(portal=b"p") + EXECUTE + SYNC, id="named portal"),
        pytest.param(
            bind() + m.frame(b"E", b"\x00" + struct.pack("!i", 10)) + SYNC, id="row limit"
        ),
        pytest.param(bind() + m.frame(b"E", b"p\x00" + struct.pack("!i", 0)), id="other portal"),
        pytest.param(EXECUTE + SYNC, id="execute without bind"),
        pytest.param(bind() + DESCRIBE + SYNC, id="describe without execute"),
        pytest.param(bind() + m.frame(b"D", b"S\x00") + EXECUTE, id="describe statement"),
        pytest.param(bind() + EXECUTE + EXECUTE + SYNC, id="portal executed twice"),
        pytest.param(m.frame(b"Q", b"SELECT 1\x00"), id="simple query"),
        pytest.param(m.frame(b"P", b"\x00SELECT 1\x00\x00\x00") + CYCLE, id="parse"),
        pytest.param(CYCLE + m.frame(b"X"), id="terminate"),
        pytest.param(CYCLE[:-1], id="cut message"),
        pytest.param(CYCLE + b"S\x00\x00", id="cut header"),
        pytest.param(bind()[:-3] + EXECUTE, id="bind cut inside"),
        pytest.param(b"S\x00\x00\x00\x03", id="length under 4"),
        pytest.param(
            b"E" + struct.pack("!I", SMALL_MESSAGE_LIMIT + 1) + b"\x00" * SMALL_MESSAGE_LIMIT,
            id="small message over its limit",
        ),
        pytest.param(m.frame(b"B", b"\x00s1\x00\xff\xff\x00\x00"), id="negative format count"),
        pytest.param(m.frame(b"B", b"\x00s1\x00\x00\x00\x00\x01\xff\xff\xff\xfe"), id="bad size"),
    ],
)
def test_any_other_read_is_left_whole_to_the_session(read: bytes) -> None:
    f = new()
    assert f.client(CYCLE) == 1
    assert f.client(read) == -1
    # what was queued before is intact, and nothing of the refused read was added
    assert [t[0] for t in f.take()] == [ord("B"), ord("D"), ord("E"), ord("S")]
    assert f.take() == []


def test_binary_parameters_are_left_to_the_session_to_render() -> None:
    f = new()
    assert f.client(bind(params=(struct.pack("!i", 7), None), formats=(1,)) + EXECUTE) == 1
    (item,) = [t for t in f.take() if t[0] == ord("E")]
    assert item[2] is None  # rendered from the Bind body with the statement's types
    assert m.BindMessage.parse(item[3]).params == (struct.pack("!i", 7), None)


def test_text_parameters_are_decoded_as_the_session_decodes_them() -> None:
    f = new()
    values = (b"caf\xc3\xa9", b"\xff bad", b"", None)
    assert f.client(bind(params=values) + EXECUTE) == 1
    (item,) = [t for t in f.take() if t[0] == ord("E")]
    body = item[3]
    assert item[2] == m.BindMessage.parse(body).rendered_params()


@pytest.mark.parametrize(
    "surprise",
    [
        pytest.param(m.frame(b"E", b"SERROR\x00C22012\x00Mdivision by zero\x00\x00"), id="error"),
        pytest.param(m.frame(b"N", b"SNOTICE\x00Mhello\x00\x00"), id="notice"),
        pytest.param(m.frame(b"S", b"application_name\x00x\x00"), id="parameter status"),
        pytest.param(m.frame(b"A", b"\x00\x00\x00\x01ch\x00\x00"), id="notification"),
        pytest.param(m.frame(b"s"), id="portal suspended"),
        pytest.param(m.frame(b"I"), id="empty query"),
        # the end of the read
        pytest.param(DATA_ROW[:-1], id="row cut by the read"),
        pytest.param(COMPLETE[:-1], id="message cut by the read"),
        pytest.param(COMPLETE[:3], id="header cut by the read"),
    ],
)
def test_the_walk_stops_at_what_it_does_not_expect(surprise: bytes) -> None:
    f = new()
    assert f.client(CYCLE) == 1
    head = BIND_COMPLETE + ROW_DESCRIPTION + DATA_ROW
    cut = surprise[0] in b"DC"
    end, done, status = f.server(head + surprise + (b"" if cut else COMPLETE + READY))
    assert (end, done, status) == (len(head), None, None)
    # the session takes over: the Execute with the row counted so far, then the Sync
    items = f.take()
    assert [t[0] for t in items] == [ord("E"), ord("S")]
    _kind, entry, params, _body, _start, t0, rows, nbytes, _note = items[0]
    assert entry is ENTRY
    assert params == ["42"]
    assert (rows, nbytes) == (1, len(DATA_ROW))
    assert abs(t0 - time.perf_counter()) < 60  # the clock of time.perf_counter
    assert not f.active


def test_answers_out_of_order_stop_the_walk() -> None:
    f = new()
    assert f.client(CYCLE) == 1
    end, done, _ = f.server(COMPLETE)  # the server answers the Bind first
    assert (end, done) == (0, None)
    assert f.active


def test_what_follows_the_last_answer_is_left_to_the_session() -> None:
    f = new()
    assert f.client(CYCLE) == 1
    after = m.frame(b"A", b"\x00\x00\x00\x01ch\x00\x00")
    end, done, status = f.server(ANSWER + after)
    assert end == len(ANSWER)
    assert status == b"I"
    assert done is not None
    assert not f.active


def test_take_bind_gives_the_last_bind_once() -> None:
    f = new()
    assert f.take_bind() is None
    assert f.client(bind(params=(b"1",)) + EXECUTE + bind(params=(b"2",)) + EXECUTE) == 2
    body = f.take_bind()
    assert body is not None
    assert m.BindMessage.parse(body).params == (b"2",)
    assert f.take_bind() is None


def test_registration() -> None:
    f = new()
    f.register(b"s2", ENTRY)
    assert f.client(bind(statement=b"s2") + EXECUTE) == 1
    f.unregister(b"s2")
    f.unregister(b"never")  # nothing to do
    assert f.client(bind(statement=b"s2") + EXECUTE) == -1
    assert f.client(bind(statement=b"s1") + EXECUTE) == 1  # the lookup cache follows
    f.clear()
    assert f.client(bind(statement=b"s1") + EXECUTE) == -1
    with pytest.raises(TypeError):
        f.register("s1", ENTRY)  # type: ignore[arg-type]
    assert fastpath.FastPath is not None
    with pytest.raises(ValueError, match="at least 4"):
        fastpath.FastPath(0)


messages = st.sampled_from(
    [bind(), bind(statement=b"x"), DESCRIBE, EXECUTE, SYNC, FLUSH, m.frame(b"Q", b"x\x00")]
)
answers = st.sampled_from(
    [BIND_COMPLETE, ROW_DESCRIPTION, DATA_ROW, COMPLETE, READY, m.frame(b"n"), m.frame(b"N")]
)


@settings(max_examples=300, deadline=None)
@given(
    reads=st.lists(st.lists(messages, max_size=6), max_size=4),
    answer=st.lists(answers, max_size=12),
    cut=st.integers(0, 200),
    junk=st.binary(max_size=40),
)
def test_any_input_is_taken_whole_or_not_at_all(
    reads: list[list[bytes]], answer: list[bytes], cut: int, junk: bytes
) -> None:
    """Whatever the bytes, the path never reads past them, never half-takes a read, and what it
    queued comes back from take() in order."""
    f = new()
    queued: list[int] = []
    for read in reads:
        data = b"".join(read)
        n = f.client(data)
        if n >= 0:
            assert n == data.count(EXECUTE)
            queued += [msg[0] for msg in read if msg[0] != ord("H")]
    data = b"".join(answer)
    data = data[: min(cut, len(data))] + junk
    end, _done, _ = f.server(data)
    assert 0 <= end <= len(data)
    items = f.take()
    answered = len(queued) - len(items)
    assert answered >= 0
    assert [t[0] for t in items] == queued[answered:]


def test_no_reference_is_leaked() -> None:
    """Every path through the C code gives back what it took (refused reads, errors, hand-overs,
    events, a queue dropped with its FastPath)."""
    import sys

    entry = object()
    base = sys.getrefcount(entry)
    for _ in range(50):
        f = new()
        f.register(b"s1", entry)
        f.client(CYCLE)
        f.server(ANSWER)
        f.client(CYCLE + m.frame(b"X"))  # refused, after queuing inside the read
        f.client(CYCLE + CYCLE)
        f.note([entry, entry])
        f.server(BIND_COMPLETE + m.frame(b"N", b"x\x00\x00"))
        f.take()
        f.client(CYCLE)
        f.take_bind()
        del f  # with an Execute still queued
    assert sys.getrefcount(entry) == base


def test_fresh_executions_can_be_noted() -> None:
    """The recording session gives each queued Execute its event before the read goes on."""
    f = new()
    assert f.fresh() == []
    assert f.client(CYCLE) == 1
    assert f.client(bind(params=(b"1",)) + EXECUTE + bind(params=(b"2",)) + EXECUTE + SYNC) == 2
    fresh = f.fresh()  # only the last read's
    assert [(e, p) for e, p, _, _ in fresh] == [(ENTRY, ["1"]), (ENTRY, ["2"])]
    with pytest.raises(ValueError, match="1 notes for 2"):
        f.note(["a"])
    f.note(["a", "b"])
    assert f.client(m.frame(b"Q", b"x\x00")) == -1  # a refused read leaves nothing fresh
    assert f.fresh() == []
    f.server(ANSWER)  # the first cycle: not noted
    answer = BIND_COMPLETE + COMPLETE + BIND_COMPLETE + DATA_ROW
    end, done, _ = f.server(answer)
    assert end == len(answer)
    assert done is not None
    assert [d[-1] for d in done] == ["a"]
    assert [t[-1] for t in f.take() if t[0] == ord("E")] == ["b"]
