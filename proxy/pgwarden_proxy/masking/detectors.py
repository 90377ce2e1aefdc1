"""Content detectors: personal data and secrets inside free text. Pure functions, no I/O.

`DetectorSet.scan(text)` replaces every finding with its masker's output for the finding's kind
(the detector's name: `masker.mask("alice@example.org", kind="email")`). It answers:

- None when nothing was found (the common case: the caller passes the original bytes on),
- `NULL` when the whole value must become SQL NULL: a detector whose strategy is `null` found
  something (checked before overlaps are resolved, so it always wins), or a masker answered None,
- otherwise the text with the findings replaced.

Findings never overlap: of overlapping findings the one that starts first wins, then the longest,
then the strictest strategy (null > redact > hash > partial). The winner is stretched to the end
of any finding it partly overlaps (`a@b.orgc@d.org` is one finding), so no part of a finding is
left unmasked and nothing is masked twice. A detector named twice keeps its strictest strategy.
Matching is ASCII only: other scripts' digits are not digits here, and internationalised email
addresses are not detected.

Detectors (what counts as a finding):

- `email`: `local@domain.tld`, the local part of letters, digits and `._%+-`, a dotted domain
  whose last label has 2 to 63 letters. Not findings: `user@localhost`, `@mention`, `pkg@1.2.3`,
  and `user:password@host` inside a URI (its password is a `secret`).
- `credit-card`: 13 to 19 digits, contiguous or grouped by single spaces or single dashes (the
  same separator throughout; a first group of 4 digits, middle groups of 4 to 6, a last one of 1
  to 6), starting with 2 to 6 (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay) and
  passing the Luhn check. Digit runs glued to letters, dots or longer numbers (`12-4111...`)
  are not findings; a card followed by more digit groups (`4111 1111 1111 1111 123`) is found
  without them.
- `us-ssn`: `AAA-GG-SSSS` with dashes only (spaces or no separator would match too much), area
  not 000, 666 or 900-999, group not 00, serial not 0000.
- `phone`: `+` and a country code with 8 to 15 digits in all, the digits optionally separated by
  single spaces, dots or dashes, one parenthesised group allowed (`+44 (0)20 7946 0958`); and
  North American numbers `(555) 123-4567`, `555-123-4567`, `555.123.4567`, `555 123 4567` (the
  same separator twice, an area code starting 2-9), optionally after `1-`, `1 ` or `+1 `.
  Dates, times, version numbers, SSNs and bare integers are not phone numbers.
- `iban`: an ISO 13616 country code in upper case, 2 check digits and 11 to 30 upper-case
  letters or digits, contiguous or in groups of 4 separated by single spaces
  (`GB82 WEST 1234 5698 7654 32`), passing the mod-97 check. Lower-case IBANs are not detected.
- `ip-address`: dotted-quad IPv4 (octets 0-255 without leading zeros) that is not part of a
  longer dotted number (`1.2.3.4.5`) nor glued to a word (`v1.2.3.4`); IPv6 validated by
  `ipaddress`, where a compressed form (with `::`) needs two groups, five hex digits and a
  decimal digit (so `::1`, `a::b`, `x[1::2]` are not findings). A four-part version number such
  as `1.2.3.4` is an IPv4 address to this detector.
- `secret`: AWS access key ids (`AKIA`/`ASIA` and 16 upper-case letters or digits); GitHub
  tokens (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` and 30+ characters, `github_pat_` and 22+);
  Slack tokens (`xoxa-`, `xoxb-`, `xoxp-`, `xoxr-` and 10+); Stripe keys (`sk_live_`,
  `sk_test_`, `rk_live_`, `rk_test_` and 10+); Google API keys (`AIza` and 35); JWTs (three
  base64url parts, header and payload starting `eyJ`); PEM and PGP private keys from
  `-----BEGIN ... PRIVATE KEY-----` to the END line (or to the end of a cut-off text); the
  password of a URI (`postgres://app:PASSWORD@host`); `Bearer` tokens of 20+ characters; and
  values of 6+ characters assigned with `=` or `:` to a key named password, passwd, passphrase,
  secret, secret_key, client_secret, api_key, apikey, access_key, private_key, access_token,
  auth_token or refresh_token, possibly prefixed (`DB_PASSWORD=...`, `"password": "..."`,
  `password = '...'`). Of an assignment, URI or Bearer header only the value is the finding.
  Placeholders are not findings: `null`, `none`, `nil`, `true`, `false`, `undefined`, the key
  words themselves, values starting with `$`, `%`, `{`, `<`, `:` or `?`, values containing `***`
  or `redacted`; nor are unquoted values that read as code (`self._password`, `db.users`,
  `token_hex(16)`, `db_password`, `_secret`).
  Not detected: SQL `PASSWORD 'x'` without `=`, and free-form secrets without a known shape.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple

from pgwarden.api.policy import Detector, MaskStrategy
from pgwarden_proxy.masking.strategies import Masker


class Nullify(enum.Enum):
    """The type of `NULL`, the answer of `scan` when the whole value must become SQL NULL."""

    NULL = "null"


NULL: Final = Nullify.NULL
"""`scan` answers this when the whole value must become SQL NULL (a `null` strategy fired)."""


class Finding(NamedTuple):
    """`text[start:end]` is personal data or a secret of the kind `detector`."""

    start: int
    end: int
    detector: Detector


_Span = tuple[int, int]
# (text, number of ASCII digits in it, whether `_nine_digits` found a cluster)
_NumericFinder = Callable[[str, int, bool], list[_Span]]

_WORD: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_STRICTNESS: Final = {
    MaskStrategy.PARTIAL: 1,
    MaskStrategy.HASH: 2,
    MaskStrategy.REDACT: 3,
    MaskStrategy.NULL: 4,
}
_LOCAL: Final = _WORD | frozenset(".%+-")

_DIGIT_BYTES: Final = b"0123456789"
# 9 digits with at most 2 of ` .()-` between neighbours, searched from the start of such a
# cluster only: a necessary condition for a credit card, an SSN and a North American phone.
_nine_digits: Final = re.compile(
    r"[0-9](?<![0-9][0-9])(?<![0-9][ .()-][0-9])(?<![0-9][ .()-]{2}[0-9])"
    r"(?:[ .()-]{0,2}+[0-9]){8}",
    re.ASCII,
).search

# Most patterns start with a character class or a literal and check the character before it
# with a lookbehind placed after it: the regex engine then skips quickly to the positions where
# that class matches instead of trying every position.

# --- email -------------------------------------------------------------------------------

# Found from the `@`: the local part is the run of local-part characters before it.
_EMAIL_DOMAIN_RE: Final = re.compile(
    r"@(?:[A-Za-z0-9-]++\.)+[A-Za-z]{2,63}(?![A-Za-z0-9_-]|\.[A-Za-z0-9])", re.ASCII
)
_LOCAL_RUN: Final = re.compile(r"[A-Za-z0-9._%+-]*+", re.ASCII)
_URI_USER_BEFORE: Final = re.compile(r"://[^\s:/?#@\[\]]+\Z", re.ASCII)


def _local_length(backwards: str) -> int:
    m = _LOCAL_RUN.match(backwards)
    return 0 if m is None else m.end()


def _find_emails(text: str) -> list[_Span]:
    spans: list[_Span] = []
    at = text.find("@")
    while at >= 0:
        m = _EMAIL_DOMAIN_RE.match(text, at)
        if m is None:
            at = text.find("@", at + 1)
            continue
        end = m.end()
        at_next = text.find("@", end)
        # The local part, read backwards from the `@`.
        start = at - _local_length(text[max(0, at - 64) : at][::-1])
        while start and text[start - 1] in _LOCAL:  # longer than 64 characters
            start -= 1
        local = text[start:at].lstrip(".")
        start = at - len(local)
        # `scheme://user:password@host` holds a password, not an email address.
        if local.strip("._%+-") and not (
            text[start - 1 : start] == ":"
            and _URI_USER_BEFORE.search(text, max(0, start - 256), start - 1)
        ):
            spans.append((start, end))
        at = at_next
    return spans


# --- credit cards ------------------------------------------------------------------------

_CARD_RE: Final = re.compile(
    r"[0-9](?<![A-Za-z0-9_.][0-9])(?<![0-9]-[0-9])"
    r"[0-9]*+(?:(?P<sep>[ -])[0-9]++(?:(?P=sep)[0-9]++)*+)?+",
    re.ASCII,
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i & 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _find_cards(text: str, digits: int, cluster: bool) -> list[_Span]:
    spans: list[_Span] = []
    if digits < 13 or not cluster:
        return spans
    n = len(text)
    for m in _CARD_RE.finditer(text):
        start, end = m.span()
        if end - start < 13:
            continue
        sep = m.group("sep")
        groups: list[_Span] = []
        if sep is None:
            groups.append((start, end))
        else:
            pos = start
            for part in m.group().split(sep):
                groups.append((pos, pos + len(part)))
                pos += len(part) + 1
        # The last group may not be glued to a word or continue as a decimal or a range.
        glued = end < n and (
            text[end] in _WORD or (text[end] in ".-" and end + 1 < n and text[end + 1].isdigit())
        )
        usable = len(groups) - 1 if glued else len(groups)
        i = 0
        while i < usable:
            best = -1
            first_start, first_end = groups[i]
            first = first_end - first_start
            if not "2" <= text[first_start] <= "6":
                pass
            elif first != 4:  # a card in one piece
                if 13 <= first <= 19 and _luhn(text[first_start:first_end]):
                    best = i
            else:  # 4 digits, then groups of 4 to 6 digits, the last of 1 to 6
                number = text[first_start:first_end]
                for j in range(i + 1, usable):
                    a, b = groups[j]
                    if b - a > 6:
                        break
                    if j > i + 1 and not 4 <= groups[j - 1][1] - groups[j - 1][0] <= 6:
                        break
                    number += text[a:b]
                    if len(number) > 19:
                        break
                    if len(number) >= 13 and _luhn(number):
                        best = j
            if best >= 0:
                spans.append((first_start, groups[best][1]))
                i = best + 1
            else:
                i += 1
    return spans


# --- US social security numbers ----------------------------------------------------------

_SSN_RE: Final = re.compile(
    r"[0-9](?<![A-Za-z0-9_.][0-9])(?<![0-9]-[0-9])[0-9]{2}-[0-9]{2}-[0-9]{4}"
    r"(?![A-Za-z0-9_]|[.-][0-9])",
    re.ASCII,
)


def _find_ssns(text: str, digits: int, cluster: bool) -> list[_Span]:
    spans: list[_Span] = []
    if not cluster or text.count("-") < 2:
        return spans
    for m in _SSN_RE.finditer(text):
        s = m.group()
        area, group, serial = s[:3], s[4:6], s[7:]
        if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
            continue
        spans.append(m.span())
    return spans


# --- phone numbers -----------------------------------------------------------------------

_PHONE_INTL_RE: Final = re.compile(
    r"\+(?<![A-Za-z0-9_+]\+)[1-9][0-9]*+(?:[ .-]?\([0-9]{1,5}\))?+(?:[ .-]?+[0-9]++)*+"
    r"(?![A-Za-z0-9_])",
    re.ASCII,
)
# North American numbers: `(555) 123-4567` and `555-123-4567` (same separator twice) are found
# by two patterns starting with a literal and a class; the character before them and an
# optional `1-` or `+1 ` in front are checked in Python.
_PHONE_NA_PAREN_RE: Final = re.compile(
    r"\([2-9][0-9]{2}\)[ ]?[0-9]{3}[ .-][0-9]{4}(?![A-Za-z0-9_]|[.-][0-9])", re.ASCII
)
_PHONE_NA_RE: Final = re.compile(
    r"[2-9](?<![0-9][2-9])[0-9]{2}(?P<s>[ .-])[0-9]{3}(?P=s)[0-9]{4}"
    r"(?![A-Za-z0-9_]|[.-][0-9])",
    re.ASCII,
)
_PHONE_NA_PREFIX: Final = re.compile(r"(?<![A-Za-z0-9_.+-])\+?1[ .-]?\Z", re.ASCII)
_NOT_BEFORE_PHONE: Final = _WORD | frozenset(".+")


def _find_phones(text: str, digits: int, cluster: bool) -> list[_Span]:
    spans: list[_Span] = []
    if "+" in text:
        for m in _PHONE_INTL_RE.finditer(text):
            if 8 <= sum(ch.isdigit() for ch in m.group()) <= 15:
                spans.append(m.span())
    if digits < 10 or not cluster:
        return spans
    for pattern in (_PHONE_NA_PAREN_RE, _PHONE_NA_RE):
        for m in pattern.finditer(text):
            start, end = m.span()
            prefix = _PHONE_NA_PREFIX.search(text, max(0, start - 3), start)
            if prefix is not None:
                start = prefix.start()
            elif start and (
                text[start - 1] in _NOT_BEFORE_PHONE
                or (text[start - 1] == "-" and text[start - 2 : start - 1].isdigit())
            ):
                continue
            spans.append((start, end))
    return spans


# --- IBAN --------------------------------------------------------------------------------

_COUNTRY_CODES: Final = (
    "ADAEALATAZBABEBGBHBIBRBYCHCRCYCZDEDJDKDOEEEGESFIFKFOFRGBGEGIGLGRGTHNHRHUIEILIQISITJOKWKZLB"
    "LCLILTLULVLYMCMDMEMKMNMRMTMUNINLNOOMPKPLPSPTQARORSRUSASCSDSESISKSMSOSTSVTLTNTRUAVAVGXKYE"
)
_IBAN_COUNTRIES: Final = frozenset(
    _COUNTRY_CODES[i : i + 2] for i in range(0, len(_COUNTRY_CODES), 2)
)
_IBAN_RE: Final = re.compile(
    r"[A-Z](?<![A-Za-z0-9_][A-Z])[A-Z][0-9]{2}"
    r"(?:[A-Z0-9]{11,30}+|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)(?![A-Za-z0-9_])",
    re.ASCII,
)


def _iban_ok(compact: str) -> bool:
    if compact[:2] not in _IBAN_COUNTRIES or not 15 <= len(compact) <= 34:
        return False
    number = "".join(str(int(ch, 36)) for ch in compact[4:] + compact[:4])
    return int(number) % 97 == 1


def _find_ibans(text: str, digits: int, cluster: bool) -> list[_Span]:
    spans: list[_Span] = []
    if len(text) < 15 or text.islower():
        return spans
    for m in _IBAN_RE.finditer(text):
        start = m.start()
        candidate = m.group()
        # A grouped IBAN may be followed by a 4-character word: try without trailing groups.
        while len(candidate) >= 15:
            if _iban_ok(candidate.replace(" ", "")):
                spans.append((start, start + len(candidate)))
                break
            cut = candidate.rfind(" ")
            if cut < 0:
                break
            candidate = candidate[:cut]
    return spans


# --- IP addresses ------------------------------------------------------------------------

_IPV4_RE: Final = re.compile(
    r"[0-9](?<![A-Za-z0-9_.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![A-Za-z0-9_]|\.[0-9])",
    re.ASCII,
)
# Candidates: hex groups and at least two colons, possibly ending in a dotted quad, starting
# at a hex digit or colon that does not continue a word, a number or an address.
_IPV6_RE: Final = re.compile(
    r"[0-9A-Fa-f:](?<![A-Za-z0-9_:.][0-9A-Fa-f:])[0-9A-Fa-f]{0,4}+(?::[0-9A-Fa-f]{0,4}+){1,8}+"
    r"(?:\.[0-9]{1,3}){0,3}+(?![A-Za-z0-9_:]|\.[0-9A-Za-z])",
    re.ASCII,
)


def _ipv6_ok(candidate: str) -> bool:
    if "::" not in candidate and candidate.count(":") < 6:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    if "::" not in candidate:
        return True
    groups = [g for g in candidate.split(":") if g]
    return (
        len(groups) >= 2
        and sum(len(g) for g in groups) >= 5
        and any(ch.isdigit() for ch in candidate)
    )


def _find_ipv4s(text: str, digits: int, cluster: bool) -> list[_Span]:
    spans: list[_Span] = []
    if digits < 4 or text.count(".") < 3:
        return spans
    for m in _IPV4_RE.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        spans.append(m.span())
    return spans


def _find_ipv6s(text: str) -> list[_Span]:
    return [
        m.span()
        for m in _IPV6_RE.finditer(text)
        if m.group().count(":") >= 2 and _ipv6_ok(m.group())
    ]


# --- secrets -----------------------------------------------------------------------------

# Every alternative starts with a literal, so the engine only stops at those characters.
_TOKEN_RE: Final = re.compile(
    r"(?:AKIA(?<![A-Za-z0-9_]AKIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|ASIA(?<![A-Za-z0-9_]ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|gh(?<![A-Za-z0-9_]gh)[pousr]_[A-Za-z0-9]{30,}+(?![A-Za-z0-9_])"
    r"|github_pat_(?<![A-Za-z0-9_]github_pat_)[A-Za-z0-9_]{22,}+"
    r"|xox(?<![A-Za-z0-9_-]xox)[abpr]-[A-Za-z0-9-]{10,}+"
    r"|sk_(?<![A-Za-z0-9_]sk_)(?:live|test)_[A-Za-z0-9]{10,}+(?![A-Za-z0-9_])"
    r"|rk_(?<![A-Za-z0-9_]rk_)(?:live|test)_[A-Za-z0-9]{10,}+(?![A-Za-z0-9_])"
    r"|AIza(?<![A-Za-z0-9_-]AIza)[A-Za-z0-9_-]{35}(?![A-Za-z0-9_-])"
    r"|eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,}+\.eyJ[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]*+"
    r"|-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]*?-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|[\s\S]*))",
    re.ASCII,
)
_ASSIGNMENT_RE: Final = re.compile(
    r"(?<![A-Za-z0-9_.-])(?:[A-Za-z0-9]+[_.-])*?"
    r"(?i:password|passwd|passphrase|secret|secret[_-]?key|client[_-]?secret|api[_-]?key"
    r"|access[_-]?key|private[_-]?key|access[_-]?token|auth[_-]?token|refresh[_-]?token)"
    r"[\"']?[ \t]*[:=][ \t]*"
    r"(?:\"(?P<dq>[^\"\r\n]{6,}+)\"|'(?P<sq>[^'\r\n]{6,}+)'"
    r"|(?P<bare>[^\s\"'`,;&<>{}()\[\]=][^\s\"'`,;&<>{}()\[\]]{5,}+))",
    re.ASCII,
)
_URI_PASSWORD_RE: Final = re.compile(r"://[^\s:/?#@\[\]]++:(?P<pw>[^\s/?#]+)@", re.ASCII)
_BEARER_RE: Final = re.compile(
    r"(?<![A-Za-z0-9_])(?i:bearer)[ \t]+(?P<token>[A-Za-z0-9._~+/-]{20,}+=*)", re.ASCII
)
_PLACEHOLDERS: Final = frozenset(
    ("null", "none", "true", "false", "nil", "undefined", "password", "passwd", "secret")
)
# Unquoted values that read as code rather than a literal: `self._password`, `db.users`,
# `secrets.token_hex(16)`, `config["password"]`, `db_password`, `_secret`.
_CODE_VALUE: Final = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+"
    r"|_[A-Za-z0-9_]*|[A-Za-z0-9_]*_(?i:password|passwd|secret|key|token)",
    re.ASCII,
)


def _placeholder(value: str) -> bool:
    low = value.lower()
    return low in _PLACEHOLDERS or value[0] in "$%{<:?" or "***" in value or "redacted" in low


def _assigned_value(text: str, m: re.Match[str]) -> _Span | None:
    """The span of an assignment's value, or None for a placeholder or a code expression."""
    group = m.lastgroup
    if group is None:
        return None
    value = m.group(group)
    if _placeholder(value):
        return None
    start, end = m.span(group)
    if group == "bare" and (text[end : end + 1] in ("(", "[") or _CODE_VALUE.fullmatch(value)):
        return None
    return start, end


def _find_secrets(text: str) -> list[_Span]:
    spans: list[_Span] = []
    if (
        "_" in text
        or "eyJ" in text
        or "xox" in text
        or "AKIA" in text
        or "ASIA" in text
        or "AIza" in text
        or "-----" in text
    ):
        spans.extend(m.span() for m in _TOKEN_RE.finditer(text))
    if "=" in text or ":" in text:
        low = text.lower()
        if "pass" in low or "secret" in low or "key" in low or "token" in low:
            for m in _ASSIGNMENT_RE.finditer(text):
                span = _assigned_value(text, m)
                if span is not None:
                    spans.append(span)
        if "://" in text:
            spans.extend(
                m.span("pw") for m in _URI_PASSWORD_RE.finditer(text) if not _placeholder(m["pw"])
            )
    if "earer" in text or "EARER" in text:
        spans.extend(m.span("token") for m in _BEARER_RE.finditer(text))
    return spans


# --- the set -----------------------------------------------------------------------------

# The detectors that need digits: they get the number of ASCII digits in the text and give up
# at once when there are too few.
_NUMERIC: Final[tuple[tuple[Detector, _NumericFinder], ...]] = (
    (Detector.CREDIT_CARD, _find_cards),
    (Detector.US_SSN, _find_ssns),
    (Detector.PHONE, _find_phones),
    (Detector.IBAN, _find_ibans),
    (Detector.IP_ADDRESS, _find_ipv4s),
)


class DetectorSet:
    """The content detectors of a session, each with the masker of its strategy."""

    __slots__ = ("_email", "_ipv6", "_maskers", "_nulling", "_numeric", "_secret", "_strictness")

    def __init__(self, detectors: Iterable[tuple[Detector, Masker]]) -> None:
        chosen: dict[Detector, Masker] = {}
        for detector, masker in detectors:
            d = Detector(detector)
            had = chosen.get(d)
            if had is None or _STRICTNESS[masker.strategy] > _STRICTNESS[had.strategy]:
                chosen[d] = masker
        self._maskers = chosen
        self._strictness = {d: _STRICTNESS[m.strategy] for d, m in chosen.items()}
        self._nulling = frozenset(d for d, m in chosen.items() if m.strategy is MaskStrategy.NULL)
        self._email = Detector.EMAIL in chosen
        self._numeric = tuple((d, f) for d, f in _NUMERIC if d in chosen)
        self._ipv6 = Detector.IP_ADDRESS in chosen
        self._secret = Detector.SECRET in chosen

    def __bool__(self) -> bool:
        return bool(self._maskers)

    def __repr__(self) -> str:
        inner = ", ".join(f"{d.value}={m.strategy.value}" for d, m in self._maskers.items())
        return f"DetectorSet({inner})"

    @property
    def detectors(self) -> frozenset[Detector]:
        return frozenset(self._maskers)

    def find(self, text: str) -> list[Finding]:
        """The findings in `text`, in order and without overlaps: of overlapping findings the
        one that starts first wins, then the longest, then the strictest strategy, and it is
        stretched over the others' ends."""
        return self._resolve(self._collect(text))

    def scan(self, text: str) -> str | Nullify | None:
        """The text with every finding replaced by its masker's output; None when nothing was
        found (the common case, which must be fast: callers pass the original bytes through
        unchanged); `NULL` when the whole value must become SQL NULL: a detector whose strategy
        is `null` found something (even where another finding overlaps it), or a masker
        answered None.
        """
        found = self._collect(text)
        if not found:
            return None
        if self._nulling and any(f.detector in self._nulling for f in found):
            return NULL
        parts: list[str] = []
        pos = 0
        for start, end, detector in self._resolve(found):
            masked = self._maskers[detector].mask(text[start:end], detector.value)
            if masked is None:
                return NULL
            parts.append(text[pos:start])
            parts.append(masked)
            pos = end
        parts.append(text[pos:])
        return "".join(parts)

    def _collect(self, text: str) -> list[Finding]:
        """Every finding of every detector, overlapping or not, in no particular order."""
        found: list[Finding] = []
        if self._email and "@" in text:
            found += [Finding(s, e, Detector.EMAIL) for s, e in _find_emails(text)]
        if self._numeric:
            raw = text.encode("utf-8", "surrogatepass")
            digits = len(raw) - len(raw.translate(None, _DIGIT_BYTES))
            if digits >= 2:
                cluster = digits >= 9 and _nine_digits(text) is not None
                for detector, finder in self._numeric:
                    spans = finder(text, digits, cluster)
                    if spans:
                        found += [Finding(s, e, detector) for s, e in spans]
        if self._ipv6 and ("::" in text or text.count(":") >= 6):
            spans = _find_ipv6s(text)
            if spans:
                found += [Finding(s, e, Detector.IP_ADDRESS) for s, e in spans]
        if self._secret:
            spans = _find_secrets(text)
            if spans:
                found += [Finding(s, e, Detector.SECRET) for s, e in spans]
        return found

    def _resolve(self, found: list[Finding]) -> list[Finding]:
        if len(found) < 2:
            return found
        strictness = self._strictness
        found.sort(key=lambda f: (f.start, -f.end, -strictness[f.detector]))
        kept: list[Finding] = []
        for f in found:
            if not kept or f.start >= kept[-1].end:
                kept.append(f)
            elif f.end > kept[-1].end:  # stretch the winner: leave no part of a finding bare
                kept[-1] = kept[-1]._replace(end=f.end)
        return kept
