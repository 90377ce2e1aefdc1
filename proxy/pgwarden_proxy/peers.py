"""Cancel requests across replicas.

A client cancels on a new connection, which the Service may send to another replica than the
one holding the session. A replica that does not know the key passes the request on, once, to
every peer (`peers.dns` resolved now, so scaled replicas are found, plus `peers.addresses`);
the peer that holds the session checks the key as for any cancel. Peers come from the config
only, never from the request, so a client cannot make the proxy connect anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable

from pgwarden.api.config import Peers
from pgwarden_proxy.wire import messages as m

log = logging.getLogger("pgwarden.proxy")

PASS_ON_TIMEOUT = 2.0  # per peer: a cancel is worth little after that


class PassOnBudget:
    """At most `rate` pass-ons a second, in bursts of `burst`: a flood of made-up keys must not
    make every replica open connections to all the others for each one."""

    def __init__(
        self, rate: float = 50.0, burst: float = 100.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = burst, clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


async def addresses(peers: Peers, listen_port: int) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for a in peers.addresses:
        host, _, fixed = a.rpartition(":")
        found.add((host.strip("[]"), int(fixed)))
    if peers.dns:
        port = peers.port or listen_port
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                peers.dns, port, type=socket.SOCK_STREAM
            )
        except OSError as e:
            log.warning("peers could not be resolved", extra={"peers": peers.dns, "error": str(e)})
        else:
            found.update((str(info[4][0]), port) for info in infos)
    return found


async def pass_on_cancel(peers: Peers, listen_port: int, pid: int, secret: int) -> int:
    """Send the cancel to every peer; returns how many took it (0 when none are configured)."""
    targets = await addresses(peers, listen_port)
    packet = m.cancel_request(pid, secret, m.PEER_CANCEL_REQUEST_CODE)
    sent = await asyncio.gather(*(_send(host, port, packet) for host, port in targets))
    return sum(sent)


async def _send(host: str, port: int, packet: bytes) -> bool:
    writer = None
    try:
        async with asyncio.timeout(PASS_ON_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(packet)
            await writer.drain()
            await reader.read(1)  # the peer closes once it acted on it
        return True
    except (OSError, TimeoutError) as e:
        log.info("cancel not passed on", extra={"peer": f"{host}:{port}", "error": str(e)})
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
