"""Client-side login: TLS, startup checks, token validation and the errors a person reads."""

from __future__ import annotations

import base64
import json
import time

import psycopg
import pytest

from pgwarden.api.config import Oidc
from pgwarden.embedded.certs import CertBundle
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden_proxy.auth.oidc import OidcVerifier
from pgwarden_proxy.wire import messages as m
from tests.integration.conftest import MakeProxy, RunningProxy
from tests.integration.rawpg import RawClient, Refusal, error_fields, login_refusal


def refused(proxy: RunningProxy, token: str, *, dbname: str = "app", **params: str) -> Refusal:
    return login_refusal(proxy.port, token, dbname=dbname, **params)


def auth_failures(proxy: RunningProxy, reason: str) -> float:
    value = proxy.thread.server.metrics.registry.get_sample_value(
        "pgwarden_auth_failures_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_each_asymmetric_algorithm_logs_in(
    make_proxy: MakeProxy, issuer: LocalIssuer, alg: str
) -> None:
    if alg == "EdDSA" and "OKP" not in issuer.key_types():
        issuer.add_key("OKP")  # before the proxy starts, so its first JWKS fetch has it
    proxy = make_proxy()
    with psycopg.connect(proxy.dsn(proxy.token(alg=alg))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(
    ("make", "sqlstate", "words", "reason"),
    [
        (lambda i: i.mint(lifetime=-120), "28P01", "expired at", "expired"),
        (
            lambda i: i.mint(not_before=time.time() + 600),
            "28P01",
            "not valid before",
            "not_yet_valid",
        ),
        (lambda i: i.mint(audience="someone-else"), "28P01", "audience", "bad_audience"),
        (lambda i: i.mint(issuer="https://evil.example.com"), "28P01", "issued by", "bad_issuer"),
        (
            lambda i: i.mint_unsigned(sub="a", email="agent@example.com"),
            "28P01",
            "alg",
            "alg_not_allowed",
        ),
        (
            lambda i: i.mint_hs256(b"secret", sub="a", email="agent@example.com"),
            "28P01",
            "alg",
            "alg_not_allowed",
        ),
        (lambda i: "not-a-jwt", "28P01", "token", "malformed"),
        (lambda i: i.mint(email=None), "28000", "email", "missing_claim"),
    ],
    ids=["expired", "nbf", "audience", "issuer", "alg-none", "hs256", "garbage", "no-username"],
)
def test_bad_tokens_are_refused_with_a_reason(
    proxy: RunningProxy, make, sqlstate: str, words: str, reason: str
) -> None:
    token = make(proxy.issuer)
    before = auth_failures(proxy, reason)
    err = refused(proxy, token)
    assert err.sqlstate == sqlstate
    assert words in str(err)
    assert token not in str(err)
    assert (proxy.thread.server.config.upstream.read_password() or "-") not in str(err)
    assert auth_failures(proxy, reason) == before + 1


def test_token_signed_by_an_unpublished_key_is_refused(proxy: RunningProxy) -> None:
    kid = proxy.issuer.add_key("RSA", publish=False)
    err = refused(proxy, proxy.issuer.mint(kid=kid))
    assert err.sqlstate == "28P01"


def test_key_rotation_is_picked_up(make_proxy: MakeProxy, issuer: LocalIssuer) -> None:
    # No refetch rate limit here, so the rotation right after start is seen (the limit itself
    # is covered by the verifier's unit tests).
    settings = Oidc.model_validate({"issuer": issuer.issuer, "audience": "pgwarden"})
    proxy = make_proxy(verifier=OidcVerifier(settings, min_refresh_interval=0))
    kid = proxy.issuer.rotate("RSA")
    with psycopg.connect(proxy.dsn(proxy.issuer.mint(kid=kid))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_identity_without_policy_is_refused_at_login(proxy: RunningProxy) -> None:
    err = refused(proxy, proxy.token(email="outsider@example.com", groups=["contractors"]))
    assert err.sqlstate == "28000"
    assert "no AccessPolicy grants" in str(err)
    assert "outsider@example.com" in str(err)


def test_policy_by_user_name(make_proxy: MakeProxy) -> None:
    p = make_proxy(policies=[{"name": "bot", "spec": {"subjects": {"users": ["bot@example.com"]}}}])
    with psycopg.connect(p.dsn(p.token(email="bot@example.com", groups=[]))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert refused(p, p.token()).sqlstate == "28000"


def test_wrong_database_is_3d000(proxy: RunningProxy) -> None:
    err = refused(proxy, proxy.token(), dbname="postgres")
    assert err.sqlstate == "3D000"
    assert 'serves database "app"' in str(err)


def test_startup_parameters_allow_list(proxy: RunningProxy) -> None:
    with psycopg.connect(proxy.dsn(options="-c search_path=public -c TimeZone=UTC")) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("public",)
    err = refused(proxy, proxy.token(), options="-c statement_timeout=0")
    assert err.sqlstate == "42501"
    assert "statement_timeout" in str(err)
    err = refused(proxy, proxy.token(), options="-c default_transaction_read_only=off")
    assert err.sqlstate == "42501"


def test_replication_connections_are_refused(proxy: RunningProxy) -> None:
    c = RawClient(proxy.port)
    t, body = c.startup(proxy.token(), replication="database")[0]
    assert t == b"E"
    assert error_fields(body)["C"] == "28000"
    assert "replication" in error_fields(body)["M"]


def test_newer_protocol_minor_and_pq_options_get_negotiate(proxy: RunningProxy) -> None:
    c = RawClient(proxy.port)
    body = (
        (3 << 16 | 2).to_bytes(4, "big")
        + b"".join(
            m.cstr(k) + m.cstr(v)
            for k, v in {"user": "agent", "database": "app", "_pq_.future": "1"}.items()
        )
        + b"\x00"
    )
    c.send((len(body) + 4).to_bytes(4, "big") + body)
    t, v = c.recv()
    assert t == b"v"
    r = m.Reader(v)
    assert r.int32() == 0
    assert r.int32() == 1
    assert r.cstring() == "_pq_.future"
    assert c.recv()[0] == b"R"
    c.send(m.password_message(proxy.token().encode() + b"\x00"))
    assert c.until_ready_or_error()[-1][0] == b"Z"


def test_gssenc_is_declined_then_login_proceeds(proxy: RunningProxy) -> None:
    c = RawClient(proxy.port)
    c.send((8).to_bytes(4, "big") + m.GSSENC_REQUEST_CODE.to_bytes(4, "big"))
    assert c.recv_byte() == b"N"
    assert c.startup(proxy.token())[-1][0] == b"Z"
    # libpq's gssencmode=prefer takes the same path
    with psycopg.connect(proxy.dsn(gssencmode="prefer")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_plaintext_refused_unless_allowed(make_proxy: MakeProxy) -> None:
    p = make_proxy(listen={"insecurePlaintext": False})
    c = RawClient(p.port)
    t, body = c.startup(p.token())[0]
    assert t == b"E"
    assert error_fields(body)["C"] == "28000"
    assert "TLS" in error_fields(body)["M"]


def test_tls_login_and_ssl_request_without_tls(
    make_proxy: MakeProxy, proxy_certs: CertBundle
) -> None:
    p = make_proxy(
        listen={
            "insecurePlaintext": False,
            "tls": {"certFile": str(proxy_certs.cert), "keyFile": str(proxy_certs.key)},
        }
    )
    dsn = p.dsn(sslmode="verify-full", sslrootcert=str(proxy_certs.ca_cert)).replace(
        "host='127.0.0.1'", "host='localhost'"
    )
    with psycopg.connect(dsn) as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    start = [s for s in p.sink.sessions if s.type == "session_start"][-1]
    assert start.details["tls"] is True
    # without listen.tls an SSLRequest is answered N; sslmode=require then fails cleanly
    q = make_proxy()
    with pytest.raises(psycopg.OperationalError, match=r"(?i)ssl"):
        psycopg.connect(q.dsn(sslmode="require")).close()


def test_bytes_after_ssl_request_are_refused(
    make_proxy: MakeProxy, proxy_certs: CertBundle
) -> None:
    p = make_proxy(
        listen={"tls": {"certFile": str(proxy_certs.cert), "keyFile": str(proxy_certs.key)}}
    )
    c = RawClient(p.port)
    # SSLRequest immediately followed by a plaintext startup packet in the same segment
    c.send(m.ssl_request() + m.startup_message({"user": "agent", "database": "app"}))
    assert c.recv_byte() == b"S"
    t, body = c.recv()  # instead of a TLS handshake: a plain refusal, then close
    assert t == b"E"
    assert error_fields(body)["C"] == "08P01"
    assert "unencrypted data after SSLRequest" in error_fields(body)["M"]
    assert c.closed()


def test_absurd_startup_length_closes_only_that_connection(proxy: RunningProxy) -> None:
    c = RawClient(proxy.port)
    c.send((0x7FFFFFFF).to_bytes(4, "big") + b"\x00\x03\x00\x00")
    t, body = c.recv()
    assert t == b"E"
    assert error_fields(body)["C"] == "08P01"
    with psycopg.connect(proxy.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_auth_timeout(make_proxy: MakeProxy) -> None:
    p = make_proxy(limits={"authTimeout": "1s"})
    c = RawClient(p.port)
    c.send(m.startup_message({"user": "agent", "database": "app"}))
    assert c.recv()[0] == b"R"
    t, body = c.recv()  # we never send the password
    assert t == b"E"
    assert "did not complete in time" in error_fields(body)["M"]
    assert c.closed()


def test_connection_limit(make_proxy: MakeProxy) -> None:
    p = make_proxy(limits={"maxClientConnections": 2})
    conns = [psycopg.connect(p.dsn()) for _ in range(2)]
    try:
        err = refused(p, p.token())
        assert err.sqlstate == "53300"
    finally:
        for c in conns:
            c.close()
    time.sleep(0.2)
    with psycopg.connect(p.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_session_ends_when_the_token_expires(make_proxy: MakeProxy, issuer: LocalIssuer) -> None:
    # The session lasts as long as login would accept the token: exp plus the clock-skew leeway
    settings = Oidc.model_validate({"issuer": issuer.issuer, "audience": "pgwarden"})
    proxy = make_proxy(verifier=OidcVerifier(settings, leeway=0.5))
    token = proxy.token(lifetime=3)
    payload = token.split(".")[1]
    exp = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]
    with psycopg.connect(proxy.dsn(token), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        time.sleep(max(0.0, exp + 0.1 - time.time()))  # past exp, within the leeway
        assert conn.execute("SELECT 2").fetchone() == (2,)
        time.sleep(max(0.0, exp + 1.0 - time.time()))  # past exp + leeway
        with pytest.raises(psycopg.OperationalError, match="token expired"):
            conn.execute("SELECT 1")
