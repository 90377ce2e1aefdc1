"""`/healthz`, `/readyz` and Prometheus `/metrics` on a small asyncio HTTP/1.1 server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgwarden_proxy.server import ProxyServer

log = logging.getLogger("pgwarden.http")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    def __init__(self, proxy: ProxyServer, host: str, port: int) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    def _route(self, method: str, path: str) -> tuple[int, bytes, str]:
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, b"method not allowed\n", "text/plain"
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        if path == "/readyz":
            if self.proxy.ready:
                return 200, b"ready\n", "text/plain"
            return 503, b"draining\n" if self.proxy.draining else b"starting\n", "text/plain"
        if path == "/metrics":
            return 200, self.proxy.metrics.render(), "text/plain; version=0.0.4; charset=utf-8"
        return 404, b"not found\n", "text/plain"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            status, body, ctype = (
                self._route(parts[0], parts[1]) if len(parts) == 3 else (404, b"", "text/plain")
            )
            writer.write(
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if parts[0] != "HEAD" else b"")
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            pass
        finally:
            writer.close()
