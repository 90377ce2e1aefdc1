"""Which client startup parameters may reach the database, and how they are checked.

A client's startup packet is not forwarded blindly: only parameters that change presentation
(names, formats, time zone, search path) pass. Settings that would change how the proxy must
parse SQL (standard_conforming_strings, client encodings whose multibyte characters can contain
quote or backslash bytes) or that belong to policy (timeouts, roles, read-only mode) are refused
at login with a message that lists what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgwarden_proxy.wire.messages import ErrorInfo

# lower-case names; PostgreSQL GUC names are case-insensitive
ALLOWED_PARAMETERS = frozenset(
    {
        "application_name",
        "client_encoding",
        "datestyle",
        "timezone",
        "extra_float_digits",
        "search_path",
        "intervalstyle",
        "bytea_output",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
        "default_transaction_isolation",
    }
)
# Client-only encodings whose second byte can be 0x27 (quote) or 0x5c (backslash): the proxy's
# parser and the server would disagree on where a string literal ends.
UNSAFE_ENCODINGS = frozenset({"sjis", "shiftjis2004", "big5", "gbk", "uhc", "gb18030", "johab"})
_PROTOCOL_KEYS = frozenset({"user", "database", "options", "replication"})

# PostgreSQL encoding name -> Python codec, for decoding statement text (fallback: UTF-8)
_CODECS = {
    "utf8": "utf-8",
    "unicode": "utf-8",
    "sqlascii": "latin-1",  # no conversion: keep bytes 1:1
    "latin1": "latin-1",
    "latin9": "iso8859-15",
    "win1252": "cp1252",
    "win1251": "cp1251",
    "koi8r": "koi8-r",
    "euckr": "euc-kr",
    "eucjp": "euc-jp",
}


def _norm_encoding(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def python_codec(client_encoding: str) -> str:
    return _CODECS.get(_norm_encoding(client_encoding), "utf-8")


class StartupRefused(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


@dataclass(frozen=True, slots=True)
class StartupRequest:
    user: str
    database: str
    forwarded: dict[str, str]  # parameters sent on to the database

    @property
    def application_name(self) -> str:
        return self.forwarded.get("application_name", "")


def _split_options(options: str) -> list[str]:
    """libpq's `options`: whitespace-separated, backslash escapes the next character."""
    out: list[str] = []
    cur: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def _options_settings(options: str) -> list[tuple[str, str]]:
    """`-c name=value` and `--name=value` pairs; anything else is not a setting we can vet."""
    tokens = _split_options(options)
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "-c" and i + 1 < len(tokens):
            tok, i = tokens[i + 1], i + 1
        elif tok.startswith("-c") or tok.startswith("--"):
            tok = tok[2:]
        else:
            raise StartupRefused(_refusal(f"the startup option {tok!r} is not allowed"))
        name, sep, value = tok.partition("=")
        if not sep:
            raise StartupRefused(_refusal(f"the startup option {tok!r} has no value"))
        pairs.append((name.replace("-", "_"), value))
        i += 1
    return pairs


def parsing_hazard(name: str, value: str) -> str | None:
    """A setting under which the proxy's SQL parser and the server would read text differently."""
    key = name.lower()
    if key == "client_encoding" and _norm_encoding(value) in UNSAFE_ENCODINGS:
        return f"client_encoding {value}"
    if key == "standard_conforming_strings" and value.lower() in ("off", "false", "no", "0"):
        return "standard_conforming_strings off"
    return None


def hazard_error(hazard: str) -> ErrorInfo:
    return ErrorInfo(
        "42501",
        f"pgwarden: the session uses {hazard}, under which pgwarden cannot read SQL the way the "
        "database does; the session is closed",
        "FATAL",
        hint="keep client_encoding UTF8 (or another ASCII-safe encoding) and "
        "standard_conforming_strings on",
    )


def _refusal(what: str) -> ErrorInfo:
    allowed = ", ".join(sorted(ALLOWED_PARAMETERS))
    return ErrorInfo(
        "42501",
        f"pgwarden: {what}",
        "FATAL",
        hint=f"pgwarden forwards only these startup parameters: {allowed}; remove the others "
        "(PGOPTIONS, driver settings) and reconnect",
    )


def check_startup(params: dict[str, str], *, database: str) -> StartupRequest:
    """Vet a client's startup parameters for the connection serving `database`."""
    replication = params.get("replication")
    if replication is not None and replication.lower() not in ("false", "off", "no", "0"):
        raise StartupRefused(
            ErrorInfo(
                "28000",
                "pgwarden does not accept replication connections",
                "FATAL",
                hint="connect to the database directly for replication",
            )
        )
    user = params.get("user")
    if not user:
        raise StartupRefused(ErrorInfo("28000", "no user name in the startup packet", "FATAL"))
    requested = params.get("database") or user
    if requested != database:
        raise StartupRefused(
            ErrorInfo(
                "3D000",
                f'database "{requested}" is not served by this pgwarden endpoint',
                "FATAL",
                hint=f'this endpoint serves database "{database}"; connect with dbname={database}',
            )
        )
    settings = [(k, v) for k, v in params.items() if k not in _PROTOCOL_KEYS]
    settings += _options_settings(params.get("options", ""))
    forwarded: dict[str, str] = {}
    for name, value in settings:
        key = name.lower()
        if key not in ALLOWED_PARAMETERS:
            raise StartupRefused(_refusal(f'the startup parameter "{name}" is not allowed'))
        hazard = parsing_hazard(key, value)
        if hazard is not None:
            raise StartupRefused(hazard_error(hazard))
        forwarded[name] = value
    return StartupRequest(user=user, database=requested, forwarded=forwarded)
