"""A real proxy in front of a real PostgreSQL, with a real token issuer, all on loopback."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pgwarden.api.config import ProxyConfig
from pgwarden.embedded.certs import CertBundle, make_certs
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden.embedded.postgres import ThrowawayPostgres
from pgwarden_proxy.auth.oidc import OidcVerifier
from pgwarden_proxy.events import MemoryEventSink
from pgwarden_proxy.thread import ProxyThread

APP_DB = "app"
APP_USER = "pgwarden_app"


@dataclass
class Database:
    pg: ThrowawayPostgres
    password: str
    users: dict[str, str] = field(default_factory=dict)  # role -> password


@pytest.fixture(scope="session")
def db(pg: ThrowawayPostgres) -> Database:
    password = secrets.token_urlsafe(16)
    pg.create_role(APP_USER, password)
    pg.create_database(APP_DB, owner=APP_USER)
    d = Database(pg, password)
    for method in ("md5", "password"):
        name = f"app_{method}"
        d.users[name] = secrets.token_urlsafe(12)
        pg.create_role(name, d.users[name], auth=method)
        pg.sql(f"GRANT CONNECT ON DATABASE {APP_DB} TO {name}")
    return d


@pytest.fixture(scope="session")
def proxy_certs(tmp_path_factory: pytest.TempPathFactory) -> CertBundle:
    return make_certs(tmp_path_factory.mktemp("proxy-tls"))


def base_config(
    pg: ThrowawayPostgres, password: str, issuer: LocalIssuer, **overrides: Any
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "connection": "app-db",
        "listen": {"host": "127.0.0.1", "port": 0, "insecurePlaintext": True},
        "upstream": {
            "host": "127.0.0.1",
            "port": pg.port,
            "database": APP_DB,
            "username": APP_USER,
            "password": password,
            "sslmode": "disable",
        },
        "auth": {"oidc": {"issuer": issuer.issuer, "audience": "pgwarden"}},
        "policies": [
            {
                "name": "agents",
                "spec": {"subjects": {"groups": ["ai-agents"]}, "access": "read-write"},
            }
        ],
        "metrics": {"host": "127.0.0.1", "port": 0},
        "limits": {"authTimeout": "5s", "shutdownGrace": "3s"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


@dataclass
class RunningProxy:
    thread: ProxyThread
    sink: MemoryEventSink
    issuer: LocalIssuer
    config: ProxyConfig

    @property
    def port(self) -> int:
        return self.thread.port

    def token(self, **kw: Any) -> str:
        return self.issuer.mint(**kw)

    def dsn(self, token: str | None = None, *, dbname: str = APP_DB, **extra: str) -> str:
        parts = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "dbname": dbname,
            "user": "agent",
            "password": token or self.token(),
            "sslmode": "disable",
            "connect_timeout": "10",
            **extra,
        }
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def url(self, token: str | None = None, *, dbname: str = APP_DB) -> str:
        """A postgresql:// URL, for clients such as asyncpg that take no key=value DSN."""
        return (
            f"postgresql://agent:{token or self.token()}@127.0.0.1:{self.port}/{dbname}"
            "?sslmode=disable"
        )

    def libpq_env(self, token: str | None = None, **extra: str) -> dict[str, str]:
        import os

        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            {
                "PGHOST": "127.0.0.1",
                "PGPORT": str(self.port),
                "PGDATABASE": APP_DB,
                "PGUSER": "agent",
                "PGPASSWORD": token or self.token(),
                "PGSSLMODE": "disable",
                "PGCONNECT_TIMEOUT": "10",
                **extra,
            }
        )
        return env


MakeProxy = Callable[..., RunningProxy]


@pytest.fixture
def make_proxy(db: Database, issuer: LocalIssuer) -> Iterator[MakeProxy]:
    started: list[ProxyThread] = []

    def make(*, verifier: OidcVerifier | None = None, **overrides: Any) -> RunningProxy:
        config = ProxyConfig.model_validate(base_config(db.pg, db.password, issuer, **overrides))
        sink = MemoryEventSink()
        thread = ProxyThread(config, sink=sink, verifier=verifier).start()
        started.append(thread)
        return RunningProxy(thread, sink, issuer, config)

    yield make
    for t in started:
        t.stop(grace=1)


@pytest.fixture
def proxy(make_proxy: MakeProxy) -> RunningProxy:
    return make_proxy()


def path_of(p: Path) -> str:
    return str(p)
