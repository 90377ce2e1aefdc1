"""`pgwarden sessions list|show|replay|verify|export` over recordings written in a FileStore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pgwarden.cli import main
from pgwarden.recording.format import (
    Manifest,
    SessionIndex,
    chunk_key,
    day_of,
    encode_event,
    event_hash,
    genesis,
    identity_index_key,
    iso,
    manifest_key,
    session_index_key,
    session_prefix,
    sign_manifest,
)
from pgwarden.recording.reader import load_session
from pgwarden.recording.store import FileStore
from pgwarden.recording.verify import verify_session

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC).timestamp()
BOT = "bot@example.com"


# ---------------------------------------------------------------------------------- recordings
@dataclass
class Built:
    session_id: str
    prefix: str
    lines: list[bytes]
    chunks: list[str]  # chunk keys, in order
    seq_of: dict[str, int] = field(default_factory=dict)  # marker -> seq

    @property
    def n(self) -> int:
        return len(self.lines)


def write_session(
    store: FileStore,
    session_id: str = "s-1",
    *,
    connection: str = "orders-db",
    identity: str = BOT,
    start: float = T0,
    refuse: bool = True,
    hold: bool = True,
    filler: int = 6,
    extra_statement: str | None = None,
    chunk_events: int = 5,
    key: Ed25519PrivateKey | None = None,
    manifest: bool = True,
    step: float = 0.5,
    odd_shapes: bool = False,
) -> Built:
    """A chained session: start, statements with outcomes (a refused one, a held one approved,
    one at level results with rows), fillers, end; in chunks of `chunk_events`, with manifest
    and both index objects."""
    fields: list[dict[str, Any]] = []
    marks: dict[str, int] = {}

    def add(kind: str, mark: str | None = None, **f: Any) -> int:
        fields.append({"type": kind, **f})
        if mark:
            marks[mark] = len(fields)
        return len(fields)

    add(
        "session_start",
        groups=["ai-agents"],
        subject="bot-1",
        issuer="https://idp.example.com",
        actor="alice@example.com",
        client="10.0.0.5:51234",
        applicationName="psql",
        tls=True,
        policies=["ai-agents-readonly"],
        level="results",
    )
    s = add(
        "statement",
        "select",
        statement="SELECT id, email FROM customers LIMIT 2",
        classes=["read"],
        command="SELECT",
        protocol="simple",
        decision="allow",
        policy=None,
    )
    add(
        "outcome",
        ref=s,
        decision="allow",
        durationMs=1.25,
        rows=2,
        bytes=64,
        commandTag="SELECT 2",
        error=None,
        result={
            "columns": None if odd_shapes else ["id", "email"],
            "rows": [["1", "a***@example.com"], ["2", "b***@example.com"]],
            "capturedRows": 2,
            "totalRows": 2,
            "truncated": False,
            "digest": "sha256:00",
        },
    )
    if refuse:
        s = add(
            "statement",
            "refused",
            statement="DROP TABLE orders",
            classes=["ddl", "drop"],
            command="DROP TABLE",
            protocol="simple",
            decision="refuse",
            policy="ai-agents-readonly",
        )
        add(
            "outcome",
            ref=s,
            decision="refuse",
            durationMs=0.0,
            rows=0,
            bytes=0,
            commandTag=None,
            error={"sqlstate": "42501", "message": "pgwarden: ddl is not allowed"},
        )
    if hold:
        s = add(
            "statement",
            "held",
            statement="UPDATE orders SET status = 'paid' WHERE id = $1",
            parameters=["7"],
            classes=["write"],
            command="UPDATE",
            protocol="extended",
            decision="hold",
            policy="ai-agents-readonly",
        )
        add(
            "approval",
            ref=s,
            request="apr-1",
            state="Approved",
            decidedBy="carol@example.com",
            comment="ok",
            decision="approved",
        )
        add("outcome", ref=s, decision="approved", durationMs=3.5, rows=1, commandTag="UPDATE 1")
    if extra_statement is not None:
        s = add("statement", "extra", statement=extra_statement, classes=["read"], decision="allow")
        add("outcome", ref=s, decision="allow", durationMs=0.5, rows=1, commandTag="SELECT 1")
    for i in range(filler):
        s = add("statement", statement=f"SELECT {i}", classes=["read"], decision="allow")
        rows: Any = "many" if odd_shapes and i == 0 else 1
        add("outcome", ref=s, decision="allow", durationMs=0.1, rows=rows, commandTag="SELECT 1")
    n_statements = sum(f["type"] == "statement" for f in fields)
    add("session_end", reason="client terminated", statements=n_statements, recovered=False)

    prev = genesis(session_id)
    lines: list[bytes] = []
    for seq, f in enumerate(fields, 1):
        kind = f.pop("type")
        event = {
            "v": 1,
            "seq": seq,
            "prev": prev,
            "time": iso(start + step * (seq - 1)),
            "type": kind,
            "sessionId": session_id,
            "connection": connection,
            "identity": identity,
            **f,
        }
        line = encode_event(event)
        lines.append(line)
        prev = event_hash(line)

    day = day_of(start)
    prefix = session_prefix(connection, day, session_id)
    chunks = []
    for i in range(0, len(lines), chunk_events):
        part = lines[i : i + chunk_events]
        k = chunk_key(prefix, i + 1, i + len(part))
        store.put(k, b"".join(line + b"\n" for line in part))
        chunks.append(k)
    if manifest:
        m = Manifest.model_validate(
            {
                "sessionId": session_id,
                "connection": connection,
                "identity": identity,
                "start": iso(start),
                "end": iso(start + step * (len(lines) - 1)),
                "events": len(lines),
                "lastSeq": len(lines),
                "finalHash": event_hash(lines[-1]),
                "endReason": "client terminated",
                "statements": n_statements,
            }
        )
        if key is not None:
            m = sign_manifest(m, key)
        store.put(manifest_key(prefix), m.model_dump_json(by_alias=True).encode())
    index = SessionIndex.model_validate(
        {
            "sessionId": session_id,
            "connection": connection,
            "identity": identity,
            "start": iso(start),
            "day": day,
            "prefix": prefix,
        }
    ).model_dump_json(by_alias=True)
    store.put(session_index_key(session_id), index.encode())
    store.put(identity_index_key(identity, day, session_id), index.encode())
    return Built(session_id, prefix, lines, chunks, marks)


def public_pem(tmp_path: Path, key: Ed25519PrivateKey, name: str = "pub.pem") -> str:
    path = tmp_path / name
    path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return str(path)


# ---------------------------------------------------------------------------------- tampering
def chunk_of(store: FileStore, b: Built, seq: int) -> tuple[str, list[bytes]]:
    for k in b.chunks:
        first, last = (int(x) for x in k.rsplit("/", 1)[1].removesuffix(".jsonl").split("-"))
        if first <= seq <= last:
            return k, store.get(k).split(b"\n")[:-1]
    raise AssertionError(seq)


def rewrite(store: FileStore, b: Built, seq: int, fn: Any) -> None:
    """Replace the lines of the chunk holding `seq` by fn(lines, index of seq)."""
    k, lines = chunk_of(store, b, seq)
    first = int(k.rsplit("/", 1)[1].split("-")[0])
    new = fn(lines, seq - first)
    store.put(k, b"".join(line + b"\n" for line in new))


def change_byte(line: bytes, field: bytes = b'"time":"') -> bytes:
    i = line.index(field) + len(field) + 3  # the last digit of the year
    digit = b"7" if line[i : i + 1] != b"7" else b"8"
    return line[:i] + digit + line[i + 1 :]


MID = 12  # an event in the middle of a chunk (chunks 11-15), followed by one in the same chunk


def change_prev(line: bytes) -> bytes:
    i = line.index(b'"prev":"') + len(b'"prev":"')
    digit = b"0" if line[i : i + 1] != b"0" else b"1"
    return line[:i] + digit + line[i + 1 :]


def tamper(store: FileStore, b: Built, how: str) -> None:
    mid = MID
    if how == "byte-middle":
        rewrite(store, b, mid, lambda ls, i: [*ls[:i], change_byte(ls[i]), *ls[i + 1 :]])
    elif how == "byte-middle-prev":
        rewrite(store, b, mid, lambda ls, i: [*ls[:i], change_prev(ls[i]), *ls[i + 1 :]])
    elif how == "not-json-middle":
        rewrite(store, b, mid, lambda ls, i: [*ls[:i], b"x" + ls[i][1:], *ls[i + 1 :]])
    elif how == "byte-last":
        rewrite(store, b, b.n, lambda ls, i: [*ls[:i], change_byte(ls[i]), *ls[i + 1 :]])
    elif how == "removed":
        rewrite(store, b, mid, lambda ls, i: [*ls[:i], *ls[i + 1 :]])
    elif how == "swapped":
        rewrite(store, b, mid, lambda ls, i: [*ls[:i], ls[i + 1], ls[i], *ls[i + 2 :]])
    elif how == "chunk-middle":
        (store.root / b.chunks[1]).unlink()
    elif how == "chunk-last":
        (store.root / b.chunks[-1]).unlink()
    elif how == "manifest-missing":
        (store.root / manifest_key(b.prefix)).unlink()
    elif how in ("manifest-count", "manifest-count-and-last"):
        m = json.loads(store.get(manifest_key(b.prefix)))
        m["events"] += 1
        if how == "manifest-count-and-last":
            m["lastSeq"] += 1
        store.put(manifest_key(b.prefix), json.dumps(m).encode())
    elif how == "chunk-renamed":
        old = b.chunks[1]
        first = int(old.rsplit("/", 1)[1].split("-")[0])
        new = chunk_key(b.prefix, first, first + 99)
        (store.root / old).rename(store.root / new)
    else:
        raise AssertionError(how)


# ---------------------------------------------------------------------------------- running
def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["sessions", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "rec")


# ---------------------------------------------------------------------------------- list
def test_list_filters_and_json(store: FileStore, capsys: pytest.CaptureFixture[str]) -> None:
    write_session(store, "s-a", start=T0)
    write_session(
        store, "s-b", identity="alice@example.com", start=T0 + 86400, refuse=False, hold=False
    )
    write_session(
        store,
        "s-c",
        connection="billing-db",
        start=T0 + 2 * 86400,
        refuse=False,
        extra_statement="SELECT * FROM Invoices",
    )
    write_session(store, "s-open", start=T0 + 3600, manifest=False, refuse=False, hold=False)
    url = store.url

    def ids(*argv: str) -> list[str]:
        rc, out, err = cli(capsys, "list", "--store", url, "--json", *argv)
        assert rc == 0, err
        return [json.loads(line)["sessionId"] for line in out.splitlines()]

    rc, out, _ = cli(capsys, "list", "--store", url, "--json")
    rows = {json.loads(line)["sessionId"]: json.loads(line) for line in out.splitlines()}
    assert list(rows) == ["s-a", "s-open", "s-b", "s-c"]  # by start time
    a = rows["s-a"]
    assert {"sessionId", "identity", "connection", "start", "end", "statements"} <= set(a)
    assert a["identity"] == BOT
    assert a["connection"] == "orders-db"
    assert a["start"] == iso(T0)
    assert a["end"] is not None
    assert a["statements"] == 3 + 6
    assert a["refused"] == 1
    assert a["endReason"] == "client terminated"
    assert rows["s-open"]["end"] is not None  # its session_end event is there, no manifest
    assert rows["s-b"]["refused"] == 0

    assert ids("--identity", BOT) == ["s-a", "s-open", "s-c"]
    assert ids("--identity", "alice@example.com") == ["s-b"]
    assert ids("--identity", "nobody@example.com") == []
    assert ids("--connection", "billing-db") == ["s-c"]
    assert ids("--connection", "orders-db", "--identity", BOT) == ["s-a", "s-open"]
    assert ids("--since", "2026-11-28") == ["s-b", "s-c"]
    assert ids("--until", "2026-11-27") == ["s-a", "s-open"]
    assert ids("--since", "2026-11-27T10:30:00", "--until", "2026-11-28T10:00:00Z") == [
        "s-open",
        "s-b",
    ]
    assert ids("--since", "2026-11-27T11:30:00+01:00", "--until", "2026-11-27T11:00") == ["s-open"]
    assert ids("--statement-contains", "invoices") == ["s-c"]
    assert ids("--decision", "refuse") == ["s-a"]
    assert ids("--decision", "approved") == ["s-a", "s-c"]
    assert ids("--decision", "hold") == ["s-a", "s-c"]
    assert ids("--decision", "allow") == ["s-a", "s-open", "s-b", "s-c"]

    rc, out, _ = cli(capsys, "list", "--store", url)
    assert rc == 0
    head, *lines = out.splitlines()
    assert head.split()[:3] == ["SESSION", "START", "(UTC)"]
    assert [line.split()[0] for line in lines] == ["s-a", "s-open", "s-b", "s-c"]
    assert "2026-11-27 10:00:00" in lines[0]
    assert "client terminated" in lines[0]


def test_store_from_environment_and_errors(
    store: FileStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_session(store, "s-a")
    monkeypatch.delenv("PGWARDEN_STORE", raising=False)
    rc, _, err = cli(capsys, "list")
    assert rc == 2
    assert "--store" in err
    monkeypatch.setenv("PGWARDEN_STORE", store.url)
    rc, out, _ = cli(capsys, "list", "--json")
    assert rc == 0
    assert "s-a" in out

    rc, _, err = cli(capsys, "show", "no-such-session")
    assert rc == 2
    assert "no session 'no-such-session'" in err
    rc, _, err = cli(capsys, "verify", "no-such-session")
    assert rc == 2
    assert "no session" in err
    rc, _, err = cli(capsys, "list", "--store", "ftp://host/x")
    assert rc == 2
    assert "unsupported store" in err
    rc, _, err = cli(capsys, "list", "--since", "yesterday")
    assert rc == 2
    assert "not an ISO date" in err
    rc, _, err = cli(capsys, "verify")
    assert rc == 2
    assert "--all" in err
    rc, _, err = cli(capsys, "verify", "s-a", "--all")
    assert rc == 2
    rc, _, err = cli(capsys, "verify", "s-a", "--public-key", "/nonexistent/key.pem")
    assert rc == 2
    assert "cannot read public key" in err


def test_unreadable_store_is_exit_2(store: FileStore, capsys: pytest.CaptureFixture[str]) -> None:
    b = write_session(store, "s-a")
    chunk = store.root / b.chunks[0]
    chunk.chmod(0)
    try:
        if os.geteuid() != 0:  # root reads it anyway
            rc, _, err = cli(capsys, "show", "s-a", "--store", store.url)
            assert rc == 2
            assert "cannot read" in err
    finally:
        chunk.chmod(0o644)
    (store.root / session_index_key("s-a")).write_text("{not json")
    rc, _, err = cli(capsys, "show", "s-a", "--store", store.url)
    assert rc == 2
    assert "not a session index" in err


# ---------------------------------------------------------------------------------- show
def test_show_json_joins_outcomes(store: FileStore, capsys: pytest.CaptureFixture[str]) -> None:
    b = write_session(store, "s-a")
    rc, out, _ = cli(capsys, "show", "s-a", "--store", store.url, "--json")
    assert rc == 0
    events = [json.loads(line) for line in out.splitlines()]
    common = {
        "seq",
        "time",
        "type",
        "sessionId",
        "identity",
        "statement",
        "decision",
        "durationMs",
        "rows",
        "error",
    }
    assert all(common <= set(e) for e in events)
    assert "outcome" not in {e["type"] for e in events}
    outcomes = sum(b'"type":"outcome"' in line for line in b.lines)
    assert len(events) == b.n - outcomes
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    by_seq = {e["seq"]: e for e in events}

    start = events[0]
    assert start["type"] == "session_start"
    assert start["statement"] is None
    assert start["groups"] == ["ai-agents"]
    assert start["level"] == "results"
    assert start["sessionId"] == "s-a"
    assert start["identity"] == BOT

    sel = by_seq[b.seq_of["select"]]
    assert sel["statement"].startswith("SELECT id, email")
    assert sel["decision"] == "allow"
    assert sel["durationMs"] == 1.25
    assert sel["rows"] == 2
    assert sel["commandTag"] == "SELECT 2"
    assert sel["error"] is None
    assert sel["result"]["rows"][1] == ["2", "b***@example.com"]

    ref = by_seq[b.seq_of["refused"]]
    assert ref["decision"] == "refuse"
    assert ref["error"] == {"sqlstate": "42501", "message": "pgwarden: ddl is not allowed"}

    held = by_seq[b.seq_of["held"]]
    assert held["decision"] == "approved"
    assert held["initialDecision"] == "hold"
    assert held["rows"] == 1
    assert held["parameters"] == ["7"]
    approval = next(e for e in events if e["type"] == "approval")
    assert approval["statement"] is None
    assert approval["decidedBy"] == "carol@example.com"
    assert approval["decision"] == "approved"
    assert approval["ref"] == b.seq_of["held"]

    end = events[-1]
    assert end["type"] == "session_end"
    assert end["reason"] == "client terminated"
    assert end["statement"] is None
    assert end["durationMs"] is None


def test_show_text_marks_refused_and_escapes(
    store: FileStore, capsys: pytest.CaptureFixture[str]
) -> None:
    write_session(store, "s-a", extra_statement="SELECT 1 /* \x1b[2J hidden \u202e */")
    rc, out, _ = cli(capsys, "show", "s-a", "--store", store.url)
    assert rc == 0
    assert "\x1b" not in out
    assert "\u202e" not in out
    assert "\\x1b[2J" in out
    assert "\\u202e" in out
    refused = [line for line in out.splitlines() if "REFUSED" in line]
    assert len(refused) == 1
    assert "DROP TABLE orders" in refused[0]
    assert "error 42501: pgwarden: ddl is not allowed" in out
    assert "bot@example.com" in out
    assert "acting for alice@example.com" in out
    assert "orders-db" in out
    assert "psql" in out
    assert "ai-agents-readonly" in out
    assert "intact" in out
    assert "NOT INTACT" not in out
    assert "approval apr-1: Approved by carol@example.com" in out
    assert "10, 1 refused" in out


def test_show_raw_prints_stored_lines(store: FileStore, capsys: pytest.CaptureFixture[str]) -> None:
    b = write_session(store, "s-a")
    rc, out, _ = cli(capsys, "show", "s-a", "--store", store.url, "--raw")
    assert rc == 0
    assert out.encode() == b"".join(line + b"\n" for line in b.lines)


# ---------------------------------------------------------------------------------- replay
def test_replay_without_waiting(
    store: FileStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_session(store, "s-a")
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    rc, out, _ = cli(capsys, "replay", "s-a", "--store", store.url, "--speed", "0")
    assert rc == 0
    assert slept == []
    assert "allow: SELECT id, email FROM customers LIMIT 2" in out
    assert "2 rows · 1.2 ms · SELECT 2" in out or "2 rows · 1.3 ms · SELECT 2" in out
    assert "b***@example.com" in out
    assert "email" in out
    assert "REFUSE: DROP TABLE orders" in out
    assert "error 42501" in out
    assert "approval apr-1: Approved by carol@example.com" in out
    assert "session end: client terminated" in out


def test_replay_rhythm(
    store: FileStore, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    b = write_session(store, "s-a", step=0.5)
    write_session(store, "s-slow", step=60.0)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    assert cli(capsys, "replay", "s-a", "--store", store.url)[0] == 0
    assert slept == [pytest.approx(0.5)] * (b.n - 1)
    slept.clear()
    assert cli(capsys, "replay", "s-a", "--store", store.url, "--speed", "2")[0] == 0
    assert slept == [pytest.approx(0.25)] * (b.n - 1)
    slept.clear()
    assert cli(capsys, "replay", "s-slow", "--store", store.url)[0] == 0
    assert slept == [pytest.approx(5.0)] * (b.n - 1)  # capped by --max-gap
    slept.clear()
    assert cli(capsys, "replay", "s-slow", "--store", store.url, "--max-gap", "1.5")[0] == 0
    assert slept == [pytest.approx(1.5)] * (b.n - 1)
    assert cli(capsys, "replay", "s-a", "--store", store.url, "--speed", "-1")[0] == 2


# ---------------------------------------------------------------------------------- export
def test_export_html_escapes(
    store: FileStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    write_session(
        store,
        "s-a",
        extra_statement="SELECT '<script>alert(1)</script>' AS \"x\" -- & <b>",
        identity="<img src=x onerror=alert(2)>@example.com",
    )
    rc, page, _ = cli(capsys, "export", "s-a", "--store", store.url, "--format", "html")
    assert rc == 0
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    assert "<img" not in page
    assert "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;@example.com" in page
    assert "http://" not in page
    assert "https://" not in page.replace("https://idp.example.com", "")
    assert '<tr class="refused">' in page
    assert "DROP TABLE orders" in page
    assert "b***@example.com" in page  # recorded rows under the statement
    assert "intact" in page
    assert "carol@example.com" in page

    out = tmp_path / "s.html"
    rc, stdout, _ = cli(capsys, "export", "s-a", "--store", store.url, "--out", str(out))
    assert rc == 0
    assert stdout == ""
    assert out.read_text() == page


def test_export_shows_tampering(store: FileStore, capsys: pytest.CaptureFixture[str]) -> None:
    b = write_session(store, "s-a")
    tamper(store, b, "byte-middle")
    rc, page, _ = cli(capsys, "export", "s-a", "--store", store.url)
    assert rc == 0
    assert "NOT INTACT" in page
    assert f"first bad event: {MID}" in page


def test_show_marks_missing_events(store: FileStore, capsys: pytest.CaptureFixture[str]) -> None:
    b = write_session(store, "s-a")
    tamper(store, b, "chunk-middle")
    rc, out, _ = cli(capsys, "show", "s-a", "--store", store.url)
    assert rc == 0
    assert "NOT INTACT (1 problem, first bad event 6)" in out
    assert "event(s) 6-10 missing from the recording" in out


# ---------------------------------------------------------------------------------- verify
def test_verify_intact(
    store: FileStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    b = write_session(store, "s-a", key=key)
    assert len(b.chunks) >= 3
    rc, out, _ = cli(capsys, "verify", "s-a", "--store", store.url)
    assert rc == 0
    assert out.startswith("s-a  ok")
    assert "signature not checked" in out
    rc, out, _ = cli(
        capsys, "verify", "s-a", "--store", store.url, "--public-key", public_pem(tmp_path, key)
    )
    assert rc == 0
    assert "signature valid" in out
    rc, out, _ = cli(capsys, "verify", "s-a", "--store", store.url, "--json")
    result = json.loads(out)
    assert result == {
        "sessionId": "s-a",
        "ok": True,
        "problems": [],
        "firstBadSeq": None,
        "events": b.n,
        "signature": "unchecked",
        "notes": ["the manifest is signed; the signature was not checked (no --public-key)"],
    }


@pytest.mark.parametrize(
    ("how", "first_bad", "message"),
    [
        ("byte-middle", "mid", "event {mid} was changed"),
        ("byte-middle-prev", "mid", "event {mid} was changed (its prev"),
        ("not-json-middle", "mid", "does not parse"),
        ("byte-last", "n", "event {n}, the last, was changed"),
        ("removed", "mid", "event {mid} is missing"),
        ("swapped", "mid", "is stored after event"),
        ("chunk-middle", 6, "events 6\u201310 are missing (a chunk is missing?)"),
        ("chunk-last", "lastchunk", "a chunk is missing?"),
        ("manifest-missing", None, "no manifest: the session is not closed"),
        ("manifest-count", None, "the manifest was altered"),
        ("manifest-count-and-last", None, "the manifest was altered"),
        ("chunk-renamed", None, "its name says"),
    ],
)
def test_verify_detects_tampering(
    store: FileStore,
    capsys: pytest.CaptureFixture[str],
    how: str,
    first_bad: int | str | None,
    message: str,
) -> None:
    b = write_session(store, "s-a")
    assert b.n == 21
    assert len(b.chunks) == 5
    mid, n = MID, b.n
    named = {"mid": mid, "n": n, "lastchunk": 21}
    expected = named[first_bad] if isinstance(first_bad, str) else first_bad
    tamper(store, b, how)

    rc, out, _ = cli(capsys, "verify", "s-a", "--store", store.url, "--json")
    result = json.loads(out)
    assert rc == 1, result
    assert result["ok"] is False, result
    assert result["firstBadSeq"] == expected, result
    want = message.format(mid=mid, n=n)
    assert any(want in p for p in result["problems"]), result["problems"]

    rc, out, _ = cli(capsys, "verify", "s-a", "--store", store.url)
    assert rc == 1
    assert "NOT INTACT" in out
    if expected is not None:
        assert f"first bad event {expected}" in out
    assert want in out


def test_verify_names_the_changed_event_by_its_links(store: FileStore) -> None:
    """Link (i-1 → i) broken alone: event i-1's bytes changed; with (i → i+1) too: event i."""
    b = write_session(store, "s-a")
    k = 8
    rewrite(store, b, k, lambda ls, i: [*ls[:i], change_byte(ls[i], b'"identity":"'), *ls[i + 1 :]])
    r = verify_session(store, "s-a")
    assert not r.ok
    assert r.first_bad_seq == k, r.problems
    assert len(r.problems) == 1, r.problems
    assert r.problems[0].startswith(f"event {k} was changed (event {k + 1} does not chain")

    b = write_session(store, "s-b")
    # event k's prev altered AND its hash therefore too: both links broken
    rewrite(store, b, k, lambda ls, i: [*ls[:i], change_prev(ls[i]), *ls[i + 1 :]])
    r = verify_session(store, "s-b")
    assert r.first_bad_seq == k, r.problems
    assert len(r.problems) == 1, r.problems

    # an event from another session: its sessionId says so, and it cannot chain here
    b = write_session(store, "s-c")
    other = write_session(FileStore(store.root.parent / "other"), "s-x")
    rewrite(store, b, 5, lambda ls, i: [*ls[:i], other.lines[4], *ls[i + 1 :]])
    r = verify_session(store, "s-c")
    assert r.first_bad_seq == 5
    assert any("belongs to session 's-x'" in p for p in r.problems)


def test_verify_signature(
    store: FileStore, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    good, wrong = public_pem(tmp_path, key), public_pem(tmp_path, other, "other.pem")
    b = write_session(store, "s-a", key=key)
    write_session(store, "s-unsigned")

    rc, out, _ = cli(capsys, "verify", "s-a", "--store", store.url, "--public-key", wrong)
    assert rc == 1
    assert "signature does not verify" in out

    rc, out, _ = cli(capsys, "verify", "s-unsigned", "--store", store.url, "--public-key", good)
    assert rc == 1
    assert "not signed" in out

    # altered manifest, chain untouched: only the signature tells
    m = json.loads(store.get(manifest_key(b.prefix)))
    m["endReason"] = "nothing to see"
    store.put(manifest_key(b.prefix), json.dumps(m).encode())
    rc, out, _ = cli(capsys, "verify", "s-a", "--store", store.url)
    assert rc == 0
    assert "signature not checked" in out
    rc, out, _ = cli(capsys, "verify", "s-a", "--store", store.url, "--public-key", good, "--json")
    result = json.loads(out)
    assert rc == 1
    assert result["signature"] == "invalid"
    assert result["firstBadSeq"] is None

    # a private key's PEM works as the public key too
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    )
    m["endReason"] = "client terminated"
    store.put(manifest_key(b.prefix), json.dumps(m).encode())
    rc, out, _ = cli(
        capsys, "verify", "s-a", "--store", store.url, "--public-key", str(tmp_path / "k.pem")
    )
    assert rc == 0
    assert "signature valid" in out


def test_verify_all(store: FileStore, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "verify", "--all", "--store", store.url)
    assert rc == 0
    assert "no matching sessions" in err
    write_session(store, "s-a")
    b = write_session(store, "s-b", connection="billing-db", start=T0 + 86400)
    write_session(store, "s-c", identity="alice@example.com", start=T0 + 2 * 86400)
    rc, out, _ = cli(capsys, "verify", "--all", "--store", store.url)
    assert rc == 0
    assert "3 sessions: 3 intact, 0 NOT INTACT" in out

    tamper(store, b, "swapped")
    rc, out, _ = cli(capsys, "verify", "--all", "--store", store.url, "--json")
    results = {json.loads(line)["sessionId"]: json.loads(line) for line in out.splitlines()}
    assert rc == 1
    assert [r["ok"] for r in results.values()] == [True, False, True]
    rc, out, _ = cli(capsys, "verify", "--all", "--store", store.url)
    assert rc == 1
    assert "s-b  NOT INTACT" in out
    assert "2 intact, 1 NOT INTACT" in out
    assert cli(capsys, "verify", "--all", "--store", store.url, "--connection", "orders-db")[0] == 0
    assert (
        cli(capsys, "verify", "--all", "--store", store.url, "--connection", "billing-db")[0] == 1
    )
    assert cli(capsys, "verify", "--all", "--store", store.url, "--identity", BOT)[0] == 1
    assert (
        cli(capsys, "verify", "--all", "--store", store.url, "--identity", "alice@example.com")[0]
        == 0
    )
    assert cli(capsys, "verify", "--all", "--store", store.url, "--until", "2026-11-27")[0] == 0
    assert cli(capsys, "verify", "--all", "--store", store.url, "--since", "2026-11-28")[0] == 1
    assert cli(capsys, "verify", "--all", "--store", store.url, "--since", "2026-11-29")[0] == 0

    # a session whose manifest is missing is not intact either
    (store.root / manifest_key(session_prefix("orders-db", day_of(T0), "s-a"))).unlink()
    rc, out, _ = cli(capsys, "verify", "--all", "--store", store.url, "--connection", "orders-db")
    assert rc == 1
    assert "may still be running" in out


def test_reader_api(store: FileStore) -> None:
    b = write_session(store, "s-a")
    rec = load_session(store, "s-a")
    assert [line.raw for line in rec.lines] == b.lines
    assert rec.summary().statements == 9
    assert rec.summary().refused == 1
    assert rec.manifest is not None
    assert rec.manifest.final_hash == event_hash(b.lines[-1])
    views = rec.statements
    assert [v.final_decision for v in views[:3]] == ["allow", "refuse", "approved"]


def test_tolerates_unexpected_shapes_of_optional_fields(
    store: FileStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """A field of an unexpected shape is no tampering: the event stands, verify says intact."""
    write_session(store, "s-a", odd_shapes=True)
    rec = load_session(store, "s-a")
    assert all(line.event is not None for line in rec.lines)
    assert [line.warning for line in rec.lines if line.warning] == [
        "fields of unexpected shape: rows"
    ]
    assert verify_session(store, "s-a").ok
    for action in ("show", "replay", "export"):
        rc, out, _ = cli(
            capsys,
            action,
            "s-a",
            "--store",
            store.url,
            *(["--speed", "0"] if action == "replay" else []),
        )
        assert rc == 0
        assert "b***@example.com" in out or action == "show"
    rc, out, _ = cli(capsys, "show", "s-a", "--store", store.url, "--json")
    assert any(json.loads(line)["rows"] == "many" for line in out.splitlines())


# ---------------------------------------------------------------------------------- subprocess
def test_cli_subprocess(store: FileStore) -> None:
    b = write_session(store, "s-a")
    run = [sys.executable, "-m", "pgwarden.cli", "sessions"]
    p = subprocess.run(
        [*run, "verify", "s-a", "--store", store.url], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("s-a  ok")
    p = subprocess.run(
        [*run, "show", "s-a", "--store", store.url], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0
    assert "REFUSED" in p.stdout
    assert "\x1b[" not in p.stdout
    tamper(store, b, "chunk-middle")
    p = subprocess.run(
        [*run, "verify", "s-a", "--store", store.url], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 1
    assert "first bad event 6" in p.stdout
    p = subprocess.run(
        [*run, "show", "nope", "--store", store.url], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2
    assert "no session 'nope'" in p.stderr
