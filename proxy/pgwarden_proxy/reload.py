"""Live configuration: a changed config file (or SIGHUP) reaches running sessions.

Kubernetes updates a mounted ConfigMap by swapping a symlink, so the file is compared by the
bytes it holds, not by its inode or mtime alone. A file that does not load is logged with the
field it gets wrong and ignored: the proxy keeps enforcing the last good configuration.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from pgwarden.api.config import ConfigError, ProxyConfig, load_config

log = logging.getLogger("pgwarden.reload")

# Fields a running proxy can take over; the others name sockets or processes it already has.
LIVE_FIELDS = ("policies", "approvals", "upstream", "limits", "masking", "peers")


def restart_fields(old: ProxyConfig, new: ProxyConfig) -> list[str]:
    """Top-level fields that changed but only take effect after a restart."""
    fields = [f for f in type(old).model_fields if f not in LIVE_FIELDS]
    return [f for f in fields if getattr(old, f) != getattr(new, f)]


class ConfigWatcher:
    """Polls the config file and applies a changed one; `reload_now()` is the SIGHUP path."""

    def __init__(
        self,
        path: Path,
        apply: Callable[[ProxyConfig], None],
        *,
        interval: float = 2.0,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self._apply = apply
        self._interval = interval
        self._on_result = on_result or (lambda result: None)
        self._digest = self._read_digest()
        self._task: asyncio.Task[None] | None = None

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).digest()
        except OSError:
            return None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            digest = self._read_digest()
            if digest is not None and digest != self._digest:
                self.reload_now(reason="file changed")

    def reload_now(self, reason: str = "SIGHUP") -> bool:
        """Load and apply the file; False (and the old config stays) when it does not load."""
        self._digest = self._read_digest()
        try:
            config = load_config(self.path)
        except ConfigError as e:
            log.error(
                "config reload failed; the previous configuration stays in force",
                extra={"reason": reason, "error": str(e)},
            )
            self._on_result("invalid")
            return False
        self._apply(config)
        log.info("config reloaded", extra={"reason": reason, "path": str(self.path)})
        self._on_result("applied")
        return True
