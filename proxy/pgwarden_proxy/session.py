"""One client session: handshake (TLS, startup, token), upstream login, then the relay.

The relay is callback-driven: each chunk read from one socket is framed, the statements in it
pass the decision point, and the result is written to the other socket, with no await on the
way. Bulk data (result rows, COPY data) passes as byte runs, never decoded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
import uuid
from typing import TYPE_CHECKING

from pgwarden.api.statements import StatementClass
from pgwarden_proxy.auth.oidc import Identity, TokenRejected
from pgwarden_proxy.decision import Decision
from pgwarden_proxy.endpoint import ConnectionClosed, Endpoint
from pgwarden_proxy.events import SessionEvent, StatementEvent
from pgwarden_proxy.policy import EffectivePolicy
from pgwarden_proxy.sql.classify import StatementInfo
from pgwarden_proxy.startup import (
    StartupRefused,
    StartupRequest,
    check_startup,
    hazard_error,
    parsing_hazard,
    python_codec,
)
from pgwarden_proxy.tracker import Kind, Op, Tracker
from pgwarden_proxy.upstream import UpstreamConnection, UpstreamError
from pgwarden_proxy.upstream import connect as connect_upstream
from pgwarden_proxy.wire import messages as m
from pgwarden_proxy.wire.framing import Message, ProtocolViolation, Scanner

if TYPE_CHECKING:
    from pgwarden_proxy.server import ProxyServer

log = logging.getLogger("pgwarden.session")

_TOKEN_MESSAGE_LIMIT = 64 * 1024
# A statement name no client uses: describing it fails harmlessly (26000), which is how a refused
# request is made to fail on the server too.
_POISON = m.describe_statement("pgwarden.refused")
_POISON_SYNC = _POISON + m.sync()
_DATAROW, _COPYDATA = ord("D"), ord("d")
# where one statement's rows end: CommandComplete, PortalSuspended, Error, EmptyQuery, Ready
_STATEMENT_END = frozenset(b"CsEIZ")
_UNKNOWN_STATEMENT = StatementInfo(
    text="",
    fingerprint=None,
    command="UNKNOWN",
    classes=frozenset({StatementClass.UNKNOWN}),
    functions=frozenset(),
    relations=frozenset(),
    prepares=None,
    executes=None,
    error="statement not known to the proxy",
)


class _Refused(Exception):
    """End the handshake with this FATAL error."""

    def __init__(self, info: m.ErrorInfo, reason: str) -> None:
        super().__init__(info.message)
        self.info = info
        self.reason = reason


class _Quiet(Exception):
    """End the connection without a message (cancel requests, vanished clients)."""


def _fatal(sqlstate: str, message: str, hint: str | None = None) -> m.ErrorInfo:
    return m.ErrorInfo(sqlstate, message, "FATAL", hint=hint)


class Session:
    def __init__(self, server: ProxyServer, client: Endpoint, peer: str) -> None:
        self.server = server
        self.cfg = server.config
        self.client = client
        self.peer = peer
        self.id = uuid.uuid4().hex
        self.identity: Identity | None = None
        self.upstream: UpstreamConnection | None = None
        self.key = (0, 0)  # our BackendKeyData, given to the client
        self.encoding = "utf-8"
        self.application_name = ""
        self.started = time.time()
        self.statements = 0
        self.end_reason = "client closed"
        self._done: asyncio.Future[None] | None = None
        self._terminating: m.ErrorInfo | None = None
        self._terminate_when_idle = False
        self._expiry_timer: asyncio.TimerHandle | None = None
        # statement name -> (its statements, parameter type OIDs from Parse)
        self._prepared: dict[str, tuple[tuple[StatementInfo, ...], tuple[int, ...]]] = {}
        self._portals: dict[str, tuple[StatementInfo, m.BindMessage, tuple[int, ...]]] = {}
        self._sql_prepared: dict[str, StatementInfo] = {}
        limits = self.cfg.limits
        self._client_scanner = Scanner(
            streamed=(_COPYDATA,), max_message=limits.max_message_bytes, frontend=True
        )
        self._server_scanner = Scanner(
            streamed=(_DATAROW, _COPYDATA), counted=_DATAROW, max_message=limits.max_message_bytes
        )
        self.tracker = Tracker(self._statement_done)
        self.policy = EffectivePolicy.combine(())  # set at login, renewed after a reload
        self._policy_generation = -1
        self._max_rows: int | None = None  # the effective policy's maxRows

    # ================================================================== lifecycle
    async def run(self) -> None:
        metrics = self.server.metrics
        try:
            try:
                async with asyncio.timeout(self.cfg.limits.auth_timeout.total_seconds()):
                    await self._handshake()
            except TimeoutError:
                raise _Refused(
                    _fatal(
                        "08006",
                        "pgwarden: login did not complete in time",
                        hint=f"send the token as the password within "
                        f"{self.cfg.limits.auth_timeout.total_seconds():g}s",
                    ),
                    "timeout",
                ) from None
        except _Refused as e:
            metrics.auth_failures.labels(e.reason).inc()
            log.info(
                "login refused",
                extra={
                    "session_id": self.id,
                    "peer": self.peer,
                    "reason": e.reason,
                    "error": e.info.message,
                },
            )
            self.client.write(m.error_response(e.info))
            self.client.close()
            if self.upstream is not None:
                self.upstream.endpoint.close()
            return
        except ProtocolViolation as e:
            metrics.protocol_violations.inc()
            log.info(
                "protocol violation during login",
                extra={"session_id": self.id, "peer": self.peer, "error": str(e)},
            )
            self.client.write(m.error_response(_fatal("08P01", f"pgwarden: {e}")))
            self.client.close()
            return
        except (_Quiet, ConnectionClosed):
            self.client.close()
            return
        self._done = asyncio.get_running_loop().create_future()
        self._start_relay()
        try:
            await self._done
        finally:
            self._ended()

    async def _handshake(self) -> None:
        c = self.client
        while True:
            r = m.Reader(await c.read_startup_packet(m.MAX_STARTUP_PACKET))
            code = r.int32()
            if code == m.SSL_REQUEST_CODE:
                await self._answer_ssl_request()
            elif code == m.GSSENC_REQUEST_CODE:
                c.write(b"N")  # no GSSAPI encryption: the client falls back to TLS or plain
            elif code == m.CANCEL_REQUEST_CODE:
                await self.server.cancel(r.int32(), r.int32())
                raise _Quiet()
            elif code >> 16 == 3:
                break
            else:
                raise _Refused(
                    _fatal(
                        "0A000",
                        f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}",
                        hint="pgwarden speaks protocol 3.0",
                    ),
                    "protocol_version",
                )
        self._refuse_if_draining()
        if self.server.over_capacity:
            limit = self.cfg.limits.max_client_connections
            raise _Refused(
                _fatal(
                    "53300",
                    f"pgwarden: too many client connections (limit {limit})",
                    hint="close idle sessions or retry later",
                ),
                "too_many_connections",
            )
        try:
            params = m.parse_startup_params(r)
        except ValueError as e:
            raise ProtocolViolation(f"malformed startup packet: {e}") from e
        # Protocol 3.x with x > 0 or _pq_ extensions: offer 3.0, as PostgreSQL does.
        unsupported = sorted(k for k in params if k.startswith("_pq_."))
        if code & 0xFFFF or unsupported:
            c.write(m.negotiate_protocol_version(0, unsupported))
        for k in unsupported:
            del params[k]
        try:
            request = check_startup(params, database=self.cfg.upstream.database)
        except StartupRefused as e:
            raise _Refused(e.info, "startup_parameters") from e
        if not c.tls and not self.cfg.listen.insecure_plaintext:
            raise _Refused(
                _fatal(
                    "28000",
                    "pgwarden requires TLS: the token would travel in clear",
                    hint="connect with sslmode=require (or verify-full)",
                ),
                "tls_required",
            )
        self.identity = await self._authenticate()
        self.application_name = request.application_name
        self.encoding = python_codec(request.forwarded.get("client_encoding", "UTF8"))
        await self._connect_upstream(request)

    def _refuse_if_draining(self) -> None:
        if self.server.draining:
            raise _Refused(
                _fatal(
                    "57P01",
                    "pgwarden: the proxy is shutting down and accepts no new sessions",
                    hint="reconnect in a moment; another replica will take the session",
                ),
                "shutting_down",
            )

    async def _answer_ssl_request(self) -> None:
        c = self.client
        ctx = self.server.tls_context
        if c.tls:
            raise ProtocolViolation("SSLRequest on an encrypted connection")
        if ctx is None:
            c.write(b"N")
            return
        c.write(b"S")
        if c.buffered:
            # bytes sent in clear after SSLRequest could be injected by a man in the middle
            raise ProtocolViolation("unencrypted data after SSLRequest")
        try:
            await c.start_tls(ctx, server_side=True, hostname=None)
        except (OSError, ConnectionError) as e:
            raise _Quiet() from e

    async def _authenticate(self) -> Identity:
        c = self.client
        c.write(m.auth_cleartext_password())
        type_, body = await c.read_message(_TOKEN_MESSAGE_LIMIT)
        if type_ != b"p":
            raise ProtocolViolation(f"expected a password message, got {type_!r}")
        token = body.rstrip(b"\x00").decode("ascii", errors="replace").strip()
        try:
            identity = await self.server.verifier.verify(token)
        except TokenRejected as e:
            raise _Refused(_fatal(e.sqlstate, f"pgwarden: {e.message}"), e.reason) from e
        if not self.server.policies_for(identity):
            groups = ", ".join(sorted(identity.groups)) or "none"
            raise _Refused(
                _fatal(
                    "28000",
                    f'pgwarden: no AccessPolicy grants "{identity.username}" (groups: {groups}) '
                    f'access to connection "{self.cfg.connection}"',
                    hint="ask a platform engineer to add you or one of your groups to the "
                    "subjects of an AccessPolicy for this connection",
                ),
                "no_policy",
            )
        return identity

    async def _connect_upstream(self, request: StartupRequest) -> None:
        try:
            assert self.identity is not None
            self._refresh_policy()
            # the policy's settings last: a client parameter cannot override them
            up = await connect_upstream(
                self.cfg.upstream, {**request.forwarded, **self.policy.upstream_settings()}
            )
        except UpstreamError as e:
            self.server.metrics.upstream_errors.labels(e.reason).inc()
            raise _Refused(_fatal(e.sqlstate, e.message), "upstream_" + e.reason) from e
        self.upstream = up
        for name, value in up.parameters.items():  # the server's own defaults count too
            hazard = parsing_hazard(name, value)
            if hazard is not None:
                raise _Refused(hazard_error(hazard), "unsafe_setting")
        self._refuse_if_draining()
        self.key = self.server.register(self)
        self.tracker.transaction_status = up.transaction_status
        identity = self.identity
        assert identity is not None
        self.server.metrics.sessions_total.inc()
        self.server.sink.session(
            SessionEvent(
                "session_start",
                self.id,
                self.cfg.connection,
                identity.username,
                time.time(),
                {
                    "groups": sorted(identity.groups),
                    "subject": identity.subject,
                    "issuer": identity.issuer,
                    "actor": identity.actor,
                    "client": self.peer,
                    "application_name": self.application_name,
                    "tls": self.client.tls,
                    "policies": [p.name for p in self.server.policies_for(identity)],
                    "effective_policy": self.policy.as_dict(),
                    "token_expires": identity.expires_at.isoformat(),
                },
            )
        )
        self.client.write(
            m.auth_ok()
            + b"".join(up.startup_messages)
            + m.backend_key_data(*self.key)
            + m.ready_for_query(up.transaction_status)
        )

    # ================================================================== relay
    def _start_relay(self) -> None:
        up = self.upstream
        assert up is not None
        assert self.identity is not None
        self._server_scanner.row_budget = self._max_rows
        self.client.peer = up.endpoint
        up.endpoint.peer = self.client
        loop = asyncio.get_running_loop()
        delay = self.identity.usable_until.timestamp() - time.time()
        self._expiry_timer = loop.call_later(max(delay, 0.0), self._token_expired)
        up.endpoint.start_relay(self._on_server_data, self._on_server_closed)
        self.client.start_relay(self._on_client_data, self._on_client_closed)

    def _on_client_data(self, data: bytes) -> None:
        up = self.upstream
        assert up is not None
        out: list[bytes] = []
        try:
            for item in self._client_scanner.feed(data):
                if type(item) is bytes:
                    out.append(item)
                else:
                    assert isinstance(item, Message)
                    self._client_message(item, out)
        except ProtocolViolation as e:
            self.server.metrics.protocol_violations.inc()
            if out:
                up.endpoint.writelines(out)
            self._close(_fatal("08P01", f"pgwarden: {e}"), reason=f"protocol violation: {e}")
            return
        if out:
            up.endpoint.writelines(out)
            self.server.metrics.bytes_to_server.inc(len(data))
        if self._terminating is not None:
            self._maybe_terminate()

    def _client_message(self, msg: Message, out: list[bytes]) -> None:
        t = msg.type
        if t == 66:  # B Bind
            bind = m.BindMessage.parse(msg.body)
            prepared = self._prepared.get(bind.statement)
            info = prepared[0][0] if prepared else _UNKNOWN_STATEMENT
            self._portals[bind.portal] = (info, bind, prepared[1] if prepared else ())
            self.tracker.request(Kind.BIND)
        elif t == 69:  # E Execute
            portal = m.Reader(msg.body).cstring()
            portal_entry = self._portals.get(portal)
            if portal_entry is None:
                info, params = _UNKNOWN_STATEMENT, None
            else:
                info, bind, types = portal_entry
                params = bind.rendered_params(types)
            op, decision = self._decide(info, params, "extended")
            if decision.allowed:
                self.tracker.request(Kind.EXECUTE, [op])
            else:
                self.tracker.request(Kind.EXECUTE, [op], refusal=decision.error)
                out.append(_POISON)
                return
        elif t == 83:  # S Sync
            self.tracker.request(Kind.SYNC)
        elif t == 80:  # P Parse
            r = m.Reader(msg.body)
            name = r.cstring()
            text = self._decode(r.body[r.pos : r.body.find(b"\x00", r.pos)])
            infos = self.server.analyzer.analyze(text) or (
                dataclasses.replace(_UNKNOWN_STATEMENT, text=text, command="EMPTY"),
            )
            self._prepared[name] = (infos, m.parse_param_types(msg.body))
            self.tracker.request(Kind.PARSE)
        elif t == 81:  # Q Query
            if not self._query(msg, out):
                return
        elif t == 68:  # D Describe
            kind = Kind.DESCRIBE_STATEMENT if msg.body[:1] == b"S" else Kind.DESCRIBE_PORTAL
            self.tracker.request(kind)
        elif t == 67:  # C Close
            r = m.Reader(msg.body)
            what, name = r.raw(1), r.cstring()
            (self._prepared if what == b"S" else self._portals).pop(name, None)
            self.tracker.request(Kind.CLOSE)
        elif t in (72, 99, 102):  # H Flush, c CopyDone, f CopyFail
            pass
        elif t == 88:  # X Terminate
            self.end_reason = "client terminated"
        elif t == 70:  # F FunctionCall
            self._refuse_function_call(msg, out)
            return
        else:
            raise ProtocolViolation(f"invalid frontend message type {chr(t)!r}")
        out.append(msg.raw)

    def _query(self, msg: Message, out: list[bytes]) -> bool:
        text = self._decode(msg.body[:-1])
        infos = self.server.analyzer.analyze(text)
        ops: list[Op] = []
        refusal: Decision | None = None
        for info in infos:
            info = self._resolve_sql_prepare(info)
            op, decision = self._decide(info, None, "simple")
            ops.append(op)
            if not decision.allowed and refusal is None:
                refusal = decision
        if refusal is not None:
            # A query is refused whole, before any part of it runs.
            for op in ops:
                op.event.decision = "refuse"
                op.event.policy = refusal.policy
            self.tracker.request(Kind.QUERY, ops, refusal=refusal.error)
            out.append(_POISON_SYNC)
            return False
        self.tracker.request(Kind.QUERY, ops)
        return True

    def _resolve_sql_prepare(self, info: StatementInfo) -> StatementInfo:
        """SQL-level PREPARE/EXECUTE: an EXECUTE takes the classes recorded at PREPARE."""
        if info.prepares:
            self._sql_prepared[info.prepares] = info
        elif info.executes:
            prepared = self._sql_prepared.get(info.executes)
            if prepared is not None:
                known = info.classes - {StatementClass.UNKNOWN}
                return dataclasses.replace(info, classes=known | prepared.classes)
        return info

    def _refuse_function_call(self, msg: Message, out: list[bytes]) -> None:
        oid = int.from_bytes(msg.body[:4], "big") if len(msg.body) >= 4 else 0
        info = dataclasses.replace(
            _UNKNOWN_STATEMENT,
            text=f"<FunctionCall oid={oid}>",
            command="FUNCTION CALL",
            error=None,
        )
        op, _ = self._decide(info, None, "fastpath")
        err = m.ErrorInfo(
            "42501",
            "pgwarden: fast-path function calls (FunctionCall messages) are not allowed",
            hint="call the function in a SQL statement instead, e.g. SELECT fn(...)",
        )
        op.event.decision = "refuse"
        self.tracker.request(Kind.QUERY, [op], refusal=err)
        out.append(_POISON_SYNC)

    def _decide(
        self, info: StatementInfo, params: list[str | None] | None, protocol: str
    ) -> tuple[Op, Decision]:
        identity = self.identity
        assert identity is not None
        if self._policy_generation != self.server.policy.generation:
            self._refresh_policy()
        decision = self.policy.decide(info)
        self.statements += 1
        ev = StatementEvent(
            session_id=self.id,
            connection=self.cfg.connection,
            identity=identity.username,
            statement=info.text,
            fingerprint=info.fingerprint,
            classes=tuple(sorted(info.classes)),
            command=info.command,
            parameters=params,
            protocol=protocol,
            decision=decision.word,
            policy=decision.policy,
            start=time.time(),
        )
        return Op(ev), decision

    def _refresh_policy(self) -> None:
        """Take the identity's effective policy (at login, and after each reload)."""
        assert self.identity is not None
        store = self.server.policy
        self._policy_generation = store.generation
        self.policy = store.effective(self.identity)
        self._max_rows = self.policy.max_rows
        if self.tracker.idle:  # otherwise the running statement ends first (_end_of_rows)
            self._server_scanner.row_budget = self._max_rows

    def _decode(self, raw: bytes) -> str:
        return raw.decode(self.encoding, errors="replace")

    def _statement_done(self, ev: StatementEvent) -> None:
        self.server.metrics.statement(ev.classes, ev.decision, ev.duration_ms / 1000.0)
        self.server.sink.statement(ev)

    def _on_server_data(self, data: bytes) -> None:
        out: list[bytes] = []
        server = self.tracker.server
        hazard: str | None = None
        scanner = self._server_scanner
        try:
            for item in self._server_scanner.feed(data):
                if type(item) is bytes:
                    out.append(item)
                    continue
                assert isinstance(item, Message)
                if item.type in _STATEMENT_END and (
                    scanner.row_budget is not None or self._max_rows is not None
                ):
                    item = self._end_of_rows(item, out)
                reply = server(item)
                if reply is not None:
                    out.append(reply)
                if item.type == 83:  # S ParameterStatus
                    hazard = self._parameter_status(item.body) or hazard
        except ProtocolViolation as e:
            if out:
                self.client.writelines(out)
            self._close(
                _fatal("08P01", "pgwarden: the database sent invalid data"),
                reason=f"upstream protocol violation: {e}",
            )
            return
        if out:
            self.client.writelines(out)
            self.server.metrics.bytes_to_client.inc(len(data))
        if hazard is not None:
            # A SET after login can do what the startup checks refuse: end the session before
            # the proxy misreads a later statement.
            self.terminate(hazard_error(hazard), reason=f"unsafe setting: {hazard}")
        elif self._terminating is not None:
            self._maybe_terminate()

    def _end_of_rows(self, msg: Message, out: list[bytes]) -> Message:
        """A statement's rows ended: say so if maxRows cut them, and reset the budget."""
        scanner = self._server_scanner
        dropped = scanner.dropped
        scanner.row_budget = self._max_rows
        scanner.dropped = 0
        if not dropped or msg.type not in (67, 115):  # C CommandComplete, s PortalSuspended
            return msg
        out.append(m.notice_response(self.policy.rows_cut_notice(dropped)))
        if msg.type != 67:
            return msg
        # the tag counts what the client got ("SELECT 1000", not the rows the server found)
        verb, _, count = msg.body[:-1].rpartition(b" ")
        if not count.isdigit():
            return msg
        body = verb + b" " + str(max(int(count) - dropped, 0)).encode() + b"\x00"
        return Message(67, body, m.frame(b"C", body), msg.rows, msg.row_bytes)

    def _parameter_status(self, body: bytes) -> str | None:
        """Follow the session's settings; returns a parsing hazard the server just reported."""
        r = m.Reader(body)
        name, value = r.cstring(), r.cstring()
        if name.lower() == "client_encoding":
            self.encoding = python_codec(value)
        return parsing_hazard(name, value)

    def _on_client_closed(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            up = self.upstream.endpoint
            if not up.closed and self._client_scanner.at_boundary:
                up.write(m.terminate())
            up.close()
        self._finish()

    def _on_server_closed(self, exc: Exception | None) -> None:
        if not self.client.closed:
            if self._server_scanner.at_boundary:
                self.client.write(
                    m.error_response(
                        _fatal("08006", "pgwarden: the database closed the connection")
                    )
                )
                if self.end_reason == "client closed":
                    self.end_reason = "database closed the connection"
            self.client.close()
        self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # ================================================================== termination
    def _token_expired(self) -> None:
        identity = self.identity
        assert identity is not None
        when = identity.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.terminate(
            _fatal(
                "28000",
                f"pgwarden: the session's token expired at {when}",
                hint="get a fresh token and reconnect",
            ),
            reason="token expired",
        )

    def terminate(self, info: m.ErrorInfo, *, reason: str, when_idle: bool = False) -> None:
        """End the session with a FATAL error at the next message boundary (or once idle)."""
        if self._terminating is None or not when_idle:
            self._terminating = info
            self._terminate_when_idle = when_idle
            self.end_reason = reason
        self._maybe_terminate()

    def _maybe_terminate(self) -> None:
        info = self._terminating
        if info is None or not self._server_scanner.at_boundary:
            return
        if self._terminate_when_idle and not self.tracker.idle:
            return
        self._close(info, reason=self.end_reason)

    def _close(self, info: m.ErrorInfo | None, *, reason: str) -> None:
        self.end_reason = reason
        if info is not None and not self.client.closed:
            self.client.write(m.error_response(info))
        self.client.close()
        if self.upstream is not None:
            up = self.upstream.endpoint
            if self._client_scanner.at_boundary:
                up.write(m.terminate())
            up.close()
        self._finish()

    @property
    def busy(self) -> bool:
        return not self.tracker.idle

    def _ended(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self.server.unregister(self)
        identity = self.identity
        if identity is None:
            return
        self.server.sink.session(
            SessionEvent(
                "session_end",
                self.id,
                self.cfg.connection,
                identity.username,
                time.time(),
                {
                    "reason": self.end_reason,
                    "statements": self.statements,
                    "duration_s": round(time.time() - self.started, 3),
                },
            )
        )
        log.info("session ended", extra={"session_id": self.id, "reason": self.end_reason})


def new_backend_key() -> tuple[int, int]:
    return secrets.randbelow(2**31 - 1) + 1, secrets.randbits(31)
