"""An agent logs in with a Kubernetes service-account token (auth.oidc.serviceAccounts)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from pgwarden.embedded.issuer import LocalIssuer
from tests.integration.conftest import MakeProxy, RunningProxy
from tests.integration.rawpg import login_refusal


def sa_token(issuer: LocalIssuer, namespace: str, name: str = "sql-agent", **kw: Any) -> str:
    """Claims shaped like a projected service-account token (audience pgwarden)."""
    kw.setdefault("sub", f"system:serviceaccount:{namespace}:{name}")
    return issuer.mint(
        email=None,
        omit=["groups"],
        audience=["pgwarden"],
        extra={
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": "8c1f6a0e-7b3d-4f5e-9a21-3c4d5e6f7a8b"},
                "pod": {
                    "name": f"{name}-5f6d7-abcde",
                    "uid": "1d2e3f4a-5b6c-4d7e-8f9a-0b1c2d3e4f5a",
                },
            }
        },
        **kw,
    )


@pytest.fixture
def sa_proxy(make_proxy: MakeProxy, issuer: LocalIssuer) -> RunningProxy:
    return make_proxy(
        auth={"oidc": {"issuer": issuer.issuer, "audience": "pgwarden", "serviceAccounts": True}},
        policies=[
            {
                "name": "agents-namespace",
                "spec": {
                    "subjects": {"groups": ["system:serviceaccounts:agents"]},
                    "access": "read-only",
                },
            },
            {
                "name": "one-account",
                "spec": {
                    "subjects": {"users": ["system:serviceaccount:tools:reporter"]},
                    "access": "read-only",
                },
            },
        ],
    )


def test_service_account_of_the_selected_namespace_logs_in(
    sa_proxy: RunningProxy, issuer: LocalIssuer
) -> None:
    with psycopg.connect(sa_proxy.dsn(sa_token(issuer, "agents"))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    start = [s for s in sa_proxy.sink.sessions if s.type == "session_start"][-1]
    assert start.identity == "system:serviceaccount:agents:sql-agent"
    assert start.details["groups"] == ["system:serviceaccounts", "system:serviceaccounts:agents"]
    assert start.details["policies"] == ["agents-namespace"]


def test_service_account_selected_by_user_logs_in(
    sa_proxy: RunningProxy, issuer: LocalIssuer
) -> None:
    with psycopg.connect(sa_proxy.dsn(sa_token(issuer, "tools", "reporter"))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_service_account_of_another_namespace_is_refused(
    sa_proxy: RunningProxy, issuer: LocalIssuer
) -> None:
    err = login_refusal(sa_proxy.port, sa_token(issuer, "prod"))
    assert err.sqlstate == "28000"
    assert "system:serviceaccount:prod:sql-agent" in err.message
    assert "system:serviceaccounts:prod" in err.message
    # another account of a namespace whose one account is selected is not let in either
    err = login_refusal(sa_proxy.port, sa_token(issuer, "tools", "other"))
    assert err.sqlstate == "28000"


def test_forged_subject_is_refused(sa_proxy: RunningProxy, issuer: LocalIssuer) -> None:
    token = sa_token(issuer, "prod", sub="system:serviceaccount:agents:sql-agent")
    err = login_refusal(sa_proxy.port, token)
    assert err.sqlstate == "28000"
    assert "does not match" in err.message


def test_without_the_setting_the_refusal_says_how_to_enable_it(
    make_proxy: MakeProxy, issuer: LocalIssuer
) -> None:
    proxy = make_proxy(
        policies=[
            {
                "name": "agents-namespace",
                "spec": {"subjects": {"groups": ["system:serviceaccounts:agents"]}},
            }
        ]
    )
    err = login_refusal(proxy.port, sa_token(issuer, "agents"))
    assert err.sqlstate == "28000"
    assert "auth.oidc.serviceAccounts: true" in err.message
