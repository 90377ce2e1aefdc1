"""The database side: credentials the client never sees, TLS modes, cancel, failures."""

from __future__ import annotations

import socket
import threading
import time

import psycopg
import pytest

from pgwarden.embedded.issuer import LocalIssuer
from pgwarden.embedded.postgres import ThrowawayPostgres
from pgwarden_proxy.wire import messages as m
from tests.integration.conftest import APP_DB, APP_USER, Database, MakeProxy
from tests.integration.rawpg import RawClient, login_refusal


@pytest.mark.parametrize("method", ["md5", "password"])
def test_md5_and_cleartext_upstream_auth(make_proxy: MakeProxy, db: Database, method: str) -> None:
    user = f"app_{method}"
    p = make_proxy(upstream={"username": user, "password": db.users[user]})
    with psycopg.connect(p.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)


def test_scram_upstream_auth_and_the_credential_stays_hidden(
    make_proxy: MakeProxy, db: Database
) -> None:
    p = make_proxy()
    with psycopg.connect(p.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("pgwarden_app",)
        assert conn.info.password != db.password


def test_password_file_is_read(make_proxy: MakeProxy, db: Database, tmp_path) -> None:
    f = tmp_path / "pw"
    f.write_text(db.password + "\n")
    p = make_proxy(upstream={"password": None, "passwordFile": str(f)})
    with psycopg.connect(p.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_user_name_and_password_files_are_read(
    make_proxy: MakeProxy, db: Database, tmp_path
) -> None:
    """As the operator mounts them from the credentials Secret (keys username, password)."""
    (tmp_path / "username").write_text(APP_USER + "\n")
    (tmp_path / "password").write_text(db.password)
    p = make_proxy(
        upstream={
            "username": None,
            "usernameFile": str(tmp_path / "username"),
            "password": None,
            "passwordFile": str(tmp_path / "password"),
        }
    )
    with psycopg.connect(p.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
    (tmp_path / "username").unlink()
    r = login_refusal(p.port, p.token())
    assert r.sqlstate == "08004"
    assert "user name file" in str(r)


def test_wrong_upstream_credential_is_a_deployment_error(make_proxy: MakeProxy) -> None:
    p = make_proxy(upstream={"password": "definitely-wrong"})
    r = login_refusal(p.port, p.token())
    assert r.sqlstate == "08004"
    assert "configured credential" in str(r)
    assert "definitely-wrong" not in str(r)


def test_unreachable_upstream_is_reported_and_others_keep_working(make_proxy: MakeProxy) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    bad = make_proxy(upstream={"port": dead_port})
    good = make_proxy()
    r = login_refusal(bad.port, bad.token())
    assert r.sqlstate == "08001"
    assert "could not connect" in str(r)
    with psycopg.connect(good.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.fixture(scope="module")
def tls_db(pg_tls: ThrowawayPostgres) -> tuple[ThrowawayPostgres, str]:
    pw = "tls-app-password"
    pg_tls.create_role("tls_app", pw)
    pg_tls.create_database(APP_DB, owner="tls_app")
    return pg_tls, pw


@pytest.mark.parametrize(
    ("host", "sslmode", "ca", "ok"),
    [
        ("localhost", "verify-full", True, True),
        ("127.0.0.1", "verify-full", True, True),
        ("localhost", "verify-ca", True, True),
        ("localhost", "require", False, True),
        ("localhost", "disable", False, True),
    ],
)
def test_upstream_tls_modes(
    make_proxy: MakeProxy, tls_db, host: str, sslmode: str, ca: bool, ok: bool
) -> None:
    pg, pw = tls_db
    upstream = {
        "host": host,
        "port": pg.port,
        "username": "tls_app",
        "password": pw,
        "sslmode": sslmode,
        "caFile": str(pg.ca_file) if ca else None,
    }
    p = make_proxy(upstream=upstream)
    with psycopg.connect(p.dsn()) as conn:
        ssl_on = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert ssl_on.fetchone() == (sslmode != "disable",)


def test_verify_full_checks_the_host_name(
    make_proxy: MakeProxy, issuer: LocalIssuer, tmp_path
) -> None:
    with ThrowawayPostgres(tls=True, tls_hostnames=("db.example.test",), tls_ips=()) as pg:
        pg.create_role("tls_app", "pw-1")
        pg.create_database(APP_DB, owner="tls_app")
        base = {
            "host": "127.0.0.1",
            "port": pg.port,
            "username": "tls_app",
            "password": "pw-1",
            "caFile": str(pg.ca_file),
        }
        full = make_proxy(upstream={**base, "sslmode": "verify-full"})
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(full.dsn()).close()
        assert "refused the database's TLS certificate" in str(info.value)
        ca_only = make_proxy(upstream={**base, "sslmode": "verify-ca"})
        with psycopg.connect(ca_only.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_verify_full_refuses_an_unknown_ca(make_proxy: MakeProxy, tls_db, proxy_certs) -> None:
    pg, pw = tls_db
    p = make_proxy(
        upstream={
            "host": "localhost",
            "port": pg.port,
            "username": "tls_app",
            "password": pw,
            "sslmode": "verify-full",
            "caFile": str(proxy_certs.ca_cert),
        }
    )
    with pytest.raises(psycopg.OperationalError, match="TLS certificate"):
        psycopg.connect(p.dsn()).close()


def test_cancel_reaches_the_right_backend_only(make_proxy: MakeProxy) -> None:
    p = make_proxy()
    with psycopg.connect(p.dsn()) as victim, psycopg.connect(p.dsn()) as canceller:
        result: list[BaseException | None] = []

        def run_long(conn: psycopg.Connection) -> None:
            try:
                conn.execute("SELECT pg_sleep(20)")
                result.append(None)
            except BaseException as e:
                result.append(e)

        # a forged key (right pid, wrong secret) must not cancel anything
        t = threading.Thread(target=run_long, args=(victim,))
        t.start()
        time.sleep(0.5)
        session = next(
            s for s in p.thread.server.sessions.values() if s.key[0] == victim.info.backend_pid
        )
        forged = RawClient(p.port)
        forged.send(m.cancel_request(session.key[0], (session.key[1] + 1) % (1 << 31)))
        assert forged.closed()
        time.sleep(0.5)
        assert t.is_alive(), "a forged cancel key cancelled the query"
        # The victim's own key works, and only for the victim: first as libpq >= 17 cancels
        # (TLS negotiated first, then the key; cancel_safe waits in Python: the legacy
        # PQcancel would block the in-process proxy thread on the GIL) ...
        canceller.execute("SELECT 1")
        victim.cancel_safe(timeout=10)
        t.join(10)
        assert isinstance(result[0], psycopg.errors.QueryCanceled)
        assert canceller.execute("SELECT 2").fetchone() == (2,)
        # ... then as the legacy PQcancel does: the key in clear on a fresh connection
        result.clear()
        victim.rollback()
        t = threading.Thread(target=run_long, args=(victim,))
        t.start()
        time.sleep(0.5)
        legacy = RawClient(p.port)
        legacy.send(m.cancel_request(*session.key))
        assert legacy.closed()
        t.join(10)
        assert isinstance(result[0], psycopg.errors.QueryCanceled)
        assert canceller.execute("SELECT 3").fetchone() == (3,)
    # the client was given the proxy's key, never the database's
    up = next(s.upstream for s in [session] if s.upstream is not None)
    assert (up.backend_pid, up.backend_secret) != session.key


def _long_query(conn: psycopg.Connection) -> tuple[threading.Thread, list[BaseException | None]]:
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            conn.execute("SELECT pg_sleep(20)")
            result.append(None)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    return t, result


@pytest.mark.parametrize("by", ["addresses", "dns"])
def test_cancel_reaches_a_session_on_another_replica(make_proxy: MakeProxy, by: str) -> None:
    """Behind a Service, the cancel's new connection may land on another replica: it passes
    the request on to its peers, and the one holding the session cancels."""
    holder = make_proxy()
    peers = (
        {"addresses": [f"127.0.0.1:{holder.port}"]}
        if by == "addresses"
        else {"dns": "localhost", "port": holder.port}
    )
    other = make_proxy(peers=peers)
    with psycopg.connect(holder.dsn()) as victim:
        key = next(
            s.key
            for s in holder.thread.server.sessions.values()
            if s.key[0] == victim.info.backend_pid
        )
        t, result = _long_query(victim)
        # a wrong secret passed on cancels nothing
        forged = RawClient(other.port)
        forged.send(m.cancel_request(key[0], (key[1] + 1) % (1 << 31)))
        assert forged.closed()
        time.sleep(0.5)
        assert t.is_alive(), "a forged key passed on cancelled the query"
        # the right key, sent to the replica that does not hold the session
        RawClient(other.port).send(m.cancel_request(*key))
        t.join(10)
        assert isinstance(result[0], psycopg.errors.QueryCanceled)


def test_a_cancel_from_a_peer_is_not_passed_on_again(make_proxy: MakeProxy) -> None:
    a = make_proxy()
    b = make_proxy(peers={"addresses": [f"127.0.0.1:{a.port}"]})
    with psycopg.connect(a.dsn()) as victim:
        key = next(
            s.key for s in a.thread.server.sessions.values() if s.key[0] == victim.info.backend_pid
        )
        t, result = _long_query(victim)
        # as if another replica passed it on: b does not hold the session and stops there
        hop = RawClient(b.port)
        hop.send(m.cancel_request(*key, code=m.PEER_CANCEL_REQUEST_CODE))
        assert hop.closed()
        time.sleep(0.5)
        assert t.is_alive()
        victim.cancel_safe(timeout=10)
        t.join(10)
        assert isinstance(result[0], psycopg.errors.QueryCanceled)
