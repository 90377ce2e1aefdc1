"""Encoders and decoders of the PostgreSQL v3 messages the proxy writes or reads itself.

Sans-IO: bytes in, bytes out. Message layout per the PostgreSQL docs, "Message Formats".
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

PROTOCOL_3_0 = 3 << 16
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
# pgwarden's own: a cancel request one replica passes on to the others (never passed on again);
# the key still has to match, so it grants nothing a CancelRequest does not
PEER_CANCEL_REQUEST_CODE = (1234 << 16) | 5699

# Untyped startup packets longer than this are refused, like PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
MAX_STARTUP_PACKET = 10_000

_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_HDR = struct.Struct("!cI")


def frame(type_: bytes, body: bytes = b"") -> bytes:
    return _HDR.pack(type_, len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


# ---------------------------------------------------------------- backend messages (we send)


def auth_ok() -> bytes:
    return frame(b"R", _I32.pack(0))


def auth_cleartext_password() -> bytes:
    return frame(b"R", _I32.pack(3))


def backend_key_data(pid: int, secret: int) -> bytes:
    return frame(b"K", _I32.pack(pid) + _I32.pack(secret))


def parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstr(name) + cstr(value))


def ready_for_query(status: bytes) -> bytes:
    return frame(b"Z", status)


def negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unsupported))
    return frame(b"v", body + b"".join(cstr(o) for o in unsupported))


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An ErrorResponse/NoticeResponse in the fields a client shows (S, C, M, D, H)."""

    sqlstate: str
    message: str
    severity: str = "ERROR"
    detail: str | None = None
    hint: str | None = None

    def encode(self, type_: bytes = b"E") -> bytes:
        fields = [(b"S", self.severity), (b"V", self.severity), (b"C", self.sqlstate)]
        fields.append((b"M", self.message))
        if self.detail:
            fields.append((b"D", self.detail))
        if self.hint:
            fields.append((b"H", self.hint))
        body = b"".join(code + cstr(value) for code, value in fields) + b"\x00"
        return frame(type_, body)


def error_response(info: ErrorInfo) -> bytes:
    return info.encode(b"E")


def notice_response(info: ErrorInfo) -> bytes:
    return info.encode(b"N")


def parse_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse or NoticeResponse body, keyed by their one-letter code."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        end = body.index(b"\x00", pos + 1)
        out[chr(body[pos])] = body[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return out


# ---------------------------------------------------------------- frontend messages (we send)


def startup_message(params: Mapping[str, str]) -> bytes:
    body = _I32.pack(PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items())
    body += b"\x00"
    return _I32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


def cancel_request(pid: int, secret: int, code: int = CANCEL_REQUEST_CODE) -> bytes:
    return _I32.pack(16) + _I32.pack(code) + _I32.pack(pid) + _I32.pack(secret)


def password_message(payload: bytes) -> bytes:
    return frame(b"p", payload)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def terminate() -> bytes:
    return frame(b"X")


def describe_statement(name: str) -> bytes:
    return frame(b"D", b"S" + cstr(name))


def sync() -> bytes:
    return frame(b"S")


# ---------------------------------------------------------------- decoding helpers


class Reader:
    """Cursor over a message body; raises ValueError on a truncated or malformed body."""

    __slots__ = ("body", "pos")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.pos = 0

    def int32(self) -> int:
        if self.pos + 4 > len(self.body):
            raise ValueError("message body too short")
        (v,) = _I32.unpack_from(self.body, self.pos)
        self.pos += 4
        return int(v)

    def int16(self) -> int:
        if self.pos + 2 > len(self.body):
            raise ValueError("message body too short")
        (v,) = _I16.unpack_from(self.body, self.pos)
        self.pos += 2
        return int(v)

    def cstring(self) -> str:
        end = self.body.find(b"\x00", self.pos)
        if end < 0:
            raise ValueError("string not terminated")
        s = self.body[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return s

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.body):
            raise ValueError("message body too short")
        v = self.body[self.pos : self.pos + n]
        self.pos += n
        return v

    def rest(self) -> bytes:
        v = self.body[self.pos :]
        self.pos = len(self.body)
        return v


def cstring_at(body: bytes, pos: int) -> str:
    """The string at `pos` (`Reader.cstring` without a Reader: one per Execute and Describe)."""
    end = body.find(b"\x00", pos)
    if end < 0:
        raise ValueError("string not terminated")
    return body[pos:end].decode("utf-8", errors="replace")


@dataclass(slots=True)  # not frozen (its __init__ costs twice as much); treated as immutable
class BindMessage:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]

    @staticmethod
    def parse(body: bytes) -> BindMessage:
        """What `Reader` would read (and the same ValueErrors), by hand: one per statement."""
        end = body.find(b"\x00")
        if end < 0:
            raise ValueError("string not terminated")
        portal = body[:end].decode("utf-8", errors="replace")
        pos = end + 1
        end = body.find(b"\x00", pos)
        if end < 0:
            raise ValueError("string not terminated")
        statement = body[pos:end].decode("utf-8", errors="replace")
        pos = end + 1
        n = len(body)
        if pos + 2 > n:
            raise ValueError("message body too short")
        (k,) = _I16.unpack_from(body, pos)
        pos += 2
        formats: tuple[int, ...] = ()
        if k > 0:
            if pos + 2 * k > n:
                raise ValueError("message body too short")
            formats = (_I16.unpack_from(body, pos)[0],) if k == 1 else _int16s(body, pos, k)
            pos += 2 * k
        if pos + 2 > n:
            raise ValueError("message body too short")
        (k,) = _I16.unpack_from(body, pos)
        pos += 2
        values: list[bytes | None] = []
        for _ in range(k):
            if pos + 4 > n:
                raise ValueError("message body too short")
            (size,) = _I32.unpack_from(body, pos)
            pos += 4
            if size == -1:
                values.append(None)
                continue
            if size < 0 or pos + size > n:
                raise ValueError("message body too short")
            values.append(body[pos : pos + size])
            pos += size
        return BindMessage(portal, statement, formats, tuple(values))

    def rendered_params(self, types: Sequence[int] = ()) -> list[str | None]:
        """Parameters as text for events.

        Text format is decoded; binary values of common types (by the OIDs the client gave in
        Parse) are rendered as PostgreSQL would print them, anything else as hex bytea.
        """
        formats = self.param_formats
        if not formats or (len(formats) == 1 and formats[0] == 0):  # all text: the common case
            return [None if v is None else v.decode("utf-8", "replace") for v in self.params]
        out: list[str | None] = []
        for i, value in enumerate(self.params):
            if value is None:
                out.append(None)
                continue
            fmt = (
                self.param_formats[0]
                if len(self.param_formats) == 1
                else (self.param_formats[i] if i < len(self.param_formats) else 0)
            )
            if fmt != 1:
                out.append(value.decode("utf-8", "replace"))
            else:
                out.append(_render_binary(types[i] if i < len(types) else 0, value))
        return out


def _int16s(body: bytes, pos: int, k: int) -> tuple[int, ...]:
    return struct.unpack_from(f"!{k}h", body, pos)


def _render_binary(oid: int, value: bytes) -> str:
    try:
        if oid in _BINARY_INTS and len(value) == _BINARY_INTS[oid]:
            return str(int.from_bytes(value, "big", signed=oid != 26))
        if oid == 16 and len(value) == 1:  # bool
            return "true" if value[0] else "false"
        if oid == 700 and len(value) == 4:  # float4
            return repr(struct.unpack("!f", value)[0])
        if oid == 701 and len(value) == 8:  # float8
            return repr(struct.unpack("!d", value)[0])
        if oid in (25, 1043, 19, 1042, 114):  # text, varchar, name, bpchar, json
            return value.decode("utf-8")
        if oid == 2950 and len(value) == 16:  # uuid
            return str(uuid.UUID(bytes=value))
    except UnicodeDecodeError:
        pass
    return "\\x" + value.hex()


# int2, int4, int8, oid: byte widths of their binary form
_BINARY_INTS = {21: 2, 23: 4, 20: 8, 26: 4}


def parse_param_types(body: bytes) -> tuple[int, ...]:
    """The parameter type OIDs of a Parse message (0 = unspecified)."""
    r = Reader(body)
    r.cstring()
    r.cstring()
    return tuple(r.int32() & 0xFFFFFFFF for _ in range(r.int16()))


def parse_startup_params(r: Reader) -> dict[str, str]:
    params: dict[str, str] = {}
    while True:
        name = r.cstring()
        if not name:
            return params
        params[name] = r.cstring()


def encode_many(messages: Iterable[bytes]) -> bytes:
    return b"".join(messages)
