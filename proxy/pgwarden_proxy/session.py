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
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from pgwarden.api.approvals import (
    ApprovalRequestSpec,
    ApprovalRequestStatus,
    ApprovalState,
    Requester,
)
from pgwarden.api.statements import StatementClass
from pgwarden_proxy.approvals.backend import ApprovalBackend, ApprovalError, same_person
from pgwarden_proxy.auth.oidc import Identity, TokenRejected
from pgwarden_proxy.decision import Decision
from pgwarden_proxy.endpoint import ConnectionClosed, Endpoint
from pgwarden_proxy.events import SessionEvent, StatementEvent
from pgwarden_proxy.fastpath import FastStatement, new_fast_path
from pgwarden_proxy.masking.catalog import CatalogError
from pgwarden_proxy.masking.errors import Scope, redact_report, report_scope
from pgwarden_proxy.masking.planner import StatementPlan, fetch_cursor
from pgwarden_proxy.masking.rows import CopyMask, ResultMask, Rewriter
from pgwarden_proxy.policy import EffectivePolicy
from pgwarden_proxy.recording.capture import ResultCapture
from pgwarden_proxy.recording.recorder import SessionRecorder
from pgwarden_proxy.sql.classify import StatementInfo, fingerprint
from pgwarden_proxy.sql.secrets import redact
from pgwarden_proxy.startup import (
    StartupRefused,
    StartupRequest,
    check_startup,
    hazard_error,
    parsing_hazard,
    python_codec,
)
from pgwarden_proxy.tracker import Kind, Op, Pending, Tracker, tag_rows
from pgwarden_proxy.upstream import UpstreamConnection, UpstreamError
from pgwarden_proxy.upstream import connect as connect_upstream
from pgwarden_proxy.wire import messages as m
from pgwarden_proxy.wire.framing import Message, ProtocolViolation, Rows, Scanner

if TYPE_CHECKING:
    from pgwarden_proxy.server import ProxyServer
    from pgwarden_proxy.wire._fastpath import Done, FastPath

log = logging.getLogger("pgwarden.session")

_TOKEN_MESSAGE_LIMIT = 64 * 1024
# A statement name no client uses: describing it fails harmlessly (26000), which is how a refused
# request is made to fail on the server too.
_POISON = m.describe_statement("pgwarden.refused")
_POISON_SYNC = _POISON + m.sync()
_FLUSH = m.frame(b"H")
_CANCELED = "canceled by the client"
# Settings that change how SQL is read. The statements after one are read only once the server
# has answered it: its ParameterStatus may end the session first (see startup.parsing_hazard).
_PARSER_SETTINGS = frozenset({"standard_conforming_strings", "client_encoding", "*"})
_DATAROW, _COPYDATA = ord("D"), ord("d")
# where one statement's rows end: CommandComplete, PortalSuspended, Error, EmptyQuery, Ready
_STATEMENT_END = frozenset(b"CsEIZc")
# When a statement's event must be fsynced before the statement runs (see _must_sync)
_NO_EFFECT = frozenset({"read", "transaction"})
_UNDONE_BY_ROLLBACK = _NO_EFFECT | {
    "write",
    "unqualified-write",
    "ddl",
    "drop",
    "truncate",
    "dcl",
    "settings",
}
_COMMITS = frozenset({"COMMIT", "PREPARE TRANSACTION", "COMMIT PREPARED"})
_STAYS_IN_BLOCK = frozenset({"BEGIN", "START TRANSACTION", "SAVEPOINT"})
# what masking looks at: COPY rows, RowDescription, CopyOutResponse (rows come as `Rows`)
_MASKED_TYPES = frozenset(b"dTH")
# Kind members as module constants: `Kind.X` is a slow attribute lookup on an enum class
_BIND, _SYNC, _EXECUTE = Kind.BIND, Kind.SYNC, Kind.EXECUTE
_DESCRIBE_STATEMENT, _DESCRIBE_PORTAL = Kind.DESCRIBE_STATEMENT, Kind.DESCRIBE_PORTAL
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


class _CatalogDown(Exception):
    """Masking applies and the catalog cannot be read: the statement is refused."""


class _Prepared(NamedTuple):
    infos: tuple[StatementInfo, ...]
    types: tuple[int, ...]  # parameter type OIDs from Parse
    plans: list[StatementPlan | None]  # under the session's masking rules (see _replan)


class _MaskMemo(NamedTuple):
    plan: StatementPlan | None
    rewriter: Rewriter
    generation: int  # the catalog's
    encoding: str
    result: tuple[ResultMask | None, bytes]


class _Portal(NamedTuple):
    info: StatementInfo
    bind: m.BindMessage
    types: tuple[int, ...]
    plan: StatementPlan | None


def _fatal(sqlstate: str, message: str, hint: str | None = None) -> m.ErrorInfo:
    return m.ErrorInfo(sqlstate, message, "FATAL", hint=hint)


class Session:
    def __init__(self, server: ProxyServer, client: Endpoint, peer: str) -> None:
        self.server = server
        self.cfg = server.config
        self._metrics = server.metrics
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
        # prepared statements by name, as the server has them: protocol Parse and SQL PREPARE
        # share one namespace there, and so they do here
        self._prepared: dict[str, _Prepared] = {}
        self._portals: dict[str, _Portal] = {}
        self._cursor_plans: dict[str, StatementPlan] = {}
        # client input while a message waits (approval, catalog): the scanner's items in
        # progress, and data that arrived meanwhile
        self._client_items: Iterator[bytes | Message | Rows] | None = None
        self._client_backlog: list[bytes] = []
        self._waiting: asyncio.Task[None] | None = None
        self._decision: asyncio.Future[ApprovalRequestStatus] | None = None  # a held statement
        self._hold_canceled = False
        # the result being masked: its rows arrive whole and are rewritten
        self._result_mask: ResultMask | None = None
        self._copy_mask: CopyMask | None = None
        self._rewriter: Rewriter | None = None  # set when the effective policy masks
        self._mask_memo: dict[bytes, _MaskMemo] = {}
        self._described: str | None = None  # the portal the client just asked to Describe
        # the Execute of a COPY, until the client ends its copy data (or sends another request)
        self._copy_execute: Pending | None = None
        limits = self.cfg.limits
        self._client_scanner = Scanner(
            streamed=(_COPYDATA,), max_message=limits.max_message_bytes, frontend=True
        )
        self._server_scanner = Scanner(
            streamed=(_DATAROW, _COPYDATA), counted=_DATAROW, max_message=limits.max_message_bytes
        )
        self.tracker = Tracker(self._statement_done)
        # executions of registered prepared statements, relayed in C (fastpath.py); while its
        # queue is active, the tracker's requests come after the queue's
        self._fast = new_fast_path(limits.max_message_bytes)
        self._fast_bound = False  # the unnamed portal was last bound on the fast path
        self.policy = EffectivePolicy.combine(())  # set at login, renewed after a reload
        self._policy_generation = -1
        self._stale_plans = False  # the masking rules changed since the prepared statements' plans
        self._max_rows: int | None = None  # the effective policy's maxRows
        # the recording: every statement's event is written before the statement goes
        # upstream; one that may change anything waits for the fsync too (spool ticket
        # `_need`), and what the client sends meanwhile waits in `_deferred`
        self._rec: SessionRecorder | None = None
        self._need = 0
        self._deferred: list[bytes] | None = None
        self._capture: ResultCapture | None = None  # level `results`: the rows sent

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
            elif code in (m.CANCEL_REQUEST_CODE, m.PEER_CANCEL_REQUEST_CODE):
                from_peer = code == m.PEER_CANCEL_REQUEST_CODE
                await self.server.cancel(r.int32(), r.int32(), from_peer=from_peer)
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
        recorder = self.server.recorder
        refusal = recorder.refusal() if recorder is not None else None
        if refusal is not None:
            raise _Refused(dataclasses.replace(refusal, severity="FATAL"), "recording")
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
        policies = [p.name for p in self.server.policies_for(identity)]
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
                    "policies": policies,
                    "effective_policy": self.policy.as_dict(),
                    "token_expires": identity.expires_at.isoformat(),
                },
            )
        )
        if recorder is not None:
            self._rec = recorder.open_session(
                self.id,
                identity.username,
                self.policy.recording_level,
                {
                    "groups": sorted(identity.groups),
                    "subject": identity.subject,
                    "issuer": identity.issuer,
                    "actor": identity.actor,
                    "client": self.peer,
                    "applicationName": self.application_name,
                    "tls": self.client.tls,
                    "policies": policies,
                    "effectivePolicy": self.policy.as_dict(),
                    "tokenExpires": identity.expires_at.isoformat(),
                },
            )
            self._capture_level()
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
        self._metrics.to_server_bytes += len(data)
        if self._client_items is not None:  # waiting (approval, catalog): keep it for later
            self._client_backlog.append(data)
            return
        fast = self._fast
        if fast is not None:
            rec = self._rec
            if (
                self._terminating is None
                and self._policy_generation == self.server.policy.generation
                and self._client_scanner.at_boundary
                and (fast.active or (self.tracker.idle and self._server_scanner.at_boundary))
                and (rec is None or rec.recorder.refusal() is None)
            ):
                # (as in _intend: in a block for sure only when nothing is in flight)
                in_block = not fast.active and self.tracker.transaction_status in (b"T", b"E")
                executes = fast.client(data)
                if executes >= 0:
                    self.statements += executes
                    self._fast_bound = True
                    self._described = None
                    if rec is None:
                        assert self.upstream is not None
                        self.upstream.endpoint.write(data)
                    else:
                        if executes:
                            self._fast_intend(fast, in_block)
                        self._to_server([data])
                    return
            self._settle_fast()
        self._client_items = self._client_scanner.feed(data)
        self._pump_client()

    def _pump_client(self) -> None:
        """Handle client messages until the input runs out or one has to wait."""
        up = self.upstream
        assert up is not None
        out: list[bytes] = []
        try:
            while self._client_items is not None:
                for item in self._client_items:
                    if type(item) is bytes:
                        out.append(item)
                        continue
                    assert isinstance(item, Message)
                    later = self._client_message(item, out)
                    if later is not None:
                        if out:
                            self._to_server(out)
                        self._wait_then_pump(later)
                        return
                if self._client_backlog:
                    data = b"".join(self._client_backlog)
                    self._client_backlog.clear()
                    self._client_items = self._client_scanner.feed(data)
                else:
                    self._client_items = None
        except ProtocolViolation as e:
            self._client_items = None
            self.server.metrics.protocol_violations.inc()
            if out:
                self._to_server(out)
            self._close(_fatal("08P01", f"pgwarden: {e}"), reason=f"protocol violation: {e}")
            return
        if out:
            self._to_server(out)
        if self._terminating is not None:
            self._maybe_terminate()

    def _wait_then_pump(self, later: Coroutine[Any, Any, None]) -> None:
        """The message being handled waits: stop reading the client until it is done."""
        self.client.hold()

        async def wait() -> None:
            try:
                await later
            except Exception as e:
                log.exception("statement handling failed", extra={"session_id": self.id})
                self._close(
                    _fatal("XX000", "pgwarden: internal error while handling the statement"),
                    reason=f"internal error: {e!r}",
                )
                return
            if self.client.closed or self._terminating is not None:
                return
            self.client.release()
            self._pump_client()

        self._waiting = asyncio.get_running_loop().create_task(wait())

    def _client_message(self, msg: Message, out: list[bytes]) -> Coroutine[Any, Any, None] | None:
        """Handle one message; returns a coroutine when it must wait (it then finishes it)."""
        if self._policy_generation != self.server.policy.generation:
            self._refresh_policy()  # (a reload) before a stored plan or decision is used
        if self._stale_plans:
            later = self._replan(msg)
            if later is not None:
                return later
        t = msg.type
        if self._copy_execute is not None and t != 83 and t != 72:
            self._copy_execute = None  # its copy data ended (CopyDone, CopyFail), or never began
        if t == 66:  # B Bind
            self._bind(m.BindMessage.parse(msg.body))
            self.tracker.request(_BIND)
        elif t == 69:  # E Execute
            return self._execute(msg, out)
        elif t == 83:  # S Sync
            if self._copy_execute is None:
                self.tracker.request(_SYNC)
            else:  # perhaps sent during a COPY FROM STDIN, which ignores it (Tracker.server)
                self.tracker.request(_SYNC, copy_of=self._copy_execute)
        elif t == 80:  # P Parse
            return self._parse(msg, out)
        elif t == 81:  # Q Query
            return self._query(msg, out)
        elif t == 68:  # D Describe
            what, name = msg.body[:1], m.cstring_at(msg.body, 1)
            plan: StatementPlan | None = None
            if what == b"S":
                kind = _DESCRIBE_STATEMENT
                prepared = self._prepared.get(name)
                plan = prepared.plans[0] if prepared else None
            else:
                kind = _DESCRIBE_PORTAL
                self._described = name
                portal = self._portals.get(name)
                plan = portal.plan if portal else None
            self.tracker.request(kind, plan=plan)
        elif t == 67:  # C Close
            r = m.Reader(msg.body)
            what, name = r.raw(1), r.cstring()
            undo = None
            if what == b"S":
                undo = self._forget(name)
            else:
                self._portals.pop(name, None)
            self.tracker.request(Kind.CLOSE, undo=undo)
        elif t in (72, 99, 102):  # H Flush, c CopyDone, f CopyFail
            pass
        elif t == 88:  # X Terminate
            self.end_reason = "client terminated"
        elif t == 70:  # F FunctionCall
            self._refuse_function_call(msg, out)
            return None
        else:
            raise ProtocolViolation(f"invalid frontend message type {chr(t)!r}")
        out.append(msg.raw)
        return None

    def _bind(self, bind: m.BindMessage) -> None:
        prepared = self._prepared.get(bind.statement)
        if prepared is None:
            entry = _Portal(_UNKNOWN_STATEMENT, bind, (), None)
        else:
            entry = _Portal(prepared.infos[0], bind, prepared.types, prepared.plans[0])
        self._portals[bind.portal] = entry
        if self._described == bind.portal:
            self._described = None

    def _parse(self, msg: Message, out: list[bytes]) -> Coroutine[Any, Any, None] | None:
        r = m.Reader(msg.body)
        name = r.cstring()
        text = self._decode(r.body[r.pos : r.body.find(b"\x00", r.pos)])
        infos = tuple(self._resolve(i) for i in self.server.analyzer.analyze(text)) or (
            dataclasses.replace(_UNKNOWN_STATEMENT, text=text, command="EMPTY"),
        )
        later = self._load_functions(infos, msg)
        if later is not None:
            return later
        infos = tuple(self._with_functions(i) for i in infos)
        plans = self._plans(infos)
        if plans is None:
            return self._after(self._prepare_plans(infos), msg)
        plans = [self._session_plan(i, p) for i, p in zip(infos, plans, strict=True)]
        undo = None
        if not name or name not in self._prepared:  # a named one that exists: the server
            # refuses to redefine it (42P05) and keeps the old one, and so does the proxy
            undo = self._define(name, _Prepared(infos, m.parse_param_types(msg.body), plans))
        self.tracker.request(Kind.PARSE, undo=undo)
        out.append(msg.raw)
        return None

    def _execute(self, msg: Message, out: list[bytes]) -> Coroutine[Any, Any, None] | None:
        name = m.cstring_at(msg.body, 0)
        described, self._described = self._described, None  # one Describe, one Execute
        portal = self._portals.get(name)
        if portal is None:
            info, params, plan = _UNKNOWN_STATEMENT, None, None
        else:
            info, params, plan = portal.info, portal.bind.rendered_params(portal.types), portal.plan
        op, decision = self._decide(info, params, "extended", plan)
        if not decision.allowed:
            self._request(Kind.EXECUTE, [op], refusal=decision.error)
            out.append(_POISON)
            return None
        if info.prepares is not None or info.deallocates is not None:
            op.undo = self._record(info, plan)
        forward: list[bytes] = []
        if self.policy.masking and described != name:
            # the rows' columns decide what is masked: ask for them (unless the client just
            # did, as libpq does before every Execute), and keep the answer
            forward.append(m.frame(b"D", b"P" + m.cstr(name)))
        forward.append(msg.raw)
        if decision.hold is not None:
            return self._hold(Kind.EXECUTE, [op], decision, forward, info, params)
        self._send_execute(op, forward, out)
        if info.settings and _PARSER_SETTINGS & info.settings:
            return self._until_idle()
        return None

    def _send_execute(self, op: Op, forward: list[bytes], out: list[bytes]) -> None:
        if len(forward) > 1:
            self.tracker.request(_DESCRIBE_PORTAL, plan=op.plan, internal=True)
        self._request(_EXECUTE, [op])
        if op.event.command == "COPY":  # may start a copy-in (see Sync)
            self._copy_execute = self.tracker.pending[-1]
        out.extend(forward)

    def _query(self, msg: Message, out: list[bytes]) -> Coroutine[Any, Any, None] | None:
        text = self._decode(msg.body[:-1])
        infos = list(self.server.analyzer.analyze(text))
        later = self._load_functions(infos, msg)
        if later is not None:
            return later
        infos = [self._with_functions(i) for i in infos]
        plans = self._plans(infos)
        if plans is None:
            return self._after(self._prepare_plans(infos), msg)
        ops: list[Op] = []
        refusal: Decision | None = None
        hold: Decision | None = None
        for i, (info, plan) in enumerate(zip(infos, plans, strict=True)):
            # in order: an EXECUTE sees a PREPARE earlier in the same string
            info = infos[i] = self._resolve(info)
            plan = self._session_plan(info, plan)
            op, decision = self._decide(info, None, "simple", plan)
            op.undo = self._record(info, plan)
            ops.append(op)
            if not decision.allowed and refusal is None:
                refusal = decision
            elif decision.hold is not None and hold is None:
                hold = decision
        if refusal is not None:
            # A query is refused whole, before any part of it runs.
            for op in ops:
                op.event.decision = "refuse"
                op.event.policy = refusal.policy
            self._request(Kind.QUERY, ops, refusal=refusal.error)
            out.append(_POISON_SYNC)
            return None
        if hold is not None:
            # the person approves what will run: every statement of the query string
            whole = infos[0] if len(infos) == 1 else _whole_query(infos)
            return self._hold(Kind.QUERY, ops, hold, [msg.raw], whole, None)
        self._request(Kind.QUERY, ops)
        out.append(msg.raw)
        if any(_PARSER_SETTINGS & i.settings for i in infos):
            return self._until_idle()
        return None

    # ------------------------------------------------------------------ functions
    def _load_functions(
        self, infos: Sequence[StatementInfo], msg: Message
    ) -> Coroutine[Any, Any, None] | None:
        """Read the catalog entries of the functions a restricted session calls (once)."""
        if not self.policy.restricts:
            return None
        names = {f for i in infos for f in i.functions if "." not in f}
        catalog = self.server.catalog
        if not names or catalog.functions_known(names):
            return None

        async def load() -> None:
            try:
                await catalog.load((), names)
            except CatalogError as e:
                raise _CatalogDown(str(e)) from e

        return self._after(load(), msg)

    def _with_functions(self, info: StatementInfo) -> StatementInfo:
        """A call of a volatile function defined outside pg_catalog runs stored code that may
        change data: it adds procedural and write. (PostgreSQL refuses data changes inside
        stable and immutable functions, so those stay what the statement is.)"""
        if not info.functions or not self.policy.restricts:
            return info
        catalog = self.server.catalog
        for name in info.functions:
            if "." in name:
                continue
            found = catalog.user_functions(name)
            if found is not None and found[1]:
                extra = {StatementClass.PROCEDURAL, StatementClass.WRITE}
                return dataclasses.replace(info, classes=info.classes | extra)
        return info

    # ------------------------------------------------------------------ prepared statements
    def _resolve(self, info: StatementInfo) -> StatementInfo:
        """SQL EXECUTE takes the classes of the statement it runs (PREPAREd or Parsed)."""
        if info.executes:
            prepared = self._prepared.get(info.executes)
            if prepared is not None:
                known = info.classes - {StatementClass.UNKNOWN}
                classes = frozenset().union(known, *(i.classes for i in prepared.infos))
                return dataclasses.replace(info, classes=classes)
        return info

    def _record(self, info: StatementInfo, plan: StatementPlan | None) -> Callable[[], None] | None:
        """What a statement does to the prepared statements; returns how to revert it."""
        if info.prepares is not None:
            if info.prepares in self._prepared:
                return None  # the server refuses to redefine it (42P05) and keeps the old one
            return self._define(info.prepares, _Prepared((info,), (), [plan]))
        if info.deallocates == "*":
            saved = self._prepared
            self._prepared = {}
            self._fast_rebuild()

            def restore() -> None:
                self._prepared = {**saved, **self._prepared}
                self._fast_rebuild()

            return restore
        if info.deallocates is not None:
            return self._forget(info.deallocates)
        return None

    def _define(self, name: str, entry: _Prepared) -> Callable[[], None]:
        before = self._prepared.get(name)
        self._prepared[name] = entry
        self._fast_sync(name)

        def undo() -> None:
            if self._prepared.get(name) is entry:
                if before is None:
                    del self._prepared[name]
                else:
                    self._prepared[name] = before
                self._fast_sync(name)

        return undo

    def _forget(self, name: str) -> Callable[[], None] | None:
        before = self._prepared.pop(name, None)
        if before is None:
            return None
        self._fast_sync(name)

        def undo() -> None:
            self._prepared.setdefault(name, before)
            self._fast_sync(name)

        return undo

    # ------------------------------------------------------------------ fast path
    def _fast_entry(self, prepared: _Prepared) -> FastStatement | None:
        """What the fast path needs to run `prepared`'s executions; None when they must take
        the Python path (a decision that is not a plain allow, or a session that masks, cuts
        rows or records results)."""
        if (
            len(prepared.infos) != 1
            or prepared.plans[0] is not None
            or self._capture is not None  # recording level `results`
            or self.policy.masking  # (and so the rewriter of server reports)
            or self._max_rows is not None
        ):
            return None
        info = prepared.infos[0]
        if (
            info.prepares is not None
            or info.deallocates is not None
            or info.executes is not None
            or _PARSER_SETTINGS & info.settings
            or info.command == "COPY"  # its Syncs may be ignored (Tracker.server)
        ):
            return None
        decision = self.policy.decide(info)
        if not decision.allowed or decision.hold is not None:
            return None
        _, statement, classes = _shown(info)
        return FastStatement(
            info, prepared.types, statement, classes, decision.word, decision.policy
        )

    def _fast_sync(self, name: str) -> None:
        """The fast path follows a change of the prepared statement `name`."""
        fast = self._fast
        if fast is None:
            return
        prepared = self._prepared.get(name)
        entry = None if prepared is None else self._fast_entry(prepared)
        if entry is None:
            fast.unregister(name.encode())
        else:
            fast.register(name.encode(), entry)

    def _fast_rebuild(self) -> None:
        """After a change of policy (or of every prepared statement)."""
        fast = self._fast
        if fast is None:
            return
        fast.clear()
        for name in self._prepared:
            self._fast_sync(name)

    def _settle_fast(self) -> None:
        """Hand what the fast path has in flight to the tracker, and its portal to the session,
        before the Python path handles anything."""
        fast = self._fast
        assert fast is not None
        if self._fast_bound:
            self._fast_bound = False
            body = fast.take_bind()
            if body is not None:
                self._bind(m.BindMessage.parse(body))
        if not fast.active:
            return
        tracker = self.tracker
        for item in fast.take():
            kind = item[0]
            if kind == 66:  # B
                tracker.request(_BIND)
            elif kind == 68:  # D
                tracker.request(_DESCRIBE_PORTAL)
            elif kind == 83:  # S
                tracker.request(_SYNC)
            else:  # E
                _, entry, params, bind, start, t0, rows, nbytes, ev = item
                if ev is None:  # not recorded: no event yet
                    ev = self._fast_event(entry, params, bind, start)
                ev.rows, ev.bytes = rows, nbytes
                op = Op(ev, 0.0, None)
                tracker.request(_EXECUTE, [op])
                op.t0 = t0  # when it was sent

    def _fast_intend(self, fast: FastPath, in_block: bool) -> None:
        """Record the executions the fast path just queued; their events go with them."""
        events = [self._fast_event(*fresh) for fresh in fast.fresh()]
        self._record_intents(events, in_block)
        fast.note(events)

    def _fast_event(
        self, entry: FastStatement, params: list[str | None] | None, bind: bytes, start: float
    ) -> StatementEvent:
        """The event `_decide` makes, for an execution on the fast path."""
        if params is None:  # some were sent in binary
            params = m.BindMessage.parse(bind).rendered_params(entry.types)
        return self._event(
            entry.info,
            entry.statement,
            entry.classes,
            params,
            "extended",
            entry.decision,
            entry.policy,
            start,
        )

    def _fast_done(self, done: list[Done]) -> None:
        """Statements the fast path saw through: their events, as the tracker gives them."""
        for entry, params, bind, start, duration_ms, rows, nbytes, tag, ev in done:
            if ev is None:  # not recorded: no event yet
                ev = self._fast_event(entry, params, bind, start)
            ev.duration_ms = duration_ms
            ev.rows = rows or tag_rows(tag)
            ev.bytes = nbytes
            ev.command_tag = tag
            self._statement_done(ev)

    # ------------------------------------------------------------------ masking plans
    def _plans(self, infos: Sequence[StatementInfo]) -> list[StatementPlan | None] | None:
        """Each statement's masking plan (None: no masking); None when the catalog is needed."""
        rules = self.policy.masking
        if not rules:
            return [None] * len(infos)
        planner = self.server.planner
        plans = [planner.cached(i, rules) for i in infos]
        return None if any(p is None for p in plans) else plans

    def _replan(self, msg: Message) -> Coroutine[Any, Any, None] | None:
        """The masking rules changed (a reload): plan every prepared statement (and bound
        portal) again under the new ones, before `msg` can use one. Returns a coroutine when
        the catalog must be read first (it then handles `msg` again)."""
        planned: list[tuple[_Prepared, list[StatementPlan | None]]] = []
        for prepared in self._prepared.values():
            plans = self._plans(prepared.infos)
            if plans is None:
                infos = [i for p in self._prepared.values() for i in p.infos]
                return self._after(self._prepare_plans(infos), msg)
            planned.append((prepared, plans))
        for prepared, plans in planned:
            # in place: an undo of the Parse that made it still finds it (`_define`)
            prepared.plans[:] = [
                self._session_plan(i, p) for i, p in zip(prepared.infos, plans, strict=True)
            ]
        for name, portal in self._portals.items():
            bound = self._prepared.get(portal.bind.statement)
            if bound is not None and bound.infos[0] is portal.info:
                self._portals[name] = portal._replace(plan=bound.plans[0])
        self._stale_plans = False
        self._fast_rebuild()  # (which takes only statements without a plan)
        return None

    async def _prepare_plans(self, infos: Sequence[StatementInfo]) -> None:
        try:
            await self.server.planner.prepare(infos, self.policy.masking)
        except CatalogError as e:
            # fail closed: without the catalog, masking cannot be decided
            raise _CatalogDown(str(e)) from e

    async def _after(self, first: Awaitable[None], msg: Message) -> None:
        """Wait for `first`, then handle `msg` again (now without waiting for it)."""
        up = self.upstream
        assert up is not None
        try:
            await first
        except _CatalogDown as e:
            self._refuse_now(msg, e.args[0])
            return
        out: list[bytes] = []
        later = self._client_message(msg, out)
        if out:
            self._to_server(out)
        if later is not None:
            await later

    def _refuse_now(self, msg: Message, reason: str) -> None:
        """Refuse a Parse or Query for lack of the catalog (the database may be down)."""
        assert self.upstream is not None
        err = m.ErrorInfo(
            "58000",
            f"pgwarden: judging this statement needs the database catalog (masking, or the "
            f"functions it calls), which cannot be read, so it is not run ({reason})",
            hint="retry in a moment",
        )
        info = dataclasses.replace(_UNKNOWN_STATEMENT, text=self._decode(msg.body[:-1]))
        op, _ = self._decide(info, None, "simple" if msg.type == 81 else "extended", None)
        op.event.decision = "refuse"
        if msg.type == 81:
            self._request(Kind.QUERY, [op], refusal=err)
            self._to_server([_POISON_SYNC])
        else:  # Parse: fail it the way a bad Parse fails, then the server skips to Sync
            self._request(Kind.PARSE, [op], refusal=err)
            self._to_server([_POISON])

    def _session_plan(
        self, info: StatementInfo, plan: StatementPlan | None
    ) -> StatementPlan | None:
        """Cursors and SQL-level prepared statements: FETCH and EXECUTE take the stored plan."""
        if plan is not None and plan.cursor is not None:
            self._cursor_plans[plan.cursor] = plan
        elif info.command in ("FETCH", "MOVE") and self.policy.masking:
            return self._cursor_plans.get(fetch_cursor(info) or "")
        elif info.executes and self.policy.masking:
            prepared = self._prepared.get(info.executes)
            return prepared.plans[0] if prepared is not None else None
        return plan

    # ------------------------------------------------------------------ approvals
    async def _hold(
        self,
        kind: Kind,
        ops: list[Op],
        decision: Decision,
        forward: list[bytes],
        info: StatementInfo,
        params: list[str | None] | None,
    ) -> None:
        """Wait for a person's decision; then run the statement once, or refuse it."""
        up = self.upstream
        identity = self.identity
        assert up is not None
        assert identity is not None
        backend = self.server.approvals
        c = decision.hold
        assert c is not None
        self._intend(ops)  # recorded as held, before anyone is asked
        refusal: m.ErrorInfo | None = None
        approval: dict[str, str | None] = {}
        if backend is None:
            refusal = m.ErrorInfo(
                "42501",
                f'pgwarden: {info.command} needs approval (class "{c}", policy '
                f'"{decision.policy}"), and this proxy has no approval backend',
                hint="ask a platform engineer to configure approvals for this connection",
            )
        else:
            timeout = self.cfg.approvals.hold_timeout.total_seconds()
            spec = ApprovalRequestSpec(
                connection=self.cfg.connection,
                requester=Requester(username=identity.username, groups=sorted(identity.groups)),
                session_id=self.id,
                statement=redact(info.text),
                fingerprint=info.fingerprint or "-",
                classes=sorted(info.classes - {StatementClass.UNKNOWN}) or [c],
                policy=decision.policy or "",
                expires_at=datetime.now(UTC) + timedelta(seconds=timeout),
                parameters=params,
            )
            try:
                name: str | None = await backend.submit(spec)
            except ApprovalError as e:
                name = None
                log.warning("approval request not created", extra={"error": str(e)})
                refusal = m.ErrorInfo(
                    "42501",
                    f'pgwarden: {info.command} needs approval (class "{c}", policy '
                    f'"{decision.policy}"), and the approval request could not be created: {e}',
                    hint="retry in a while, or tell the platform team",
                )
            if name is not None:
                approval = {"request": name, "state": ApprovalState.PENDING.value}
                await self._until_idle()
                self.client.write(
                    m.notice_response(
                        m.ErrorInfo(
                            "01000",
                            f'pgwarden: {info.command} needs approval (class "{c}", policy '
                            f'"{decision.policy}"); approval request {name} is waiting for a '
                            f"person, for up to {timeout:g}s",
                            "NOTICE",
                            hint=backend.how_to_decide(name),
                        )
                    )
                )
                status = await self._wait_for_decision(backend, name, timeout)
                approval.update(
                    state=status.state.value, decidedBy=status.decided_by, comment=status.comment
                )
                if status.comment == _CANCELED and self._hold_canceled:
                    self._hold_canceled = False
                    refusal = m.ErrorInfo(
                        "57014",
                        f"canceling statement due to user request (pgwarden: approval request "
                        f"{name} was withdrawn)",
                    )
                elif status.state is not ApprovalState.APPROVED:
                    by = f" by {status.decided_by}" if status.decided_by else ""
                    why = f": {status.comment}" if status.comment else ""
                    refusal = m.ErrorInfo(
                        "42501",
                        f"pgwarden: {info.command} was not run: approval request {name} was "
                        f"{status.state.value.lower()}{by}{why}",
                        hint="change the statement or ask the approver; an approval covers one "
                        "execution of one statement",
                    )
                elif not status.decided_by or same_person(status.decided_by, identity.username):
                    # whoever can write the backend's store could forge this: four eyes, again
                    refusal = m.ErrorInfo(
                        "42501",
                        f"pgwarden: {info.command} was not run: approval request {name} was "
                        "approved without a second person (decidedBy is empty or the requester)",
                        hint="ask another person to approve the request",
                    )
                    approval["state"] = "Invalid"
        for op in ops:
            op.event.approval = approval or None
            op.event.decision = "approved" if refusal is None else "refuse"
            if self._rec is not None and approval:
                self._need = self._rec.approval(op.event)
        if self.client.closed:
            return
        if refusal is not None:
            for op in ops:
                op.event.decision = "refuse"
            self._request(kind, ops, refusal=refusal)
            self._to_server([_POISON_SYNC if kind is Kind.QUERY else _POISON])
            return
        for op in ops:
            op.event.decision = "approved"
        out: list[bytes] = []
        if kind is Kind.QUERY:
            self._request(Kind.QUERY, ops)
            out.extend(forward)
        else:
            self._send_execute(ops[0], forward, out)
        self._to_server(out)
        if backend is not None:
            try:
                await backend.finish(approval["request"] or "", ApprovalState.EXECUTED)
            except ApprovalError as e:
                log.warning("approval could not be marked executed", extra={"error": str(e)})

    async def _wait_for_decision(
        self,
        backend: ApprovalBackend,
        name: str,
        timeout: float,  # noqa: ASYNC109
    ) -> ApprovalRequestStatus:
        """The decision; a cancel request from the client withdraws the request (57014), and
        so does a client that goes away."""
        waiting = self._decision = asyncio.ensure_future(backend.wait(name, timeout))
        try:
            return await waiting
        except ApprovalError as e:
            return ApprovalRequestStatus(state=ApprovalState.EXPIRED, comment=str(e))
        except asyncio.CancelledError:
            if not self._hold_canceled:
                await self._withdraw(backend, name, "the client went away")
                raise
            await self._withdraw(backend, name, "the client canceled the statement")
            return ApprovalRequestStatus(state=ApprovalState.EXPIRED, comment=_CANCELED)
        finally:
            self._decision = None

    @staticmethod
    async def _withdraw(backend: ApprovalBackend, name: str, why: str) -> None:
        try:
            await asyncio.shield(backend.finish(name, ApprovalState.EXPIRED, f"withdrawn: {why}"))
        except (ApprovalError, asyncio.CancelledError) as e:
            log.info("approval request not withdrawn", extra={"request": name, "error": str(e)})

    def cancel_hold(self) -> bool:
        """A CancelRequest for this session: withdraw a held statement (True if one was held)."""
        if self._decision is None or self._decision.done():
            return False
        self._hold_canceled = True
        self._decision.cancel()
        return True

    async def _until_idle(self) -> None:
        """Until the server has answered everything sent so far: a notice may then be sent
        without cutting into another message, and settings the server reports are known."""
        assert self.upstream is not None
        # the server holds extended-protocol answers until Sync or Flush: ask for them now
        self._to_server([_FLUSH])
        while not (self._idle() and self._server_scanner.at_boundary):
            if self.client.closed:
                return
            await asyncio.sleep(0.01)

    def _refuse_function_call(self, msg: Message, out: list[bytes]) -> None:
        oid = int.from_bytes(msg.body[:4], "big") if len(msg.body) >= 4 else 0
        info = dataclasses.replace(
            _UNKNOWN_STATEMENT,
            text=f"<FunctionCall oid={oid}>",
            command="FUNCTION CALL",
            error=None,
        )
        op, _ = self._decide(info, None, "fastpath", None)
        err = m.ErrorInfo(
            "42501",
            "pgwarden: fast-path function calls (FunctionCall messages) are not allowed",
            hint="call the function in a SQL statement instead, e.g. SELECT fn(...)",
        )
        op.event.decision = "refuse"
        self._request(Kind.QUERY, [op], refusal=err)
        out.append(_POISON_SYNC)

    def _decide(
        self,
        info: StatementInfo,
        params: list[str | None] | None,
        protocol: str,
        plan: StatementPlan | None,
    ) -> tuple[Op, Decision]:
        if self._policy_generation != self.server.policy.generation:
            self._refresh_policy()
        decision = self.policy.decide(info)
        if decision.allowed and plan is not None and plan.refusal is not None:
            decision = self.policy.masking_refusal(info, plan.refusal)
        if decision.allowed and self._rec is not None:
            unrecordable = self._rec.recorder.refusal()
            if unrecordable is not None:
                decision = Decision(False, None, unrecordable)
        self.statements += 1
        _, statement, classes = _shown(info)
        ev = self._event(
            info, statement, classes, params, protocol, decision.word, decision.policy, time.time()
        )
        return Op(ev, 0.0, plan), decision

    def _event(
        self,
        info: StatementInfo,
        statement: str,
        classes: tuple[str, ...],
        params: list[str | None] | None,
        protocol: str,
        decision: str,
        policy: str | None,
        start: float,
    ) -> StatementEvent:
        """A statement's event, as decided (`_decide`, `_fast_event`)."""
        identity = self.identity
        assert identity is not None
        return StatementEvent(  # positional (once per statement): in the order of its fields
            self.id,  # session_id
            self.cfg.connection,
            identity.username,
            statement,
            info.fingerprint,
            classes,
            info.command,
            params,
            protocol,
            decision,
            policy,
            start,
        )

    def _refresh_policy(self) -> None:
        """Take the identity's effective policy (at login, and after each reload)."""
        assert self.identity is not None
        store = self.server.policy
        self._policy_generation = store.generation
        before = self.policy.masking
        self.policy = store.effective(self.identity)
        if self.policy.masking != before and self._prepared:
            self._stale_plans = True  # made under the old rules: _replan before any is used
        self._max_rows = self.policy.max_rows
        if self.tracker.idle:  # otherwise the running statement ends first (_end_of_rows)
            self._server_scanner.row_budget = self._max_rows
        self._rewriter = self.server.rewriter_for(self.policy.masking)
        self._capture_level()
        self._fast_rebuild()  # decisions and what the session does to results may have changed

    def _decode(self, raw: bytes) -> str:
        return raw.decode(self.encoding, errors="replace")

    def _statement_done(self, ev: StatementEvent) -> None:
        if ev.error is None and ("ddl" in ev.classes or "drop" in ev.classes):
            self.server.catalog.invalidate()  # masking must see the new columns and views
        self._metrics.statement(ev.classes, ev.decision, ev.duration_ms / 1000.0)
        self.server.sink.statement(ev)
        if self._rec is not None and ev.seq:
            self._rec.outcome(ev)

    # ------------------------------------------------------------------ recording
    def _request(self, kind: Kind, ops: list[Op], refusal: m.ErrorInfo | None = None) -> None:
        """A request that runs (or refuses) statements: their events are recorded first."""
        self._intend(ops)
        self.tracker.request(kind, ops, refusal)

    def _intend(self, ops: list[Op]) -> None:
        if self._rec is None:
            return
        tracker = self.tracker
        # inside a transaction block, for sure: nothing in flight could have ended it
        in_block = tracker.transaction_status in (b"T", b"E") and not any(
            p.ops for p in tracker.pending
        )
        self._record_intents([op.event for op in ops], in_block)

    def _record_intents(self, events: list[StatementEvent], in_block: bool) -> None:
        """Each statement's event goes to the recording before the statement goes upstream."""
        rec = self._rec
        assert rec is not None
        for ev in events:
            if not ev.seq:
                wait = _must_sync(ev, in_block)
                ticket = rec.statement(ev, sync=wait)
                if wait or ticket < 0:
                    self._need = ticket
            if "transaction" in ev.classes and ev.command not in _STAYS_IN_BLOCK:
                in_block = False

    def _to_server(self, chunks: list[bytes]) -> None:
        """Client messages go upstream once the events of their statements are durable."""
        up = self.upstream
        assert up is not None
        if self._deferred is None:
            rec = self._rec
            if rec is None or 0 <= self._need <= rec.recorder.durable:
                up.endpoint.writelines(chunks)
                return
            self._deferred = []
            rec.recorder.when_durable(self._need, self._recorded)
        self._deferred.extend(chunks)

    def _recording_failed(self) -> None:
        rec = self._rec
        assert rec is not None
        why = rec.recorder.refusal()
        self._close(
            why or _fatal("58030", "pgwarden: the recording failed; nothing may run unrecorded"),
            reason="recording failed",
        )

    def _recorded(self, durable: bool) -> None:
        rec = self._rec
        assert rec is not None
        if not durable:
            self._deferred = None
            self._recording_failed()
            return
        if self._need > rec.recorder.durable:
            rec.recorder.when_durable(self._need, self._recorded)
            return
        chunks, self._deferred = self._deferred, None
        up = self.upstream
        if chunks and up is not None and not up.endpoint.closed:
            up.endpoint.writelines(chunks)

    def _capture_level(self) -> None:
        """Level `results` keeps the rows sent (whole rows, so they can be read)."""
        if self._rec is None:
            return
        if self.policy.recording_level == "results":
            if self._capture is None:
                rc = self.cfg.recording
                self._capture = ResultCapture(rc.result_rows, rc.result_bytes)
        else:
            self._capture = None
        if self.tracker.idle:
            self._server_scanner.whole_rows = (
                self._capture is not None or self._result_mask is not None
            )

    def _on_server_data(self, data: bytes) -> None:
        fast = self._fast
        if fast is not None and fast.active:
            end, done, status = fast.server(data)
            if status is not None:
                self.tracker.transaction_status = status
            if done is not None:  # events first, as on the Python path
                self._fast_done(done)
            if end:
                self.client.write(data if end == len(data) else data[:end])
                self._metrics.to_client_bytes += end
            if end == len(data):
                if self._terminating is not None:
                    self._maybe_terminate()
                return
            self._settle_fast()  # an answer the fast path does not expect: the tracker takes over
            data = data[end:]
        out: list[bytes] = []
        server = self.tracker.server
        hazard: str | None = None
        scanner = self._server_scanner
        capture = self._capture
        rewriter = self._rewriter  # changes only with the policy, on the client's side
        try:
            for item in scanner.feed(data):
                if type(item) is bytes:
                    out.append(item)
                    continue
                if type(item) is Rows:
                    mask = self._result_mask
                    rows = item.data if mask is None or item.rewritten else mask.rows(item.data)
                    out.append(rows)
                    if capture is not None:
                        capture.feed(rows, item.count)
                    continue
                assert isinstance(item, Message)
                t = item.type
                if (t == 69 or t == 78) and rewriter is not None:  # E, N
                    item = self._server_report(item)  # before the tracker records it
                if t in _MASKED_TYPES and rewriter is not None:
                    item = self._mask(item)
                elif t in _STATEMENT_END:
                    if scanner.row_budget is not None or self._max_rows is not None:
                        item = self._end_of_rows(item, out)
                    if self._result_mask is not None or self._copy_mask is not None:
                        self._end_of_masking()
                if capture is not None:
                    self._capture_message(capture, item)
                reply = server(item)
                if reply is not None:
                    out.append(reply)
                if t == 83:  # S ParameterStatus (the type of a replaced message is the same)
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
            self._metrics.to_client_bytes += len(data)
        if hazard is not None:
            # A SET after login can do what the startup checks refuse: end the session before
            # the proxy misreads a later statement.
            self.terminate(hazard_error(hazard), reason=f"unsafe setting: {hazard}")
        elif self._terminating is not None:
            self._maybe_terminate()

    def _capture_message(self, capture: ResultCapture, msg: Message) -> None:
        t = msg.type
        if t == 84:  # T RowDescription (as sent: masked columns are text)
            capture.encoding = self.encoding
            capture.describe(msg.body)
        elif t in (67, 115, 69):  # C CommandComplete, s PortalSuspended, E ErrorResponse
            pending = self.tracker.pending
            op = pending[0].op if pending else None
            if op is not None:
                op.event.result = capture.take()

    # ------------------------------------------------------------------ result masking
    def _mask(self, msg: Message) -> Message:
        t = msg.type
        if t == _COPYDATA:
            copy = self._copy_mask
            if copy is None:
                return msg
            return Message(t, b"", copy.row(msg.body), msg.rows, msg.row_bytes)
        plan = self._plan_of_head()
        rewriter = self._rewriter
        assert rewriter is not None
        scanner = self._server_scanner
        if t == 84:  # T RowDescription: decides this result's rows
            mask, body = self._result_mask_for(msg.body, plan, rewriter)
            self._result_mask = mask
            scanner.whole_rows = mask is not None or self._capture is not None
            scanner.row_rewriter = mask.rows_from if mask is not None else None
            if mask is None or body is msg.body:
                return msg
            return Message(t, body, m.frame(b"T", body), msg.rows, msg.row_bytes)
        # H CopyOutResponse: COPY ... TO STDOUT in text or csv (binary was refused by the plan)
        if (
            plan is not None
            and plan.copy_format in ("text", "csv")
            and (plan.masks_outputs or rewriter.detectors is not None)
        ):
            self._copy_mask = CopyMask(
                plan.outputs or (), rewriter, self.encoding, plan.copy_format == "csv"
            )
            scanner.streamed.discard(_COPYDATA)
        return msg

    def _server_report(self, msg: Message) -> Message:
        """A server ErrorResponse or NoticeResponse with masked values withheld: PostgreSQL
        quotes data in them (`invalid input syntax for type integer: "123-45-6789"`, `Key
        (email)=(...) already exists.`). Done before the tracker sees it, so the client, the
        recording and the log all get the redacted text (masking/errors.py)."""
        rewriter = self._rewriter
        assert rewriter is not None
        scope: Scope | None = None
        if self.policy.masking.columns:
            plan, command = self._statement_of_head()
            scope = report_scope(plan, command)
        body = redact_report(msg.body, self.encoding, scope, rewriter.line_detectors)
        if body is None:
            return msg
        return Message(msg.type, body, m.frame(bytes((msg.type,)), body), msg.rows, msg.row_bytes)

    def _statement_of_head(self) -> tuple[StatementPlan | None, str | None]:
        """The plan and command of the statement the server is answering (an error at Parse or
        Bind belongs to the Execute that follows, as in the tracker); (None, None): unknown."""
        for p in self.tracker.pending:
            if p.kind is Kind.DESCRIBE_STATEMENT or p.kind is Kind.DESCRIBE_PORTAL:
                return p.plan, None
            op = p.op
            if op is not None:
                return op.plan, op.event.command
            if p.kind is not Kind.PARSE and p.kind is not Kind.BIND:
                break
        return None, None

    def _result_mask_for(
        self, row_description: bytes, plan: StatementPlan | None, rewriter: Rewriter
    ) -> tuple[ResultMask | None, bytes]:
        """`ResultMask.build`, remembered: a prepared statement sends the same description
        before every execution."""
        catalog = self.server.catalog
        memo = self._mask_memo.get(row_description)
        if memo is not None:
            m_plan, m_rewriter, generation, encoding, result = memo
            if (
                m_plan is plan
                and m_rewriter is rewriter
                and generation == catalog.generation
                and encoding == self.encoding
            ):
                return result
        result = ResultMask.build(
            row_description, plan, self.policy.masking, catalog, rewriter, self.encoding
        )
        if len(self._mask_memo) >= 256:
            self._mask_memo.clear()
        self._mask_memo[row_description] = _MaskMemo(
            plan, rewriter, catalog.generation, self.encoding, result
        )
        return result

    def _plan_of_head(self) -> StatementPlan | None:
        """The plan of the statement the server is answering."""
        pending = self.tracker.pending
        if not pending:
            return None
        head = pending[0]
        if head.kind is Kind.DESCRIBE_STATEMENT or head.kind is Kind.DESCRIBE_PORTAL:
            return head.plan
        op = head.op
        return op.plan if op is not None else None

    def _end_of_masking(self) -> None:
        self._result_mask = None
        self._copy_mask = None
        self._server_scanner.whole_rows = self._capture is not None
        self._server_scanner.row_rewriter = None
        self._server_scanner.streamed.add(_COPYDATA)

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
        if self._terminate_when_idle and not self._idle():
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
        return not self._idle()

    def _idle(self) -> bool:
        """The server has answered everything the client sent (on either path)."""
        return self.tracker.idle and (self._fast is None or not self._fast.active)

    def _ended(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        if self._waiting is not None and not self._waiting.done():
            self._waiting.cancel()  # a held statement of a vanished client never runs
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
        if self._rec is not None:
            self._rec.end(
                self.end_reason,
                statements=self.statements,
                duration_s=round(time.time() - self.started, 3),
            )
        log.info("session ended", extra={"session_id": self.id, "reason": self.end_reason})


# What the events of a statement show of it, worked out once per StatementInfo: its text with
# secrets redacted and its classes in order. By id; the info is kept, so its id is not reused
# while its entry is here (the analyzer's cache and prepared statements give the same objects).
_SHOWN: dict[int, tuple[StatementInfo, str, tuple[str, ...]]] = {}


def _shown(info: StatementInfo) -> tuple[StatementInfo, str, tuple[str, ...]]:
    known = _SHOWN.get(id(info))
    if known is not None and known[0] is info:
        return known
    if len(_SHOWN) >= 4096:
        _SHOWN.clear()
    known = _SHOWN[id(info)] = (info, redact(info.text), tuple(sorted(info.classes)))
    return known


def _must_sync(ev: StatementEvent, in_block: bool) -> bool:
    """Whether a statement may run only once its event is fsynced (safe from a machine crash),
    rather than once it is written (safe from a killed proxy; fsynced within 50 ms).

    What can leave a lasting effect waits: a change outside a transaction block, a COMMIT (which
    makes the block's changes last), anything that acts outside the database's transactions
    (admin, procedural, files, programs) and whatever a person approved. Reads and transaction
    control change nothing; changes inside a block last only through its COMMIT."""
    if ev.decision == "refuse":
        return False
    if ev.decision == "hold" or ev.command in _COMMITS:
        return True
    classes = ev.classes
    if _NO_EFFECT.issuperset(classes):
        return False
    return not (in_block and _UNDONE_BY_ROLLBACK.issuperset(classes))


def _whole_query(infos: Sequence[StatementInfo]) -> StatementInfo:
    """A multi-statement query string as one statement (what an approval request shows)."""
    text = ";\n".join(i.text for i in infos)
    return dataclasses.replace(
        infos[0],
        text=text,
        command=", ".join(dict.fromkeys(i.command for i in infos)),
        classes=frozenset().union(*(i.classes for i in infos)),
        fingerprint=fingerprint(text),
    )


def new_backend_key() -> tuple[int, int]:
    return secrets.randbelow(2**31 - 1) + 1, secrets.randbits(31)
