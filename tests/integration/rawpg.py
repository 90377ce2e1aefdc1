"""A tiny raw PostgreSQL protocol client over a socket, for what drivers will not send."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from pgwarden_proxy.wire import messages as m


class RawClient:
    def __init__(self, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def recv_byte(self) -> bytes:
        self._fill(1)
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def recv(self) -> tuple[bytes, bytes]:
        self._fill(5)
        t, n = struct.unpack("!cI", self.buf[:5])
        self._fill(1 + n)
        body = self.buf[5 : 1 + n]
        self.buf = self.buf[1 + n :]
        return t, body

    def until(self, type_: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            msg = self.recv()
            out.append(msg)
            if msg[0] == type_:
                return out

    def startup(self, token: str, **params: str) -> list[tuple[bytes, bytes]]:
        self.send(m.startup_message({"user": "agent", "database": "app", **params}))
        t, body = self.recv()
        if t != b"R":
            return [(t, body)]
        self.send(m.password_message(token.encode() + b"\x00"))
        return self.until_ready_or_error()

    def until_ready_or_error(self) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            msg = self.recv()
            out.append(msg)
            if msg[0] in (b"Z",) or (msg[0] == b"E" and b"SFATAL" in msg[1]):
                return out

    def closed(self) -> bool:
        try:
            self.sock.settimeout(5)
            return self.sock.recv(1) == b""
        except (ConnectionError, TimeoutError):
            return True

    def close(self) -> None:
        self.sock.close()


def error_fields(body: bytes) -> dict[str, str]:
    return m.parse_fields(body)


@dataclass
class Refusal:
    sqlstate: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        """Message and hint, as psql would show them to a person."""
        return f"{self.message}\nHINT: {self.hint}" if self.hint else self.message


def login_refusal(port: int, token: str, *, dbname: str = "app", **params: str) -> Refusal:
    """Log in over the raw protocol (libpq hides the SQLSTATE of a failed login)."""
    c = RawClient(port)
    try:
        t, body = c.startup(token, database=dbname, **params)[-1]
    finally:
        c.close()
    assert t == b"E", f"login was not refused: {t!r}"
    fields = error_fields(body)
    assert fields["S"] == "FATAL"
    return Refusal(fields["C"], fields["M"], fields.get("H", ""))
