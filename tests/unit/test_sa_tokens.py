"""Kubernetes service-account tokens as an identity source (auth.oidc.serviceAccounts).

The local issuer (real HTTP discovery and JWKS) stands in for the cluster's OIDC issuer and
mints tokens shaped like projected service-account tokens.
"""

from __future__ import annotations

from typing import Any

import pytest

from pgwarden.api.config import Oidc
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden_proxy.auth.oidc import OidcVerifier, TokenRejected


def sa_token(
    local: LocalIssuer,
    namespace: str = "agents",
    name: str = "sql-agent",
    *,
    alg: str = "RS256",
    sub: str | None = None,
    k8s: Any = None,
    **options: Any,
) -> str:
    """A token with the claims of a projected service-account token (no email, no groups)."""
    claim = (
        k8s
        if k8s is not None
        else {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": "0b6f3c57-2d4e-4c55-9a52-4f1f0e6f3a10"},
            "pod": {"name": f"{name}-7d9c5-x2x8q", "uid": "5a1e4b0c-8f0d-4d8a-b0d2-2b8f6a0e9c11"},
        }
    )
    options.setdefault("audience", ["pgwarden"])
    return local.mint(
        alg=alg,
        sub=sub if sub is not None else f"system:serviceaccount:{namespace}:{name}",
        email=None,
        omit=["groups"],
        not_before=None,
        extra={"kubernetes.io": claim},
        **options,
    )


def verifier_for(issuer: LocalIssuer, **settings: Any) -> OidcVerifier:
    fields: dict[str, Any] = {"issuer": issuer.issuer, "serviceAccounts": True, **settings}
    return OidcVerifier(Oidc.model_validate(fields), min_refresh_interval=0)


async def refusal(verifier: OidcVerifier, token: str) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(token)
    assert token not in str(info.value)
    return info.value


def test_the_setting_is_off_by_default_and_has_its_alias() -> None:
    assert Oidc(issuer="https://k8s.example").service_accounts is False
    assert Oidc.model_validate({"issuer": "https://k8s.example", "serviceAccounts": True})
    schema = Oidc.model_json_schema(by_alias=True)["properties"]["serviceAccounts"]
    assert "system:serviceaccounts:NS" in schema["description"]


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_identity_is_the_service_account_and_groups_its_namespace(
    issuer: LocalIssuer, alg: str
) -> None:
    identity = await verifier_for(issuer).verify(sa_token(issuer, alg=alg))
    assert identity.username == "system:serviceaccount:agents:sql-agent"
    assert identity.subject == "system:serviceaccount:agents:sql-agent"
    assert identity.groups == frozenset({"system:serviceaccounts", "system:serviceaccounts:agents"})
    assert identity.issuer == issuer.issuer


async def test_groups_claim_adds_to_the_service_account_groups(issuer: LocalIssuer) -> None:
    token = issuer.mint(
        sub="system:serviceaccount:agents:sql-agent",
        email=None,
        groups=["extra"],
        extra={"kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "sql-agent"}}},
    )
    identity = await verifier_for(issuer).verify(token)
    assert identity.groups == frozenset(
        {"system:serviceaccounts", "system:serviceaccounts:agents", "extra"}
    )


async def test_other_tokens_of_the_issuer_still_use_usernameclaim(issuer: LocalIssuer) -> None:
    identity = await verifier_for(issuer).verify(issuer.mint())
    assert identity.username == "agent@example.com"
    assert identity.groups == frozenset({"ai-agents"})


@pytest.mark.parametrize(
    ("sub", "k8s"),
    [
        ("system:serviceaccount:agents:other", None),  # another account
        ("system:serviceaccount:prod:sql-agent", None),  # another namespace
        ("sql-agent", None),  # not a service-account subject at all
        # namespace "agents:sql", name "agent" would also spell the subject: names are checked
        (
            "system:serviceaccount:agents:sql:agent",
            {"namespace": "agents:sql", "serviceaccount": {"name": "agent"}},
        ),
    ],
    ids=["account", "namespace", "plain-sub", "colon-in-name"],
)
async def test_subject_and_kubernetes_claim_must_agree(
    issuer: LocalIssuer, sub: str, k8s: Any
) -> None:
    e = await refusal(verifier_for(issuer), sa_token(issuer, sub=sub, k8s=k8s))
    assert e.sqlstate == "28000"
    if k8s is None:
        assert e.reason == "service_account_mismatch"
        assert "does not match" in e.message
        assert "'system:serviceaccount:agents:sql-agent'" in e.message
    else:
        assert e.reason == "service_account_invalid"


@pytest.mark.parametrize(
    "k8s",
    [
        "agents",
        {"serviceaccount": {"name": "sql-agent"}},
        {"namespace": "agents"},
        {"namespace": "agents", "serviceaccount": "sql-agent"},
        {"namespace": "agents", "serviceaccount": {"name": 7}},
        {"namespace": "Agents", "serviceaccount": {"name": "sql-agent"}},
        {"namespace": "agents", "serviceaccount": {"name": "sql\nagent"}},
    ],
)
async def test_unusable_kubernetes_claim_is_refused(issuer: LocalIssuer, k8s: Any) -> None:
    e = await refusal(
        verifier_for(issuer), sa_token(issuer, sub="system:serviceaccount:x:y", k8s=k8s)
    )
    assert (e.reason, e.sqlstate) == ("service_account_invalid", "28000")
    assert "namespace" in e.message


async def test_disabled_refuses_with_a_hint(issuer: LocalIssuer) -> None:
    e = await refusal(verifier_for(issuer, serviceAccounts=False), sa_token(issuer))
    assert (e.reason, e.sqlstate) == ("missing_claim", "28000")
    assert "'email'" in e.message
    assert "Kubernetes service-account token" in e.message
    assert "auth.oidc.serviceAccounts: true" in e.message


async def test_disabled_ordinary_refusal_has_no_hint(issuer: LocalIssuer) -> None:
    e = await refusal(verifier_for(issuer, serviceAccounts=False), issuer.mint(email=None))
    assert e.reason == "missing_claim"
    assert "service-account" not in e.message


@pytest.mark.parametrize("audience", [["https://kubernetes.default.svc.cluster.local"], "vault"])
async def test_audience_is_enforced(issuer: LocalIssuer, audience: Any) -> None:
    # The pod's default token is for the API server: it must not open the database.
    e = await refusal(verifier_for(issuer), sa_token(issuer, audience=audience))
    assert (e.reason, e.sqlstate) == ("bad_audience", "28P01")


async def test_issuer_and_expiry_are_enforced(issuer: LocalIssuer) -> None:
    verifier = verifier_for(issuer)
    other = "https://kubernetes.default.svc.cluster.local"
    assert (await refusal(verifier, sa_token(issuer, issuer=other))).reason == "bad_issuer"
    assert (await refusal(verifier, sa_token(issuer, lifetime=-600))).reason == "expired"


async def test_foreign_signature_is_refused(issuer: LocalIssuer) -> None:
    kid = issuer.add_key("EC", publish=False)
    token = issuer.mint(
        kid=kid,
        sub="system:serviceaccount:agents:sql-agent",
        email=None,
        extra={"kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "sql-agent"}}},
    )
    e = await refusal(verifier_for(issuer), token)
    assert e.reason in {"unknown_key", "bad_signature"}
