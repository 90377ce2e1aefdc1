"""The embedded servers are real: PostgreSQL over scram/md5/password/TLS, OIDC over HTTP."""

from __future__ import annotations

import json
import re
import secrets
import socket
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import psycopg
import pytest
from joserfc import jws, jwt
from joserfc.errors import InvalidKeyIdError, JoseError, SecurityWarning
from joserfc.jwk import KeySet, OctKey

from pgwarden.embedded import postgres as postgres_module
from pgwarden.embedded.certs import make_certs
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden.embedded.postgres import ThrowawayPostgres, libpq_dsn


def fetch(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"] == "application/json"
        return json.load(response)


def header(token: str) -> dict[str, Any]:
    return dict(jws.extract_compact(token.encode()).headers())


def verify(issuer: LocalIssuer, token: str, alg: str) -> jwt.Token:
    keys = KeySet.import_key_set(fetch(issuer.jwks_uri))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        return jwt.decode(token, keys, algorithms=[alg])


# -- PostgreSQL ------------------------------------------------------------------------------


def test_superuser_logs_in_with_scram(pg: ThrowawayPostgres) -> None:
    with psycopg.connect(pg.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.host == "127.0.0.1"
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
        assert conn.execute("SHOW max_connections").fetchone() == ("300",)
    assert pg.sql("SELECT 40 + 2").strip() == "42"


def test_wrong_password_is_refused(pg: ThrowawayPostgres) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(pg.dsn(password="wrong")).close()


def test_sql_failure_raises_with_stderr(pg: ThrowawayPostgres) -> None:
    with pytest.raises(RuntimeError, match="no_such_table"):
        pg.sql("SELECT * FROM no_such_table")


def test_database_with_owner(pg: ThrowawayPostgres) -> None:
    pw = secrets.token_urlsafe(12)
    pg.create_role("embedded_owner", pw)
    pg.create_database("embedded_db", owner="embedded_owner")
    dsn = pg.dsn(user="embedded_owner", password=pw, dbname="embedded_db")
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE t (x int)")
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            "embedded_owner",
            "embedded_db",
        )


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
def test_role_logs_in_with_its_method(pg: ThrowawayPostgres, method: str) -> None:
    name = f"embedded_{method.replace('-', '_')}"
    pw = "it's a \\ secret"  # quoting in SQL and in the DSN
    pg.create_role(name, pw, auth=method)  # type: ignore[arg-type]
    with psycopg.connect(pg.dsn(user=name, password=pw)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (name,)
    rule = pg.sql(
        "SELECT auth_method FROM pg_hba_file_rules "
        f"WHERE '{name}' = ANY(user_name) OR user_name = '{{all}}' ORDER BY line_number LIMIT 1"
    )
    # The scram role has no line of its own, so the first rule that matches it is the default.
    assert rule.strip() == method
    stored = pg.sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{name}'")
    assert stored.startswith("md5" if method == "md5" else "SCRAM-SHA-256$")


def test_tls_verify_full(pg_tls: ThrowawayPostgres) -> None:
    assert pg_tls.ca_file is not None
    dsn = pg_tls.dsn(host="localhost", sslmode="verify-full", sslrootcert=str(pg_tls.ca_file))
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert conn.pgconn.ssl_in_use


def test_tls_cert_names_are_checked(pg_tls: ThrowawayPostgres, tmp_path) -> None:
    other_ca = make_certs(tmp_path).ca_cert
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(
            pg_tls.dsn(host="localhost", sslmode="verify-full", sslrootcert=str(other_ca))
        ).close()


def test_settings_apply_restart_keeps_data_and_stop_is_idempotent() -> None:
    server = ThrowawayPostgres(settings={"max_connections": "42", "cluster_name": "it's x y"})
    with server:
        assert server.sql("SHOW max_connections").strip() == "42"
        assert server.sql("SHOW cluster_name").strip() == "it's x y"
        base = server.base_dir
        assert base is not None
        server.sql("CREATE TABLE kept (x int); INSERT INTO kept VALUES (7)")
        server.stop()
        server.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(server.dsn(connect_timeout="2")).close()
        port = server.port
        server.start()
        assert server.port == port
        assert server.sql("SELECT x FROM kept").strip() == "7"
    assert server.base_dir is None
    assert not base.exists()


def test_libpq_dsn_quoting() -> None:
    assert libpq_dsn({"host": "h", "password": "a b'c\\"}) == "host=h password='a b\\'c\\\\'"
    assert libpq_dsn({"options": ""}) == "options=''"


# -- OIDC issuer -----------------------------------------------------------------------------


def test_discovery_and_jwks_over_http(issuer: LocalIssuer) -> None:
    before = issuer.discovery_requests, issuer.jwks_requests
    doc = fetch(issuer.issuer + "/.well-known/openid-configuration")
    assert doc["issuer"] == issuer.issuer
    assert not issuer.issuer.endswith("/")
    assert doc["jwks_uri"] == issuer.jwks_uri
    assert {"RS256", "PS256", "ES256", "EdDSA"} <= set(doc["id_token_signing_alg_values_supported"])
    assert doc["response_types_supported"]
    assert doc["subject_types_supported"] == ["public"]
    keys = fetch(issuer.jwks_uri)["keys"]
    assert {k["kty"] for k in keys} >= {"RSA", "EC"}
    assert all(k["kid"] and k["use"] == "sig" for k in keys)
    assert all("d" not in k for k in keys)  # public halves only
    assert (issuer.discovery_requests, issuer.jwks_requests) == (before[0] + 1, before[1] + 1)
    with pytest.raises(urllib.error.HTTPError) as err:
        fetch(issuer.issuer + "/nope")
    assert err.value.code == 404


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_tokens_verify_against_published_jwks(issuer: LocalIssuer, alg: str) -> None:
    if alg == "EdDSA" and not issuer.kids("OKP"):
        issuer.add_key("OKP")
    token = issuer.mint(alg=alg, groups=["g1", "g2"], extra={"tenant": "t1"})
    decoded = verify(issuer, token, alg)
    assert decoded.header["alg"] == alg
    claims = decoded.claims
    assert claims["iss"] == issuer.issuer
    assert claims["aud"] == "pgwarden"
    assert claims["sub"] == "agent-1"
    assert claims["email"] == "agent@example.com"
    assert claims["groups"] == ["g1", "g2"]
    assert claims["tenant"] == "t1"
    assert claims["exp"] - claims["iat"] == 600


def test_claim_options(issuer: LocalIssuer) -> None:
    claims = verify(
        issuer,
        issuer.mint(audience=["a", "b"], issued_at=1000, lifetime=50, not_before=990, omit=["jti"]),
        "RS256",
    ).claims
    assert (claims["aud"], claims["iat"], claims["exp"], claims["nbf"]) == (
        ["a", "b"],
        1000,
        1050,
        990,
    )
    assert "jti" not in claims
    no_email = verify(issuer, issuer.mint(email=None, omit=["exp"]), "RS256").claims
    assert "email" not in no_email
    assert "exp" not in no_email


def test_rotation_publishes_new_kid_and_keeps_old(issuer: LocalIssuer) -> None:
    old = header(issuer.mint())["kid"]
    kid = issuer.rotate("RSA")
    published = {k["kid"] for k in fetch(issuer.jwks_uri)["keys"]}
    assert {old, kid} <= published
    token = issuer.mint()
    assert header(token)["kid"] == kid
    verify(issuer, token, "RS256")
    issuer.remove_key(kid)
    assert kid not in {k["kid"] for k in fetch(issuer.jwks_uri)["keys"]}
    assert header(issuer.mint())["kid"] != kid


def test_unpublished_key_signs_but_does_not_verify(issuer: LocalIssuer) -> None:
    kid = issuer.add_key("RSA", publish=False)
    assert kid not in {k["kid"] for k in fetch(issuer.jwks_uri)["keys"]}
    token = issuer.mint(kid=kid)
    with pytest.raises(InvalidKeyIdError):
        verify(issuer, token, "RS256")
    # The default signing key is unchanged by adding an unpublished key.
    verify(issuer, issuer.mint(), "RS256")


def test_forged_tokens_fail_verification(issuer: LocalIssuer) -> None:
    unsigned = issuer.mint_unsigned(sub="a")
    assert unsigned.endswith(".")
    assert header(unsigned)["alg"] == "none"
    # The HMAC is genuine, so the token is refused for its algorithm, not for a bad signature.
    secret = b"a-shared-secret-of-at-least-112-bits"
    hs = issuer.mint_hs256(secret, sub="a", email="x@example.com")
    assert header(hs)["alg"] == "HS256"
    assert jwt.decode(hs, OctKey.import_key(secret), algorithms=["HS256"]).claims["sub"] == "a"
    for token in (unsigned, hs):
        with pytest.raises(JoseError):
            verify(issuer, token, "RS256")


def test_issuer_restarts_cleanly() -> None:
    with LocalIssuer() as iss:
        url = iss.jwks_uri
        assert fetch(url)["keys"]
    with pytest.raises(urllib.error.URLError):
        fetch(url)


def test_start_failure_reports_the_server_log_and_cleans_up() -> None:
    server = ThrowawayPostgres(settings={"shared_buffers": "not-a-size"})
    with pytest.raises(RuntimeError, match="shared_buffers") as err:
        server.start()
    log_file = re.search(r"tail of (\S+) ---", str(err.value))
    assert log_file is not None
    assert not Path(log_file[1]).parent.exists()
    server.stop()  # still harmless


def test_start_retries_once_when_the_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real = postgres_module._free_port
        monkeypatch.setattr(
            postgres_module, "_free_port", lambda host: next(ports, None) or real(host)
        )
        with ThrowawayPostgres() as server:
            assert server.port != taken
            assert "could not bind" in server.log_file.read_text()
            assert server.sql("SELECT 1").strip() == "1"
