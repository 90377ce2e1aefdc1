"""The listening proxy: accepts clients, owns shared state, cancels, health and shutdown."""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import signal
import ssl
from collections.abc import Callable
from pathlib import Path

from pgwarden.api.config import NamedPolicy, ProxyConfig
from pgwarden.api.policy import MaskStrategy
from pgwarden_proxy import peers, upstream
from pgwarden_proxy.approvals.backend import ApprovalBackend, ApprovalError
from pgwarden_proxy.approvals.files import FileApprovals
from pgwarden_proxy.approvals.kubernetes import KubernetesApprovals
from pgwarden_proxy.auth.oidc import Identity, OidcVerifier
from pgwarden_proxy.endpoint import Endpoint
from pgwarden_proxy.events import EventSink, LogEventSink
from pgwarden_proxy.http import HealthServer
from pgwarden_proxy.masking.catalog import Catalog
from pgwarden_proxy.masking.detectors import DetectorSet
from pgwarden_proxy.masking.planner import Planner
from pgwarden_proxy.masking.rows import Rewriter
from pgwarden_proxy.masking.rules import ColumnRule, MaskRules
from pgwarden_proxy.masking.strategies import Masker
from pgwarden_proxy.metrics import ProxyMetrics
from pgwarden_proxy.policy import PolicyStore
from pgwarden_proxy.recording.recorder import Recorder
from pgwarden_proxy.recording.shipper import store_for
from pgwarden_proxy.reload import LIVE_FIELDS, ConfigWatcher, restart_fields
from pgwarden_proxy.session import Session, new_backend_key
from pgwarden_proxy.sql.classify import Analyzer
from pgwarden_proxy.wire.messages import ErrorInfo

log = logging.getLogger("pgwarden.proxy")


def server_tls_context(config: ProxyConfig) -> ssl.SSLContext | None:
    tls = config.listen.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def approval_backend(config: ProxyConfig) -> ApprovalBackend | None:
    """The configured backend; None (held statements are refused) when there is none to use."""
    a = config.approvals
    if a.backend == "file" and a.dir is not None:
        return FileApprovals(a.dir)
    if a.backend == "kubernetes" and a.namespace is not None:
        try:
            return KubernetesApprovals(a.namespace)
        except ApprovalError as e:  # not in a pod: refuse held statements, say why
            log.error("no approval backend", extra={"error": str(e)})
    return None  # kubernetes without a namespace (the default): no backend configured


class _ClientEndpoint(Endpoint):
    def __init__(self, server: ProxyServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._server._accepted(self, transport)


class ProxyServer:
    def __init__(
        self,
        config: ProxyConfig,
        *,
        sink: EventSink | None = None,
        verifier: OidcVerifier | None = None,
        config_path: Path | None = None,
    ) -> None:
        self.config = config
        self.sink: EventSink = sink or LogEventSink(statements=config.statement_log)
        self.policy = PolicyStore(self.policies_for)
        self.catalog = Catalog(config.upstream)
        self.planner = Planner(self.catalog)
        self._hash_key = self._read_hash_key()
        self._rewriters: dict[MaskRules, Rewriter] = {}
        self.approvals = approval_backend(config)
        store = store_for(config.recording)
        self.recorder = (
            Recorder(config.recording, config.connection, store) if store is not None else None
        )
        self.verifier = verifier or OidcVerifier(config.auth.oidc)
        self.analyzer = Analyzer()
        self.metrics = ProxyMetrics(config.connection)
        if self.recorder is not None:
            self.metrics.recording(self.recorder)
        self.tls_context = server_tls_context(config)
        self.sessions: dict[int, Session] = {}  # by our backend pid
        self._pass_on = peers.PassOnBudget()  # cancels passed on to the other replicas
        self.clients = 0
        self.draining = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._health: HealthServer | None = None
        self._stopped: asyncio.Event | None = None
        self.watcher = (
            ConfigWatcher(config_path, self.apply_config, on_result=self.metrics.reloads_by)
            if config_path is not None
            else None
        )

    # ------------------------------------------------------------------ policies
    def policies_for(self, identity: Identity) -> list[NamedPolicy]:
        name = self.config.connection
        return [
            p
            for p in self.config.policies
            if p.spec.selects(name) and p.spec.grants(identity.username, identity.groups)
        ]

    # ------------------------------------------------------------------ masking
    def _read_hash_key(self) -> bytes:
        try:
            key = self.config.masking.read_hash_key()
        except OSError as e:
            raise OSError(f"masking.hashKeyFile cannot be read: {e}") from e
        if key:
            return key
        if any(
            r.strategy is MaskStrategy.HASH for p in self.config.policies for r in p.spec.masking
        ):
            log.warning(
                "masking.hashKeyFile is not set: hashed values are stable only while this "
                "process runs; set a key so that every replica hashes alike"
            )
        return secrets.token_bytes(32)

    def rewriter_for(self, rules: MaskRules) -> Rewriter | None:
        """What rewrites values under these rules (None: nothing to mask)."""
        if not rules:
            return None
        rewriter = self._rewriters.get(rules)
        if rewriter is None:
            detectors = line_detectors = None
            if rules.detectors:
                detectors = DetectorSet(
                    (d, Masker(s, self._hash_key)) for d, s, _ in rules.detectors
                )
                redact_null = MaskStrategy.REDACT, MaskStrategy.NULL
                line_detectors = DetectorSet(
                    (d, Masker(redact_null[0] if s is redact_null[1] else s, self._hash_key))
                    for d, s, _ in rules.detectors
                )
            maskers: dict[str, Masker] = {}

            def masker(rule: ColumnRule) -> Masker:
                found = maskers.get(rule.strategy)
                if found is None:
                    found = maskers[rule.strategy] = Masker(rule.strategy, self._hash_key)
                return found

            if len(self._rewriters) > 1000:
                self._rewriters.clear()
            rewriter = self._rewriters[rules] = Rewriter(masker, detectors, line_detectors)
        return rewriter

    def apply_config(self, new: ProxyConfig) -> None:
        """Take over a reloaded config: running sessions use it from their next statement."""
        stale = restart_fields(self.config, new)
        if stale:
            log.warning(
                "config fields changed that take effect only after a restart",
                extra={"fields": stale},
            )
        self.config = self.config.model_copy(update={f: getattr(new, f) for f in LIVE_FIELDS})
        self.catalog.upstream = self.config.upstream
        self.catalog.invalidate()
        self.approvals = approval_backend(self.config)
        self.policy.reloaded()

    # ------------------------------------------------------------------ sessions
    @property
    def over_capacity(self) -> bool:
        return self.clients > self.config.limits.max_client_connections

    def register(self, session: Session) -> tuple[int, int]:
        while True:
            key = new_backend_key()
            if key[0] not in self.sessions:
                self.sessions[key[0]] = session
                return key

    def unregister(self, session: Session) -> None:
        if self.sessions.get(session.key[0]) is session:
            del self.sessions[session.key[0]]

    async def cancel(self, pid: int, secret: int, *, from_peer: bool = False) -> None:
        """Forward a cancel only when both halves of the key match one of our sessions; a key
        we do not know may belong to another replica (passed on once, see peers.py)."""
        session = self.sessions.get(pid)
        if session is None or not hmac.compare_digest(
            session.key[1].to_bytes(4, "big"), (secret & 0xFFFFFFFF).to_bytes(4, "big")
        ):
            # (a known pid with another secret: another replica may have drawn the same pid)
            if from_peer or not self.config.peers.configured:
                log.info("cancel request with an unknown key ignored")
            elif not self._pass_on.take():
                log.warning("cancel requests with unknown keys come too fast; not passed on")
            else:
                took = await peers.pass_on_cancel(
                    self.config.peers, self.config.listen.port, pid, secret
                )
                log.info("cancel request passed on to the other replicas", extra={"peers": took})
            return
        if session.cancel_hold():
            log.info(
                "held statement withdrawn by a cancel request", extra={"session_id": session.id}
            )
            return
        up = session.upstream
        if up is None:
            return
        try:
            await upstream.send_cancel(self.config.upstream, up.backend_pid, up.backend_secret)
            log.info("cancel forwarded", extra={"session_id": session.id})
        except (upstream.UpstreamError, OSError) as e:
            log.warning("cancel could not be forwarded", extra={"error": str(e)})

    def _accepted(self, ep: Endpoint, transport: asyncio.BaseTransport) -> None:
        self.clients += 1
        self.metrics.connections.set(self.clients)
        peername = transport.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        task = asyncio.get_running_loop().create_task(self._serve(ep, peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, ep: Endpoint, peer: str) -> None:
        try:
            await Session(self, ep, peer).run()
        except Exception:
            # One broken session must never take the proxy down for the others.
            log.exception("session failed", extra={"peer": peer})
            ep.abort()
        finally:
            self.clients -= 1
            self.metrics.connections.set(self.clients)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        if self.recorder is not None:
            self.recorder.start()  # first: ships, and closes sessions a crash left open
        else:
            log.warning("recording is off: no recording.sink is configured")
        await self.verifier.start()
        listen = self.config.listen
        self._server = await loop.create_server(
            lambda: _ClientEndpoint(self),
            listen.host,
            listen.port,
            reuse_address=True,
            backlog=1024,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        if self.watcher is not None:
            self.watcher.start()
        if self.config.metrics.port is not None:
            self._health = HealthServer(self, self.config.metrics.host, self.config.metrics.port)
            await self._health.start()
        log.info(
            "listening",
            extra={
                "host": listen.host,
                "port": self.port,
                "connection": self.config.connection,
                "tls": self.tls_context is not None,
            },
        )

    @property
    def ready(self) -> bool:
        return self._server is not None and not self.draining

    @property
    def health_port(self) -> int | None:
        return self._health.port if self._health else None

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let running statements finish, then end every session with 57P01."""
        if self.draining:
            return
        self.draining = True
        try:
            await self._drain_and_close(grace)
        except Exception:  # the process must still end (a hung proxy holds its pod and port)
            log.exception("shutdown: a step failed; stopping anyway")
        finally:
            if self._stopped is not None:
                self._stopped.set()
            log.info("stopped")

    async def _drain_and_close(self, grace: float | None) -> None:
        grace = self.config.limits.shutdown_grace.total_seconds() if grace is None else grace
        if self._server is not None:
            self._server.close()
        info = ErrorInfo(
            "57P01",
            "terminating connection due to administrator command",
            "FATAL",
            hint="pgwarden is shutting down; reconnect to another replica",
        )
        for s in list(self.sessions.values()):
            s.terminate(info, reason="proxy shutdown", when_idle=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            if pending:
                for s in list(self.sessions.values()):
                    s.terminate(info, reason="proxy shutdown (grace period over)")
                _, pending = await asyncio.wait(pending, timeout=2)
                for t in pending:
                    t.cancel()
        if self.watcher is not None:
            self.watcher.stop()
        if self._health is not None:
            await self._health.stop()
        self.catalog.close()
        if self.recorder is not None:
            await self.recorder.stop()

    async def serve_forever(self, install_signals: bool = True) -> None:
        await self.start()
        assert self._stopped is not None
        if install_signals:
            loop = asyncio.get_running_loop()
            shutdown: Callable[[], object] = lambda: loop.create_task(self.shutdown())  # noqa: E731
            loop.add_signal_handler(signal.SIGTERM, shutdown)
            loop.add_signal_handler(signal.SIGINT, shutdown)
            if self.watcher is not None:
                loop.add_signal_handler(signal.SIGHUP, self.watcher.reload_now)
        await self._stopped.wait()
