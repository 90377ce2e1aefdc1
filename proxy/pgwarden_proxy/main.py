"""Running a proxy process: event loop, signals, exit code."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

from pgwarden import logs
from pgwarden.api.config import ProxyConfig
from pgwarden_proxy.recording.spool import SpoolError
from pgwarden_proxy.server import ProxyServer

log = logging.getLogger("pgwarden.proxy")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run(config: ProxyConfig, config_path: Path | None = None) -> int:
    """Serve until SIGTERM; with `config_path`, a changed file or SIGHUP reloads it live."""
    loop = new_event_loop()
    # What is alive now (modules, parsers, the config) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise walk it over and over under load.
    gc.freeze()
    try:
        loop.run_until_complete(ProxyServer(config, config_path=config_path).serve_forever())
    except (OSError, SpoolError) as e:
        log.error("cannot start the proxy", extra={"error": str(e)})
        return 1
    finally:
        loop.close()
        logs.flush()
    return 0
