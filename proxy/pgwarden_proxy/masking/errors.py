"""Errors and notices from the server, with masked values withheld. Pure functions, no I/O.

Why: PostgreSQL puts data into its messages. `SELECT ssn::int FROM customers` fails with
`invalid input syntax for type integer: "123-45-6789"`; a unique or foreign-key violation says
`Key (email)=(alice@example.org) already exists.`; a NOT NULL or CHECK violation says `Failing row
contains (...)`, the whole row; a JSON or XML parse error echoes its input in DETAIL and CONTEXT;
`RAISE NOTICE` says anything. Masking rewrites rows, so without this the masked value would
reach the client, the recording and the log through an ErrorResponse or NoticeResponse.

`redact_report` rewrites the body of one ErrorResponse or NoticeResponse. Fields that never carry
data stay as they are: severity (S, V), SQLSTATE (C), positions (P, p), the schema, table,
column, data type and constraint names (s, t, c, d, n) and PostgreSQL's source location (F, L,
R). Every other field — message (M), detail (D), hint (H), context (W), internal query (q) and
any field this code does not know — is treated as data, by the statement's `Scope`:

- `SESSION` (the policy masks columns, the statement reads none of them): the shapes that echo
  stored rows are redacted in every message — `Key (cols)=(values)` and `Failing row contains
  (values)` keep the column names, the values become `[redacted]` (a write can show values of
  masked columns it never supplied: a foreign key still referenced, the rest of a failing row).
  Data exceptions (SQLSTATE class 22) lose the quoted input in M and D. Other messages pass.
- `READS` (the statement reads a relation with masked columns) and `UNKNOWN` (the proxy cannot
  tell what the statement is: an error at Parse or Bind, a cursor it does not know): besides the
  above, every data field is withheld unless its SQLSTATE class names objects only (syntax,
  privileges, transaction state, resources, ...: `_NAMES_ONLY`), so `column "emial" does not
  exist` and its HINT still help; class 22 keeps the message with its quoted value (and any
  number of 4+ digits) redacted, class 23 keeps the message (object names) and redacts the row
  echo in DETAIL.
- `OPAQUE` (code pgwarden cannot see: DO, CALL): as READS, but user code chooses its SQLSTATE,
  so no class is trusted. (The planner refuses both under column rules; this is a second line.)

Then the session's content detectors (with `null` as `redact`) run over every data field, in
every scope and also when the policy has detectors only. A message that changed gets a short
note appended to M, so a person or an agent knows that pgwarden, not the database, hid
something. SQLSTATE, severity and the field set stay, so clients still know what went wrong.
Redacting too much is preferred to too little: the client wrote the statement and mostly knows
its own literals; it may not learn a masked value.
"""

from __future__ import annotations

import enum
import re
from typing import Final

from pgwarden_proxy.masking.detectors import DetectorSet
from pgwarden_proxy.masking.planner import StatementPlan
from pgwarden_proxy.masking.strategies import REDACTED
from pgwarden_proxy.wire.framing import ProtocolViolation


class Scope(enum.Enum):
    """What a statement may have read, as far as its error messages are concerned."""

    SESSION = "session"  # the policy masks columns; the statement reads none
    READS = "reads"  # the statement reads a relation with masked columns
    UNKNOWN = "unknown"  # the proxy cannot tell which statement or what it reads
    OPAQUE = "opaque"  # code the proxy cannot see runs (DO, CALL)


NOTES: Final = {
    Scope.READS: "(pgwarden: value withheld: the statement reads masked columns)",
    Scope.UNKNOWN: "(pgwarden: value withheld: masked columns may be involved)",
    Scope.OPAQUE: "(pgwarden: value withheld: masked columns may be involved)",
    Scope.SESSION: "(pgwarden: value withheld: this session masks columns)",
    None: "(pgwarden: personal data masked)",
}

# Fields that carry no data (see the module docstring); all others are treated as data.
_KEEP: Final = frozenset(b"SVCPpstcdnFLR")
# SQLSTATE classes whose messages name objects, never values read from tables: syntax and
# access rules, transaction state, resources, operator intervention, system errors, ...
_NAMES_ONLY: Final = frozenset(
    {"08", "0A", "0B", "0L", "0P", "25", "26", "28", "2B", "2D", "34", "3B", "3D", "3F", "40",
     "42", "53", "54", "55", "57", "58", "72", "F0"}
)  # fmt: skip
_OPAQUE_COMMANDS: Final = frozenset({"DO", "CALL"})

_FAILING_ROW = "Failing row contains ("
# `Key (cols)=(values)`, also "Partition key of the failing row contains (cols)=(values)"
_KEY = re.compile(r"(?:\bKey|\bkey of the failing row contains) \(")
# what may follow the values, anchored at the end (`.*` first: the last occurrence wins, so a
# value that contains one of these texts is not taken for the end)
_KEY_TAILS: Final = (
    re.compile(r".*(\) already exists\.)\Z", re.S),
    re.compile(r".*(\) is duplicated\.)\Z", re.S),
    re.compile(r'.*(\) is (?:not present in|still referenced from) table "[^"]*"\.)\Z', re.S),
)
_KEY_CONFLICT = re.compile(r".*\) conflicts with (existing key|key) \(.*\Z", re.S)
_LONG_NUMBER = re.compile(r"(?<![0-9A-Za-z_])[0-9]{4,}")


def report_scope(plan: StatementPlan | None, command: str | None) -> Scope:
    """The scope of a statement's messages when the policy masks columns. `plan` is None when
    the statement is not known (or has no plan although masking applies)."""
    if command in _OPAQUE_COMMANDS:
        return Scope.OPAQUE
    if plan is None:
        return Scope.UNKNOWN
    return Scope.READS if plan.outputs is not None else Scope.SESSION


def redact_report(
    body: bytes, encoding: str, scope: Scope | None, detectors: DetectorSet | None
) -> bytes | None:
    """The body of an ErrorResponse/NoticeResponse with masked values withheld; None when
    nothing changes. `scope` is None when the policy masks no columns (detectors only)."""
    fields = _split(body)
    sqlstate = next((v.decode("ascii", "replace") for c, v in fields if c == 67), "")
    cls = sqlstate[:2]
    changed = False
    withheld = False
    out: list[tuple[int, bytes]] = []
    for code, raw in fields:
        if code in _KEEP:
            out.append((code, raw))
            continue
        text = raw.decode(encoding, errors="replace")
        new = text
        if scope is not None:
            new = _redact_field(code, new, cls, scope)
            withheld = withheld or new != text
        if detectors is not None:
            found = detectors.scan(new)
            if found is not None:
                new = found if isinstance(found, str) else REDACTED
        if new != text:
            changed = True
            out.append((code, new.encode(encoding, errors="replace")))
        else:
            out.append((code, raw))
    if not changed:
        return None
    note = NOTES[scope if withheld else None].encode(encoding, errors="replace")
    for i, (code, value) in enumerate(out):
        if code == 77:  # M
            out[i] = (code, value + b" " + note)
            break
    return b"".join(bytes((code,)) + value + b"\x00" for code, value in out) + b"\x00"


def _redact_field(code: int, text: str, cls: str, scope: Scope) -> str:
    echo = _row_echo(text)
    if echo is not None:
        return echo
    if scope is Scope.SESSION:
        if cls == "22" and code in (77, 68):  # M, D of a data exception: the quoted input
            return _quoted(text)
        return text
    if scope is not Scope.OPAQUE and cls in _NAMES_ONLY:
        return text
    if code == 77 and scope is not Scope.OPAQUE:
        if cls == "22":  # and numbers a value may have fed (`chr(n)`: `... encoding: n`)
            return _LONG_NUMBER.sub(REDACTED, _quoted(text, strict=True))
        if cls == "23":  # integrity violations name the constraint and relation only
            return text
    return REDACTED if text else text


def _row_echo(text: str) -> str | None:
    """`Key (cols)=(values)...` and `Failing row contains (values).` with the values
    redacted (everything after them too, but for the known endings); None: no such shape."""
    out = None
    at = text.find(_FAILING_ROW)
    if at >= 0:
        text = out = text[:at] + _FAILING_ROW + REDACTED + ")."
    m = _KEY.search(text)
    if m is None:
        return out
    start = m.end()
    eq = text.find(")=(", start)
    if eq < 0:
        return out  # `Key (cols) is not present ...`: no values
    head = text[:eq] + ")=(" + REDACTED
    rest = text[eq + 3 :]
    for tail in _KEY_TAILS:
        t = tail.match(rest)
        if t is not None:
            return head + t.group(1)
    c = _KEY_CONFLICT.match(rest)
    if c is not None:
        cols = text[start:eq]
        return f"{head}) conflicts with {c.group(1)} ({cols})=({REDACTED})."
    return head + (")." if rest.endswith(").") else ")")


def _quoted(text: str, strict: bool = False) -> str:
    """The text with its quoted part, from the first `"` to the last, redacted (PostgreSQL
    does not escape quotes inside a quoted value); a `: ...` after it goes too
    (`invalid byte sequence for encoding "UTF8": 0xe9 0x41`); `strict`: what follows `: ` in
    a text without quotes too."""
    first = text.find('"')
    if first < 0:
        colon = text.find(": ") if strict else -1
        return text if colon < 0 else text[: colon + 2] + REDACTED
    last = text.rfind('"')
    rest = text[last + 1 :] if last > first else ""
    if rest.lstrip().startswith(":"):
        rest = ": " + REDACTED
    return f'{text[:first]}"{REDACTED}"{rest}'


def _split(body: bytes) -> list[tuple[int, bytes]]:
    fields: list[tuple[int, bytes]] = []
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            raise ProtocolViolation("an ErrorResponse or NoticeResponse field without its end")
        fields.append((body[pos], body[pos + 1 : end]))
        pos = end + 1
    if pos != n - 1:
        raise ProtocolViolation("an ErrorResponse or NoticeResponse without its terminator")
    return fields
