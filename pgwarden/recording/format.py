"""The recording format: event records, the hash chain, object keys and manifests.

Shared by the proxy (which writes) and `pgwarden sessions` (which reads and verifies); the
description for people is docs/recording.md. An event record is one line of JSON; its hash is the
SHA-256 of exactly those bytes, and the next event of the session carries it in `prev`. So
verifying needs no canonical form: the stored bytes are what was chained.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import orjson
from pydantic import BaseModel, ConfigDict, Field

VERSION = 1
EventType = Literal["session_start", "statement", "approval", "outcome", "session_end"]


def genesis(session_id: str) -> str:
    """`prev` of a session's first event: ties the chain to its session id, so events cannot be
    moved from one session's recording into another's."""
    return hashlib.sha256(b"pgwarden-session:" + session_id.encode()).hexdigest()


def event_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def encode_event(event: dict[str, Any]) -> bytes:
    """One event record as stored (no newline): compact UTF-8 JSON."""
    return orjson.dumps(event, default=str, option=orjson.OPT_NON_STR_KEYS)


_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def iso(ts: float) -> str:
    """ISO-8601 UTC with microseconds (`2026-11-27T17:19:18.156326Z`); two per statement, so
    the date part is formatted once a second."""
    sec = int(ts)
    if sec != _second[0]:
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_second[1]}.{int((ts - sec) * 1_000_000):06d}Z"


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


# ---------------------------------------------------------------------------------- object keys
# Keys are relative to the store's root (the sink's prefix). Listing by connection and day is a
# prefix of `sessions/`; by identity a prefix of `index/identities/`; one session by id is one GET
# of `index/sessions/ID.json`.


def _part(s: str) -> str:
    return quote(s, safe="@.-_+=")


def session_prefix(connection: str, day: str, session_id: str) -> str:
    return f"sessions/{_part(connection)}/{day}/{_part(session_id)}/"


def chunk_key(prefix: str, first_seq: int, last_seq: int) -> str:
    return f"{prefix}events/{first_seq:010d}-{last_seq:010d}.jsonl"


def manifest_key(prefix: str) -> str:
    return prefix + "manifest.json"


def session_index_key(session_id: str) -> str:
    return f"index/sessions/{_part(session_id)}.json"


def identity_index_key(identity: str, day: str, session_id: str) -> str:
    return f"index/identities/{_part(identity)}/{day}/{_part(session_id)}.json"


def identity_index_prefix(identity: str) -> str:
    return f"index/identities/{_part(identity)}/"


# ---------------------------------------------------------------------------------- models
class _Shape(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="allow")


class SessionIndex(_Shape):
    """`index/sessions/ID.json` and `index/identities/…/ID.json`: where a session's objects are."""

    session_id: str = Field(alias="sessionId")
    connection: str
    identity: str
    start: str
    day: str
    prefix: str  # the session's key prefix (sessions/CONNECTION/DAY/ID/)


class Signature(_Shape):
    alg: Literal["Ed25519"] = "Ed25519"
    public_key: str = Field(alias="publicKey")  # base64 raw key: which key signed, not trust
    value: str  # base64 signature over `Manifest.signed_bytes()`


class Manifest(_Shape):
    """`manifest.json`, written when a session ends (or when a restarted proxy closes a session
    that its predecessor left open): what a complete recording must add up to."""

    v: int = VERSION
    session_id: str = Field(alias="sessionId")
    connection: str
    identity: str
    start: str
    end: str
    events: int  # how many events, seq 1..events
    last_seq: int = Field(alias="lastSeq")
    final_hash: str = Field(alias="finalHash")  # event_hash of the last event
    end_reason: str = Field(alias="endReason")
    recovered: bool = False  # closed by a restarted proxy (the session's own end was lost)
    statements: int | None = None  # None: not known (a session closed by recovery)
    signature: Signature | None = None

    def signed_bytes(self) -> bytes:
        body = self.model_dump(by_alias=True, exclude={"signature"})
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_manifest(manifest: Manifest, private_key: Any) -> Manifest:
    """Sign with an Ed25519 private key (cryptography's Ed25519PrivateKey)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sig = private_key.sign(manifest.signed_bytes())
    return manifest.model_copy(
        update={
            "signature": Signature(
                public_key=base64.b64encode(raw).decode(), value=base64.b64encode(sig).decode()
            )
        }
    )


def manifest_signature_ok(manifest: Manifest, public_key: Any) -> bool:
    """Checked against a key the reader trusts (never the one the manifest names)."""
    from cryptography.exceptions import InvalidSignature

    if manifest.signature is None:
        return False
    try:
        public_key.verify(base64.b64decode(manifest.signature.value), manifest.signed_bytes())
    except (InvalidSignature, ValueError):
        return False
    return True
