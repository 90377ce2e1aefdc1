"""Masking strategies: how one value is hidden. Pure functions of the value, no I/O.

A `Masker` applies one `MaskStrategy` of an AccessPolicy to text values (str in, str or None
out). Every strategy is deterministic, never raises on any str (empty, unicode, lone surrogates,
megabytes) and never hands back a non-empty value unchanged, with two harmless exceptions:
`redact` of the literal marker `[redacted]`, and `partial` of a value that already has a masked
shape (it contains `***`, e.g. `J***`).

- `redact`: the value becomes `[redacted]` (`REDACTED`), whatever it was, the empty string too.
- `null`: the value becomes SQL NULL (`mask` returns None).
- `hash`: `hmac:` and the first 24 hex digits (96 bits) of HMAC-SHA256(key, UTF-8 of the value),
  e.g. `hmac:7b1e0c4f2a9d3e8b5c6a1f04`. The same key and value always give the same output, in a
  column and in free text alike (the kind is not hashed), so equality tests and joins on hashed
  values keep working; without the key a value can neither be recovered nor confirmed by
  guessing; another key gives unrelated outputs.
- `partial`: keeps a documented shape, chosen by the value's kind: the detector that found it in
  free text, or None for a whole column value. A value that does not fit its kind's shape (or an
  unknown kind) gets the generic shape.

  - `email`: first character of the local part, `***`, the domain:
    `alice@example.org` -> `a***@example.org`.
  - `credit-card`: digits but the last 4 become `*`, spaces and dashes stay:
    `4111-1111-1111-1234` -> `****-****-****-1234`.
  - `us-ssn`: `***-**-` and the serial: `123-45-6789` -> `***-**-6789`.
  - `phone`: digits but the last 2 become `*`; `+`, spaces, dashes, dots and parentheses stay:
    `+1 (555) 123-4567` -> `+* (***) ***-**67`.
  - `iban`: the country code and the last 4 characters stay, other letters and digits become
    `*`, spaces stay: `GB82 WEST 1234 5698 7654 32` -> `GB** **** **** **** **54 32`.
  - `ip-address`: IPv4 keeps the first octet (`10.1.2.3` -> `10.*.*.*`), IPv6 the first group
    (`2001:db8::1` -> `2001:*:*:*:*:*:*:*`).
  - `secret`: the first 4 characters and `***` (`sk_live_abc123...` -> `sk_l***`); a secret
    shorter than 12 characters becomes `***`.
  - None (a whole column value) and anything that fits no other shape: a value that fits a shape
    above keeps it (tried in the order email, us-ssn, credit-card, iban, ip-address, phone: a
    column of SSNs shows `***-**-6789`); otherwise the first character and `***` (`John Smith`
    -> `J***`), and a value of 1 to 3 characters becomes `***`, so the length is never revealed.
    The empty string stays empty.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable
from typing import Final

from pgwarden.api.policy import MaskStrategy

REDACTED: Final = "[redacted]"
HASH_PREFIX: Final = "hmac:"
HASH_HEX_DIGITS: Final = 24
STARS: Final = "***"

_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.){1,126}[A-Za-z]{2,63}", re.ASCII
)
_DOMAIN = re.compile(r"(?:[A-Za-z0-9-]{1,63}\.){1,126}[A-Za-z]{2,63}", re.ASCII)
_CARD = re.compile(r"[0-9][0-9 -]*[0-9]", re.ASCII)
_SSN = re.compile(r"[0-9]{3}-[0-9]{2}-([0-9]{4})", re.ASCII)
_PHONE = re.compile(r"[0-9+() .-]+", re.ASCII)
_IBAN = re.compile(r"[A-Za-z]{2}[0-9]{2}[A-Za-z0-9]{11,30}", re.ASCII)
_DIGITS: Final = frozenset("0123456789")


# A whole column value takes the first of these shapes it fits (a column of SSNs keeps the
# SSN shape); the phone shape comes last, it fits many digit strings.
_COLUMN_SHAPES: Final = ("us-ssn", "credit-card", "iban", "ip-address", "phone")


def _generic(value: str) -> str:
    if not value:
        return ""
    if _EMAIL.fullmatch(value):
        return _email(value) or STARS
    for kind in _COLUMN_SHAPES:
        shaped = _SHAPES[kind](value)
        if shaped is not None and shaped != value:
            return shaped
    if len(value) < 4:
        return STARS
    return value[0] + STARS


def _email(value: str) -> str | None:
    local, at, domain = value.rpartition("@")
    if not at or not _DOMAIN.fullmatch(domain):
        return None
    return local[:1] + STARS + "@" + domain


def _star_digits(value: str, keep_last: int) -> str:
    """Every ASCII digit but the last `keep_last` becomes `*`; other characters stay."""
    out = list(value)
    kept = 0
    for i in range(len(out) - 1, -1, -1):
        if out[i] in _DIGITS:
            if kept < keep_last:
                kept += 1
            else:
                out[i] = "*"
    return "".join(out)


def _digit_count(value: str) -> int:
    return sum(1 for ch in value if ch in _DIGITS)


def _card(value: str) -> str | None:
    if not _CARD.fullmatch(value) or _digit_count(value) < 12:
        return None
    return _star_digits(value, 4)


def _ssn(value: str) -> str | None:
    m = _SSN.fullmatch(value)
    return None if m is None else "***-**-" + m.group(1)


def _phone(value: str) -> str | None:
    if not _PHONE.fullmatch(value) or _digit_count(value) < 7:
        return None
    return _star_digits(value, 2)


def _iban(value: str) -> str | None:
    if not _IBAN.fullmatch(value.replace(" ", "")):
        return None
    total = len(value) - value.count(" ")
    out: list[str] = []
    seen = 0
    for ch in value:
        if ch == " ":
            out.append(ch)
            continue
        out.append(ch if seen < 2 or seen >= total - 4 else "*")
        seen += 1
    return "".join(out)


def _ip(value: str) -> str | None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv4Address):
        return str(address).split(".", 1)[0] + ".*.*.*"
    return format(int(address) >> 112, "x") + ":*" * 7


def _secret(value: str) -> str:
    return value[:4] + STARS if len(value) >= 12 else STARS


_SHAPES: Final[dict[str, Callable[[str], str | None]]] = {
    "email": _email,
    "credit-card": _card,
    "us-ssn": _ssn,
    "phone": _phone,
    "iban": _iban,
    "ip-address": _ip,
    "secret": _secret,
}


def partial(value: str, kind: str | None = None) -> str:
    """The `partial` shape of `value` for `kind` (see the module docstring)."""
    if not value:
        return ""
    shape = _SHAPES.get(kind) if kind is not None else None
    out = shape(value) if shape is not None else None
    if out is None or out == value:
        return _generic(value)
    return out


class Masker:
    """Applies one strategy to values (str in, str | None out)."""

    __slots__ = ("_key", "_mask", "strategy")

    def __init__(self, strategy: MaskStrategy, hash_key: bytes) -> None:
        self.strategy = MaskStrategy(strategy)
        if self.strategy is MaskStrategy.HASH and not hash_key:
            raise ValueError("the hash strategy needs a non-empty key")
        self._key = bytes(hash_key)
        self._mask: Callable[[str, str | None], str | None] = {
            MaskStrategy.REDACT: _redact,
            MaskStrategy.NULL: _null,
            MaskStrategy.HASH: self._hash,
            MaskStrategy.PARTIAL: partial,
        }[self.strategy]

    def __repr__(self) -> str:
        return f"Masker({self.strategy.value})"

    def mask(self, value: str, kind: str | None = None) -> str | None:
        """The masked value; None means SQL NULL (only the `null` strategy answers None)."""
        return self._mask(value, kind)

    def _hash(self, value: str, kind: str | None = None) -> str:
        data = value.encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, data, hashlib.sha256).hexdigest()
        return HASH_PREFIX + digest[:HASH_HEX_DIGITS]


def _redact(value: str, kind: str | None = None) -> str:
    return REDACTED


def _null(value: str, kind: str | None = None) -> None:
    return None
