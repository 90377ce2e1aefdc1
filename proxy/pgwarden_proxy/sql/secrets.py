"""Secrets inside statement text, hidden before the text is logged, recorded or shown.

A statement can carry a credential: `ALTER ROLE … PASSWORD '…'`, `CREATE USER MAPPING …
OPTIONS (password '…')`, a connection string with `password=…` (`CREATE SUBSCRIPTION`,
`dblink_connect`). The statement runs as sent; only what pgwarden writes down is redacted.
"""

from __future__ import annotations

import re

REDACTED = "[redacted]"

# a quoted literal after PASSWORD (role options) or password (FDW options); '' is a quote
_PASSWORD_LITERAL = re.compile(r"(?i)(\bpassword\s+)(E?'(?:[^']|'')*')")
# password=... in a libpq connection string (inside a literal: stops at space, quote, ;)
_CONNINFO = re.compile(r"(?i)(\bpassword\s*=\s*)([^\s';]+)")
_HINT = re.compile(r"(?i)password")


def redact(text: str) -> str:
    """`text` with the credentials it contains replaced by [redacted] (the same object when
    there is nothing to hide: the common case costs one search)."""
    if _HINT.search(text) is None:
        return text
    text = _PASSWORD_LITERAL.sub(lambda m: f"{m.group(1)}'{REDACTED}'", text)
    return _CONNINFO.sub(lambda m: m.group(1) + REDACTED, text)
