"""One socket of a session, as an asyncio Protocol with two modes.

Handshake mode: bytes are buffered and read with awaitable helpers (startup, auth). Relay mode:
every chunk goes straight to a callback with no await in between, the fast path. Backpressure is
wired to the peer: when our write buffer is full the peer stops reading, so a session's memory
stays bounded however fast one side produces.
"""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Callable
from typing import cast

from pgwarden_proxy.wire.framing import ProtocolViolation

_HDR = struct.Struct("!cI")
_LEN = struct.Struct("!I")

# Write-buffer high-water mark: above it the peer stops reading from its socket.
HIGH_WATER = 512 * 1024


class ConnectionClosed(Exception):
    """The peer went away during the handshake."""


class Endpoint(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Endpoint | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._on_data: Callable[[bytes], None] | None = None
        self._on_close: Callable[[Exception | None], None] | None = None
        self._eof = False
        self.closed = False
        self._paused_by_peer = False
        self._peer_paused_for_us = False
        self._held = False  # reading paused while the session waits (approval, catalog)

    # ------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but offer the same methods
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self._on_data is not None:
            self._on_data(data)
            return
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return False  # close the transport; a half-open PostgreSQL session is useless

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        if self._on_close is not None:
            self._on_close(exc)

    def pause_writing(self) -> None:
        # Our socket's buffer is full: stop reading from the peer, which is what fills it.
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            peer.transport.pause_reading()
            self._peer_paused_for_us = True

    def resume_writing(self) -> None:
        peer = self.peer
        if self._peer_paused_for_us and peer is not None and peer.transport is not None:
            self._peer_paused_for_us = False
            if not peer.closed and not peer._held:
                peer.transport.resume_reading()

    # ------------------------------------------------------------ handshake-mode reads
    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self._eof or self.closed:
            raise ConnectionClosed("connection closed by peer")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._wait()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def read_startup_packet(self, limit: int) -> bytes:
        """An untyped packet (SSLRequest, StartupMessage, CancelRequest): returns the body."""
        (length,) = _LEN.unpack(await self.read_exactly(4))
        if length < 8 or length > limit:
            raise ProtocolViolation(f"invalid startup packet length {length}")
        return await self.read_exactly(length - 4)

    async def read_message(self, limit: int) -> tuple[bytes, bytes]:
        type_, length = _HDR.unpack(await self.read_exactly(5))
        if length < 4 or length > limit:
            raise ProtocolViolation(f"invalid length {length} for message {type_!r}")
        return type_, await self.read_exactly(length - 4)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    # ------------------------------------------------------------ modes and I/O
    def start_relay(
        self, on_data: Callable[[bytes], None], on_close: Callable[[Exception | None], None]
    ) -> None:
        """Switch to relay mode; bytes already buffered are delivered first."""
        self._on_data = on_data
        self._on_close = on_close
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            on_data(data)
        if self.closed:
            on_close(None)
        elif self._eof:
            self.close()

    async def start_tls(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        hostname: str | None,
    ) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport,
            self,
            ctx,
            server_side=server_side,
            server_hostname=hostname,
        )
        if new is None:
            raise ConnectionClosed("connection closed during the TLS handshake")
        self.transport = new
        new.set_write_buffer_limits(high=HIGH_WATER)

    @property
    def tls(self) -> bool:
        return (
            self.transport is not None and self.transport.get_extra_info("ssl_object") is not None
        )

    def hold(self) -> None:
        """Stop reading until `release()`, whatever the peer's backpressure says."""
        self._held = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def release(self) -> None:
        self._held = False
        peer = self.peer
        backpressure = peer is not None and peer._peer_paused_for_us
        if self.transport is not None and not self.closed and not backpressure:
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        if self.transport is not None and not self.closed:
            self.transport.writelines(chunks)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
