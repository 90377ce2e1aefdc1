"""Is a recording intact? (`pgwarden sessions verify`, docs/recording.md "Verifying").

Checks, for one session: every line parses as an event of this session; `seq` runs 1, 2, 3 …
without gaps, duplicates or reordering; each event's `prev` is the hash of the line before it
(the first: `genesis(sessionId)`); chunk names agree with their content; the manifest exists and
its count, last seq and final hash match; with a trusted public key, its signature verifies.

When something is wrong it names the first bad event. A changed line breaks the link to the
next event; a changed `prev` also the link to it. So when the link (i-1 → i) breaks and the link
(i → i+1) breaks too (or i is the last and the manifest's final hash is not its hash), event i
was changed; when only (i-1 → i) breaks, event i-1 was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgwarden.recording.format import event_hash, genesis, manifest_signature_ok
from pgwarden.recording.reader import (
    Recording,
    StoredLine,
    in_window,
    iter_recordings,
    load_session,
)
from pgwarden.recording.store import Store

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_LAST = 1 << 62  # sort key of problems that name no event
DASH = "\u2013"  # en dash, for ranges of events


@dataclass
class VerifyResult:
    session_id: str
    ok: bool
    problems: list[str]
    first_bad_seq: int | None
    events: int  # event lines stored
    notes: list[str] = field(default_factory=list)  # not problems (e.g. signature not checked)
    signature: str = "absent"  # valid | invalid | unchecked | absent

    def as_json(self) -> dict[str, Any]:
        return {
            "sessionId": self.session_id,
            "ok": self.ok,
            "problems": self.problems,
            "firstBadSeq": self.first_bad_seq,
            "events": self.events,
            "signature": self.signature,
            "notes": self.notes,
        }


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (a private key's PEM gives its public key).
    Raises ValueError with a message for people."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.serialization import (
        load_pem_private_key,
        load_pem_public_key,
    )

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read public key {path}: {e.strerror or e}") from None
    key: Any
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        try:
            key = load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{path} holds no PEM public key") from None
        if isinstance(key, Ed25519PrivateKey):
            key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 key (manifests are signed with Ed25519)")
    return key


def _span(a: int, b: int) -> str:
    return f"event {a} is" if a == b else f"events {a}{DASH}{b} are"


class _Check:
    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.problems: list[tuple[int, str]] = []
        self.bad: list[int] = []
        self.named: set[int] = set()  # events already named as changed

    def problem(self, message: str, seq: int | None = None) -> None:
        self.problems.append((seq if seq is not None else _LAST, message))
        if seq is not None:
            self.bad.append(seq)

    def changed(self, seq: int, message: str) -> None:
        if seq not in self.named:
            self.named.add(seq)
            self.problem(message, seq)


def verify_recording(rec: Recording, public_key: Ed25519PublicKey | None = None) -> VerifyResult:
    """Verify a session already read (see the module's docstring for what is checked)."""
    c = _Check(rec)
    sid = rec.session_id
    lines: list[StoredLine] = rec.lines
    n = len(lines)
    seqs = [line.event.seq if line.event is not None else None for line in lines]
    hashes = [event_hash(line.raw) for line in lines]
    first_in_chunk = {id(ch.lines[0]) for ch in rec.chunks if ch.lines}
    # the last line of a chunk whose name says it ends there
    whole_end = {
        id(ch.lines[-1])
        for ch in rec.chunks
        if ch.lines and ch.lines[-1].event is not None and ch.lines[-1].event.seq == ch.last
    }

    def ends_whole_chunk(line: StoredLine) -> bool:
        return id(line) in whole_end

    manifest = rec.manifest

    # -- objects that are no chunk, chunks whose name disagrees with their content
    for key in rec.stray:
        c.problem(f"unexpected object {key} among the chunks")
    for ch in rec.chunks:
        if not ch.lines:
            c.problem(f"chunk {ch.name} is empty", ch.first)
            continue
        got = [line.event.seq for line in ch.lines if line.event is not None]
        lo, hi = (got[0], got[-1]) if got else (None, None)
        if lo != ch.first or hi != ch.last or len(ch.lines) != ch.last - ch.first + 1:
            held = f"events {lo}{DASH}{hi}" if got else "no readable event"
            c.problem(
                f"chunk {ch.name} holds {held} in {len(ch.lines)} lines, its name says "
                f"{ch.first}{DASH}{ch.last} ({ch.last - ch.first + 1} events)"
            )

    # -- every line an event of this session
    for p, line in enumerate(lines):
        guess = (seqs[p - 1] or 0) + 1 if p > 0 else 1
        if line.event is None:
            c.problem(f"{line.where} (event {guess}?) does not parse: {line.error}", guess)
        elif line.event.session_id != sid:
            c.problem(
                f"event {line.event.seq} ({line.where}) belongs to session "
                f"{line.event.session_id!r}, not to this one",
                line.event.seq,
            )
    if n == 0:
        c.problem("no events are stored for this session", 1)

    # -- seq 1..n: gaps, duplicates, order; the first position out of step is the first bad
    for p, s in enumerate(seqs):
        if s != p + 1:
            c.bad.append(p + 1)
            break
    present = [s for s in seqs if s is not None]
    by_seq: dict[int, int] = {}
    for p, s in enumerate(seqs):
        if s is not None:
            by_seq.setdefault(s, p)
    max_seq = max(present, default=0)
    dupes = sorted(s for s, k in Counter(present).items() if k > 1)
    for s in dupes:
        c.problem(f"event {s} is stored more than once", s)
    missing = [s for s in range(1, max_seq + 1) if s not in by_seq]
    for a, b in _ranges(missing):
        before, after = by_seq.get(a - 1), by_seq.get(b + 1)
        # whole chunks gone: the neighbours end and start chunks that are complete by their names
        ends_chunk = a == 1 or (before is not None and ends_whole_chunk(lines[before]))
        starts_chunk = after is not None and id(lines[after]) in first_in_chunk
        hint = " (a chunk is missing?)" if ends_chunk and starts_chunk else ""
        c.problem(f"{_span(a, b)} missing{hint}", a)
    for p in range(1, n):
        s, before = seqs[p], seqs[p - 1]
        if s is not None and before is not None and s < before and s not in dupes:
            c.problem(f"event {s} is stored after event {before} (events reordered)", s)
            break

    # -- the chain, between neighbours (seq i-1 stored right before seq i)
    def proper(p: int) -> bool:
        if p == 0:
            return seqs[0] == 1
        s, before = seqs[p], seqs[p - 1]
        return s is not None and before is not None and s == before + 1

    def link_ok(p: int) -> bool:
        e = lines[p].event
        return e is not None and e.prev == (genesis(sid) if p == 0 else hashes[p - 1])

    final_hash_differs = manifest is not None and (n == 0 or manifest.final_hash != hashes[-1])
    p = 0
    while p < n:
        if not proper(p) or link_ok(p) or lines[p].event is None:
            p += 1
            continue
        s = seqs[p]
        assert s is not None
        if p + 1 < n:
            nxt_known = proper(p + 1)
            nxt_breaks = nxt_known and not link_ok(p + 1)
        else:
            nxt_known = manifest is not None and manifest.last_seq == s
            nxt_breaks = nxt_known and final_hash_differs
        if p == 0:
            if nxt_breaks:
                c.changed(1, "event 1 was changed (it does not chain to the session's start)")
            else:
                c.changed(1, "event 1 does not chain to this session's id (moved here?)")
        elif nxt_breaks:
            how = (
                f"event {s + 1} does not chain to it"
                if p + 1 < n
                else "its hash is not the manifest's final hash"
            )
            c.changed(s, f"event {s} was changed (its prev is not event {s - 1}'s hash; {how})")
            p += 1  # the next link's break is this event's doing
        elif nxt_known:
            c.changed(s - 1, f"event {s - 1} was changed (event {s} does not chain to it)")
        else:
            c.changed(s - 1, f"event {s - 1} or {s} was changed (event {s} does not chain)")
        p += 1

    # -- the manifest
    if rec.manifest_error is not None:
        c.problem(f"the manifest does not parse: {rec.manifest_error}")
    elif manifest is None:
        c.problem(
            "no manifest: the session is not closed; it may still be running, or the proxy died "
            "before closing it (a restarted proxy closes it)"
        )
    else:
        if manifest.session_id != sid:
            c.problem(f"the manifest belongs to session {manifest.session_id!r}, not to this one")
        if manifest.events != manifest.last_seq:
            c.problem(
                f"the manifest was altered: it counts {manifest.events} events but its last is "
                f"event {manifest.last_seq}"
            )
        ends_at = next((p for p in range(n) if hashes[p] == manifest.final_hash), None)
        if ends_at is not None:
            end_seq = seqs[ends_at]
            if end_seq != manifest.last_seq:
                c.problem(
                    f"the manifest was altered: its final hash is that of event {end_seq}, "
                    f"but it says the last event is {manifest.last_seq}"
                )
            elif ends_at < n - 1 and end_seq is not None and max_seq > end_seq:
                c.problem(
                    f"{_span(end_seq + 1, max_seq)} stored after the session's last event "
                    f"{end_seq} (added after the fact)",
                    end_seq + 1,
                )
        elif manifest.last_seq in by_seq:
            s = manifest.last_seq
            c.changed(s, f"event {s}, the last, was changed (its hash is not the manifest's)")
        elif manifest.last_seq > max_seq:
            a, b = max_seq + 1, manifest.last_seq
            hint = " (a chunk is missing?)" if n and ends_whole_chunk(lines[-1]) else ""
            c.problem(
                f"{_span(a, b)} missing{hint}: the manifest counts {manifest.events}, "
                f"the recording ends with event {max_seq}",
                a,
            )
        else:
            c.problem("the manifest's final hash is that of no stored event (manifest altered?)")
        if not c.problems and n != manifest.events:
            c.problem(f"the manifest counts {manifest.events} events, {n} are stored")

    # -- the signature
    signature = "absent"
    notes: list[str] = []
    if manifest is not None:
        if public_key is not None:
            if manifest.signature is None:
                signature = "absent"
                c.problem("the manifest is not signed (a public key was given)")
            elif manifest_signature_ok(manifest, public_key):
                signature = "valid"
            else:
                signature = "invalid"
                c.problem(
                    "the manifest's signature does not verify with the given public key "
                    "(the manifest was altered, or signed with another key)"
                )
        elif manifest.signature is not None:
            signature = "unchecked"
            notes.append("the manifest is signed; the signature was not checked (no --public-key)")

    problems = [m for _, m in sorted(c.problems, key=lambda x: x[0])]
    return VerifyResult(
        session_id=sid,
        ok=not problems,
        problems=problems,
        first_bad_seq=min(c.bad) if c.bad and problems else None,
        events=n,
        notes=notes,
        signature=signature,
    )


def _ranges(nums: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for x in nums:
        if out and out[-1][1] == x - 1:
            out[-1] = (out[-1][0], x)
        else:
            out.append((x, x))
    return out


def verify_session(
    store: Store, session_id: str, public_key: Ed25519PublicKey | None = None
) -> VerifyResult:
    """Read and verify one session. Raises NotFound (unknown id) or StoreError."""
    return verify_recording(load_session(store, session_id), public_key)


def verify_all(
    store: Store,
    *,
    public_key: Ed25519PublicKey | None = None,
    identity: str | None = None,
    connection: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[VerifyResult]:
    """Every session in the store (matching the filters), oldest first."""
    return [
        verify_recording(rec, public_key)
        for rec in iter_recordings(
            store, identity=identity, connection=connection, since=since, until=until
        )
        if in_window(rec.start, since, until)
    ]
