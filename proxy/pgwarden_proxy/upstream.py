"""Connecting to the real database with the configured credential, as libpq would.

TLS follows libpq's sslmode semantics; authentication implements cleartext, MD5 and
SCRAM-SHA-256. Whatever goes wrong, the message names the database endpoint and the cause but
never the credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from pgwarden.api.config import SslMode, Upstream
from pgwarden_proxy.auth.scram import AuthFailed, ScramClient, md5_response
from pgwarden_proxy.endpoint import ConnectionClosed, Endpoint
from pgwarden_proxy.wire import messages as m
from pgwarden_proxy.wire.framing import ProtocolViolation

_I32 = struct.Struct("!i")
_HANDSHAKE_MESSAGE_LIMIT = 1 << 20


class UpstreamError(Exception):
    """The database could not be reached or logged into; safe to show to the client."""

    def __init__(self, sqlstate: str, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.reason = reason


@dataclass
class UpstreamConnection:
    endpoint: Endpoint
    parameters: dict[str, str] = field(default_factory=dict)
    # ParameterStatus/NoticeResponse messages of the startup, relayed to the client as they came
    startup_messages: list[bytes] = field(default_factory=list)
    backend_pid: int = 0
    backend_secret: int = 0
    transaction_status: bytes = b"I"


def make_ssl_context(cfg: Upstream) -> ssl.SSLContext | None:
    """libpq semantics: require encrypts only (unless a CA is given, then like verify-ca),
    verify-ca checks the chain, verify-full checks the chain and the host name."""
    if cfg.sslmode is SslMode.DISABLE:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cfg.sslmode is SslMode.VERIFY_FULL:
        return ctx
    ctx.check_hostname = False
    if cfg.sslmode is SslMode.REQUIRE and cfg.ca_file is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _open(cfg: Upstream) -> Endpoint:
    """TCP connect, then negotiate TLS per sslmode."""
    loop = asyncio.get_running_loop()
    where = f"{cfg.host}:{cfg.port}"
    try:
        _, ep = await loop.create_connection(Endpoint, cfg.host, cfg.port)
    except OSError as e:
        raise UpstreamError(
            "08001",
            f"pgwarden could not connect to the database at {where}: {e.strerror or e}",
            reason="unreachable",
        ) from e
    ctx = make_ssl_context(cfg)
    if ctx is None:
        return ep
    ep.write(m.ssl_request())
    answer = await ep.read_exactly(1)
    if answer != b"S":
        ep.close()
        raise UpstreamError(
            "08001",
            f"the database at {where} does not accept TLS but pgwarden is configured with "
            f"sslmode={cfg.sslmode.value}",
            reason="tls_unavailable",
        )
    if ep.buffered:
        ep.close()
        raise UpstreamError(
            "08P01", "the database sent unencrypted data after accepting TLS", reason="protocol"
        )
    try:
        await ep.start_tls(ctx, server_side=False, hostname=cfg.host)
    except ssl.SSLCertVerificationError as e:
        ep.abort()
        raise UpstreamError(
            "08001",
            f"pgwarden refused the database's TLS certificate at {where} "
            f"(sslmode={cfg.sslmode.value}): {e.verify_message}",
            reason="tls_verify",
        ) from e
    except (ssl.SSLError, OSError) as e:
        ep.abort()
        raise UpstreamError(
            "08001", f"TLS handshake with the database at {where} failed: {e}", reason="tls_error"
        ) from e
    return ep


async def connect(cfg: Upstream, startup_params: Mapping[str, str]) -> UpstreamConnection:
    """Open an authenticated session; returns once the server is ready for queries."""
    try:
        async with asyncio.timeout(cfg.connect_timeout.total_seconds()):
            return await _connect(cfg, startup_params)
    except TimeoutError as e:
        raise UpstreamError(
            "08001",
            f"pgwarden timed out connecting to the database at {cfg.host}:{cfg.port} "
            f"after {cfg.connect_timeout.total_seconds():g}s",
            reason="timeout",
        ) from e
    except ConnectionClosed as e:
        raise UpstreamError(
            "08006",
            f"the database at {cfg.host}:{cfg.port} closed the connection during login",
            reason="closed",
        ) from e
    except (ProtocolViolation, ValueError) as e:
        raise UpstreamError(
            "08P01", f"the database sent an invalid message during login: {e}", reason="protocol"
        ) from e


async def _connect(cfg: Upstream, startup_params: Mapping[str, str]) -> UpstreamConnection:
    ep = await _open(cfg)
    try:
        params = {"user": _username(cfg), "database": cfg.database, **startup_params}
        ep.write(m.startup_message(params))
        await _authenticate(ep, cfg)
        conn = UpstreamConnection(ep)
        while True:
            type_, body = await ep.read_message(_HANDSHAKE_MESSAGE_LIMIT)
            if type_ == b"S":
                r = m.Reader(body)
                name = r.cstring()
                conn.parameters[name] = r.cstring()
                conn.startup_messages.append(m.frame(type_, body))
            elif type_ == b"K":
                r = m.Reader(body)
                conn.backend_pid, conn.backend_secret = r.int32(), r.int32()
            elif type_ == b"N":
                conn.startup_messages.append(m.frame(type_, body))
            elif type_ == b"Z":
                conn.transaction_status = body[:1]
                return conn
            elif type_ == b"E":
                raise _server_error(body, cfg)
            else:
                raise ProtocolViolation(f"unexpected message {type_!r} during login")
    except BaseException:
        ep.abort()
        raise


def _server_error(body: bytes, cfg: Upstream) -> UpstreamError:
    fields = m.parse_fields(body)
    code = fields.get("C", "XX000")
    where = f"{cfg.host}:{cfg.port}/{cfg.database}"
    if code in ("28P01", "28000"):
        # The client's token was fine; pgwarden's own credential was refused. Say so plainly.
        return UpstreamError(
            "08004",
            f"the database at {where} refused pgwarden's configured credential ({code}); "
            "this is a deployment problem: ask the operator of this pgwarden endpoint to check "
            "the database credential",
            reason="auth",
        )
    return UpstreamError(
        "08004" if code.startswith("28") else code,
        f"the database at {where} refused the session: {fields.get('M', 'unknown error')}",
        reason="refused",
    )


def _username(cfg: Upstream) -> str:
    try:
        return cfg.read_username()
    except OSError as e:
        raise UpstreamError(
            "08004",
            f"pgwarden cannot read its database user name file ({e.strerror})",
            reason="credential_unreadable",
        ) from e


def _password(cfg: Upstream) -> str:
    try:
        pw = cfg.read_password()
    except OSError as e:
        raise UpstreamError(
            "08004",
            f"pgwarden cannot read its database credential file ({e.strerror})",
            reason="credential_unreadable",
        ) from e
    if pw is None:
        raise UpstreamError(
            "08004",
            "the database asks for a password but this pgwarden endpoint has none configured",
            reason="credential_missing",
        )
    return pw


async def _authenticate(ep: Endpoint, cfg: Upstream) -> None:
    scram: ScramClient | None = None
    while True:
        type_, body = await ep.read_message(_HANDSHAKE_MESSAGE_LIMIT)
        if type_ == b"E":
            raise _server_error(body, cfg)
        if type_ == b"v":
            continue  # NegotiateProtocolVersion: we ask for plain 3.0, nothing to adapt
        if type_ != b"R":
            raise ProtocolViolation(f"unexpected message {type_!r} during authentication")
        r = m.Reader(body)
        code = r.int32()
        try:
            if code == 0:
                return
            if code == 3:
                ep.write(m.password_message(m.cstr(_password(cfg))))
            elif code == 5:
                salt = r.raw(4)
                ep.write(
                    m.password_message(md5_response(_username(cfg), _password(cfg), salt) + b"\x00")
                )
            elif code == 10:
                mechanisms = []
                while (mech := r.cstring()) != "":
                    mechanisms.append(mech)
                scram = ScramClient(_password(cfg), mechanisms)
                ep.write(m.sasl_initial_response(scram.mechanism, scram.client_first()))
            elif code == 11 and scram is not None:
                ep.write(m.password_message(scram.client_final(r.rest())))
            elif code == 12 and scram is not None:
                scram.verify_server_final(r.rest())
            else:
                raise UpstreamError(
                    "08004",
                    f"the database asks for an authentication method pgwarden does not "
                    f"support (code {code}); use scram-sha-256, md5 or password in pg_hba.conf",
                    reason="auth_method",
                )
        except AuthFailed as e:
            raise UpstreamError(
                "08004", f"authentication with the database failed: {e}", reason="auth"
            ) from e


async def send_cancel(cfg: Upstream, pid: int, secret: int) -> None:
    """Forward a cancel to the backend; PostgreSQL answers nothing, errors are only logged."""
    ep = await _open(cfg)
    try:
        ep.write(m.cancel_request(pid, secret))
        # Wait for the server to close, so the cancel has been read before we return.
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            async with asyncio.timeout(5):
                await ep.read_exactly(1)
    finally:
        ep.close()
