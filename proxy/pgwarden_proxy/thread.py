"""A proxy on a background thread with its own event loop (the demo and the tests use it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pgwarden import logs
from pgwarden.api.config import ProxyConfig
from pgwarden_proxy.auth.oidc import OidcVerifier
from pgwarden_proxy.events import EventSink
from pgwarden_proxy.main import new_event_loop
from pgwarden_proxy.server import ProxyServer

T = TypeVar("T")


class ProxyThread:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        sink: EventSink | None = None,
        config_path: Path | None = None,
        verifier: OidcVerifier | None = None,
    ) -> None:
        self.loop = new_event_loop()
        self.server = ProxyServer(config, sink=sink, verifier=verifier, config_path=config_path)
        self._thread = threading.Thread(target=self._run, name="pgwarden-proxy", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as e:
            self._error = e
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()
        self.loop.close()
        logs.flush()

    def start(self) -> ProxyThread:
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 5) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.shutdown(grace), timeout=grace + 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
