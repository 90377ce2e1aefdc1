"""OIDC token verification against a small discovery/JWKS server running in this module."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

from pgwarden.api.config import Oidc
from pgwarden.embedded.certs import make_certs
from pgwarden.embedded.issuer import LocalIssuer
from pgwarden_proxy.auth.oidc import Identity, OidcVerifier, TokenRejected

SigningKey = RSAKey | ECKey | OKPKey


# ------------------------------------------------------------------------------ fixtures


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (timeout tests) is expected, not an error


class IdP:
    """Discovery at /.well-known/openid-configuration, the JWKS at /jwks, hit counts."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.hits: Counter[str] = Counter()
        self.status = 200
        self.discovery_issuer: str | None = None
        self.discovery_jwks_uri: str | None = None
        self.redirect_to = ""
        self.delay = 0.0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.hits[self.path] += 1
                time.sleep(idp.delay)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", idp.redirect_to)
                    self.end_headers()
                    return
                if self.path == "/.well-known/openid-configuration":
                    body: Any = {
                        "issuer": idp.discovery_issuer or idp.url,
                        "jwks_uri": idp.discovery_jwks_uri or idp.url + "/jwks",
                    }
                elif self.path == "/jwks":
                    body = {"keys": idp.published}
                else:
                    self.send_error(404)
                    return
                if idp.status != 200:
                    self.send_error(idp.status)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # a deliberately slow answer must not stall teardown
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self.thread.start()

    @property
    def jwks_hits(self) -> int:
        return self.hits["/jwks"]

    def publish(self, *keys: SigningKey) -> None:
        self.published = [k.as_dict(private=False) for k in keys]
        # A symmetric key in the JWKS must be ignored, never used.
        self.published.append({"kty": "oct", "kid": "sym", "k": "c2VjcmV0c2VjcmV0c2VjcmV0"})

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        "rsa": RSAKey.generate_key(2048, parameters={"kid": "rsa1", "use": "sig"}),
        "ec256": ECKey.generate_key("P-256", parameters={"kid": "ec256"}),
        "ec384": ECKey.generate_key("P-384", parameters={"kid": "ec384"}),
        "ec521": ECKey.generate_key("P-521", parameters={"kid": "ec521"}),
        "ed25519": OKPKey.generate_key("Ed25519", parameters={"kid": "ed25519"}),
        "ed448": OKPKey.generate_key("Ed448", parameters={"kid": "ed448"}),
        "rsa2": RSAKey.generate_key(2048, parameters={"kid": "rsa2"}),
    }


@pytest.fixture
def idp(keys: dict[str, SigningKey]) -> Iterator[IdP]:
    server = IdP()
    server.publish(*(k for name, k in keys.items() if name != "rsa2"))
    yield server
    server.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings_for(idp: IdP, **extra: str) -> Oidc:
    return Oidc.model_validate({"issuer": idp.url, "audience": "pgwarden", **extra})


@pytest.fixture
def verifier(idp: IdP, clock: Clock) -> OidcVerifier:
    return OidcVerifier(settings_for(idp), clock=clock)


def claims_for(idp: IdP, clock: Clock, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": idp.url,
        "aud": "pgwarden",
        "sub": "user-123",
        "email": "alice@example.com",
        "groups": ["analysts", "ai-agents"],
        "iat": int(clock.now),
        "exp": int(clock.now) + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def mint(key: SigningKey, alg: str, claims: dict[str, Any], **header: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)  # joserfc: "EdDSA is deprecated"
        fields = {k: v for k, v in {"alg": alg, "kid": key.kid, **header}.items() if v is not None}
        return jwt.encode(fields, claims, key, algorithms=[alg])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        [
            b64url(json.dumps(header).encode()),
            b64url(json.dumps(claims).encode()),
            b64url(signature),
        ]
    )


async def rejected(verifier: OidcVerifier, token: str, reason: str) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        await verifier.verify(token)
    e = info.value
    assert e.reason == reason, e.message
    # The token, or any part of it that could be replayed, never shows in the error.
    for text in (str(e), repr(e), e.message, *map(str, e.args)):
        if len(token.strip()) > 20:
            assert token.strip() not in text
        for part in token.split("."):
            if len(part) > 20:
                assert part not in text
    return e


# ------------------------------------------------------------------------------ acceptance


@pytest.mark.parametrize(
    ("key_name", "alg"),
    [
        ("rsa", "RS256"),
        ("rsa", "RS384"),
        ("rsa", "RS512"),
        ("rsa", "PS256"),
        ("rsa", "PS384"),
        ("rsa", "PS512"),
        ("ec256", "ES256"),
        ("ec384", "ES384"),
        ("ec521", "ES512"),
        ("ed25519", "EdDSA"),
        ("ed448", "EdDSA"),
        ("ed25519", "Ed25519"),
    ],
)
async def test_each_algorithm_family_is_accepted(
    verifier: OidcVerifier,
    idp: IdP,
    clock: Clock,
    keys: dict[str, SigningKey],
    key_name: str,
    alg: str,
) -> None:
    token = mint(keys[key_name], alg, claims_for(idp, clock))
    identity = await verifier.verify(token)
    assert identity == Identity(
        username="alice@example.com",
        groups=frozenset({"analysts", "ai-agents"}),
        subject="user-123",
        issuer=idp.url,
        expires_at=datetime.fromtimestamp(int(clock.now) + 300, UTC),
        actor=None,
        usable_until=datetime.fromtimestamp(int(clock.now) + 300 + 60, UTC),  # default leeway
    )


async def test_start_prefetches_discovery_and_jwks(verifier: OidcVerifier, idp: IdP) -> None:
    await verifier.start()
    assert idp.hits["/.well-known/openid-configuration"] == 1
    assert idp.jwks_hits == 1


async def test_configured_jwks_uri_skips_discovery(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    v = OidcVerifier(settings_for(idp, jwksUri=idp.url + "/jwks"), clock=clock)
    await v.verify(mint(keys["rsa"], "RS256", claims_for(idp, clock)))
    assert idp.hits["/.well-known/openid-configuration"] == 0
    assert idp.jwks_hits == 1


async def test_trailing_slash_of_issuer_is_not_doubled(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    idp.discovery_issuer = idp.url + "/"
    v = OidcVerifier(settings_for(idp, issuer=idp.url + "/"), clock=clock)
    await v.verify(mint(keys["rsa"], "RS256", claims_for(idp, clock, iss=idp.url + "/")))
    assert idp.hits["/.well-known/openid-configuration"] == 1


async def test_actor_claim_for_delegation(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    act = {"sub": "agent-7", "client_id": "copilot"}
    identity = await verifier.verify(mint(keys["rsa"], "RS256", claims_for(idp, clock, act=act)))
    assert identity.actor == act


async def test_audience_list_containing_ours(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    claims = claims_for(idp, clock, aud=["other", "pgwarden"])
    assert (await verifier.verify(mint(keys["ec256"], "ES256", claims))).subject == "user-123"


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ("analysts", {"analysts"}),
        (["a", "b", "a"], {"a", "b"}),
        ([], set()),
        (None, set()),  # absent
    ],
)
async def test_groups_claim_forms(
    verifier: OidcVerifier,
    idp: IdP,
    clock: Clock,
    keys: dict[str, SigningKey],
    groups: Any,
    expected: set[str],
) -> None:
    token = mint(keys["rsa"], "RS256", claims_for(idp, clock, groups=groups))
    assert (await verifier.verify(token)).groups == frozenset(expected)


async def test_custom_claim_names(idp: IdP, clock: Clock, keys: dict[str, SigningKey]) -> None:
    v = OidcVerifier(
        settings_for(idp, usernameClaim="preferred_username", groupsClaim="roles"), clock=clock
    )
    claims = claims_for(idp, clock, preferred_username="alice", roles=["dba"])
    identity = await v.verify(mint(keys["rsa"], "RS256", claims))
    assert (identity.username, identity.groups) == ("alice", frozenset({"dba"}))


async def test_leeway_both_ways(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    now = int(clock.now)
    ok = claims_for(idp, clock, exp=now - 50, iat=now + 50, nbf=now + 50)
    await verifier.verify(mint(keys["rsa"], "RS256", ok))


# ------------------------------------------------------------------------------ algorithms


async def test_alg_none_is_refused_before_any_key_lookup(
    verifier: OidcVerifier, idp: IdP, clock: Clock
) -> None:
    token = unsigned({"alg": "none", "typ": "JWT"}, claims_for(idp, clock))
    e = await rejected(verifier, token, "alg_not_allowed")
    assert e.sqlstate == "28P01"
    assert idp.jwks_hits == 0


async def test_hs256_with_the_rsa_public_key_as_secret_is_refused(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    """The classic key-confusion attack: HMAC keyed with the issuer's public key PEM."""
    rsa = keys["rsa"]
    assert isinstance(rsa, RSAKey)
    pem = rsa.as_pem(private=False)
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "rsa1"}).encode())
    payload = b64url(json.dumps(claims_for(idp, clock)).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    token = f"{header}.{payload}.{b64url(mac)}"
    await verifier.start()
    e = await rejected(verifier, token, "alg_not_allowed")
    assert "HS256" in e.message
    assert idp.jwks_hits == 1  # the prefetch only: no lookup for this token


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512", "ES256K", "RSA1_5", "", 5])
async def test_other_algorithms_are_refused(
    verifier: OidcVerifier, idp: IdP, clock: Clock, alg: Any
) -> None:
    token = unsigned({"alg": alg, "kid": "rsa1"}, claims_for(idp, clock), b"x" * 32)
    await rejected(verifier, token, "alg_not_allowed")
    assert idp.jwks_hits == 0


async def test_key_of_another_type_never_verifies(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    # Signed with the EC key but pointing at the RSA key's kid.
    token = mint(keys["ec256"], "ES256", claims_for(idp, clock), kid="rsa1")
    await rejected(verifier, token, "alg_not_allowed")
    # ES384 with a P-256 key: right kty, wrong curve.
    token = mint(keys["ec384"], "ES384", claims_for(idp, clock), kid="ec256")
    await rejected(verifier, token, "alg_not_allowed")


async def test_jwk_alg_must_match_the_header(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    pinned = RSAKey.import_key(keys["rsa"].as_dict(private=True), parameters={"alg": "RS256"})
    idp.publish(pinned)
    v = OidcVerifier(settings_for(idp), clock=clock)
    await v.verify(mint(pinned, "RS256", claims_for(idp, clock)))
    await rejected(v, mint(keys["rsa"], "PS256", claims_for(idp, clock)), "alg_not_allowed")


async def test_wrong_signature(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    token = mint(keys["rsa"], "RS256", claims_for(idp, clock))
    header, payload, signature = token.split(".")
    tampered_claims = claims_for(idp, clock, email="mallory@example.com")
    forged = f"{header}.{b64url(json.dumps(tampered_claims).encode())}.{signature}"
    e = await rejected(verifier, forged, "bad_signature")
    assert e.sqlstate == "28P01"
    # A token signed by a key that merely reuses a published kid.
    impostor = RSAKey.generate_key(2048, parameters={"kid": "rsa1"})
    await rejected(verifier, mint(impostor, "RS256", claims_for(idp, clock)), "bad_signature")
    # Garbage in the signature part.
    await rejected(verifier, f"{header}.{payload}.AAAA", "bad_signature")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "   ",
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        "eyJhbGciOiJSUzI1NiJ9.%%%.abc",
        "bm90IGpzb24.e30.abc",  # header is not JSON
        "e30.e30.abc",  # header without alg
        "a.b.c.d.e",  # JWE
        "ünïcödé.b.c",
        "a" * 70_000 + ".b.c",
    ],
)
async def test_malformed_tokens(verifier: OidcVerifier, token: str) -> None:
    e = await rejected(verifier, token, "malformed")
    assert e.sqlstate == "28P01"


async def test_payload_must_be_a_json_object(
    verifier: OidcVerifier, idp: IdP, keys: dict[str, SigningKey]
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SecurityWarning)
        from joserfc import jws

        token = jws.serialize_compact(
            {"alg": "RS256", "kid": "rsa1"}, b"[1, 2]", keys["rsa"], algorithms=["RS256"]
        )
    await rejected(verifier, token, "malformed")


async def test_critical_header_extensions_are_refused(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    token = unsigned({"alg": "RS256", "kid": "rsa1", "crit": ["exp"], "exp": 1}, {}, b"x")
    await rejected(verifier, token, "malformed")


async def test_token_without_kid_uses_the_single_fitting_key(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    v = OidcVerifier(settings_for(idp), clock=clock)
    # Exactly one P-384 key is published: a kid-less ES384 token can only mean that one.
    token = mint(keys["ec384"], "ES384", claims_for(idp, clock), kid=None)
    assert "kid" not in json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    await v.verify(token)
    # Two RSA keys are published: which one signed a kid-less RS256 token is ambiguous.
    idp.publish(keys["rsa"], keys["rsa2"])
    v = OidcVerifier(settings_for(idp), clock=clock)
    e = await rejected(
        v, mint(keys["rsa"], "RS256", claims_for(idp, clock), kid=None), "unknown_key"
    )
    assert "no key (kid)" in e.message


# ------------------------------------------------------------------------------ claims


async def test_expired(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    exp = int(clock.now) - 61
    e = await rejected(
        verifier, mint(keys["rsa"], "RS256", claims_for(idp, clock, exp=exp)), "expired"
    )
    when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert f"token expired at {when} (clock skew allowance 60s)" in e.message
    assert idp.url in e.message
    assert e.sqlstate == "28P01"


async def test_not_yet_valid(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    claims = claims_for(idp, clock, nbf=int(clock.now) + 120)
    e = await rejected(verifier, mint(keys["rsa"], "RS256", claims), "not_yet_valid")
    assert e.sqlstate == "28P01"


async def test_issued_in_future(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    claims = claims_for(idp, clock, iat=int(clock.now) + 120)
    await rejected(verifier, mint(keys["rsa"], "RS256", claims), "issued_in_future")


async def test_wrong_issuer(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    claims = claims_for(idp, clock, iss="https://evil.example.com")
    e = await rejected(verifier, mint(keys["rsa"], "RS256", claims), "bad_issuer")
    assert "evil.example.com" in e.message
    assert idp.url in e.message


@pytest.mark.parametrize("aud", ["other", ["a", "b"], None, 5])
async def test_wrong_audience(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey], aud: Any
) -> None:
    claims = claims_for(idp, clock, aud=aud)
    e = await rejected(verifier, mint(keys["rsa"], "RS256", claims), "bad_audience")
    assert "'pgwarden'" in e.message


async def test_missing_username_claim(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    claims = claims_for(idp, clock)
    del claims["email"]
    e = await rejected(verifier, mint(keys["rsa"], "RS256", claims), "missing_claim")
    assert "'email'" in e.message
    assert e.sqlstate == "28000"


@pytest.mark.parametrize("value", ["", 42, ["alice"], "alice\nFAKE LOG LINE"])
async def test_unusable_username_claim(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey], value: Any
) -> None:
    claims = claims_for(idp, clock, email=value)
    await rejected(verifier, mint(keys["rsa"], "RS256", claims), "missing_claim")


@pytest.mark.parametrize("claim", ["sub", "exp", "iat"])
async def test_required_claims(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey], claim: str
) -> None:
    claims = claims_for(idp, clock)
    del claims[claim]
    e = await rejected(verifier, mint(keys["rsa"], "RS256", claims), "missing_claim")
    assert repr(claim) in e.message


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"exp": "tomorrow"}, "malformed"),
        ({"iat": True}, "malformed"),
        ({"groups": [1, 2]}, "missing_claim"),
        ({"groups": {"a": 1}}, "missing_claim"),
        ({"act": "agent"}, "malformed"),
    ],
)
async def test_claims_of_the_wrong_type(
    verifier: OidcVerifier,
    idp: IdP,
    clock: Clock,
    keys: dict[str, SigningKey],
    overrides: dict[str, Any],
    reason: str,
) -> None:
    claims = claims_for(idp, clock, **overrides)
    await rejected(verifier, mint(keys["rsa"], "RS256", claims), reason)


# ------------------------------------------------------------------------------ key rotation


async def test_unknown_kid_refetches_once_then_rate_limits(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    await verifier.start()
    assert idp.jwks_hits == 1
    clock.now += 31  # past the rate limit of the prefetch

    # The issuer rotates in a new key; the first token signed with it triggers one refetch.
    idp.publish(keys["rsa"], keys["rsa2"])
    rotated = mint(keys["rsa2"], "RS256", claims_for(idp, clock))
    assert (await verifier.verify(rotated)).username == "alice@example.com"
    assert idp.jwks_hits == 2
    await verifier.verify(rotated)  # now cached
    assert idp.jwks_hits == 2

    # Another unknown kid within the window does not fetch again.
    stranger = RSAKey.generate_key(2048, parameters={"kid": "stranger"})
    token = mint(stranger, "RS256", claims_for(idp, clock))
    e = await rejected(verifier, token, "unknown_key")
    assert "'stranger'" in e.message
    assert e.sqlstate == "28P01"
    assert idp.jwks_hits == 2

    # After the window it may fetch again (and still not find it).
    clock.now += 31
    await rejected(verifier, mint(stranger, "RS256", claims_for(idp, clock)), "unknown_key")
    assert idp.jwks_hits == 3


async def test_concurrent_unknown_kids_share_one_fetch(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    await verifier.start()
    clock.now += 31
    idp.publish(keys["rsa"], keys["rsa2"])
    tokens = [mint(keys["rsa2"], "RS256", claims_for(idp, clock, sub=f"s{i}")) for i in range(10)]
    results = await asyncio.gather(*(verifier.verify(t) for t in tokens))
    assert sorted(r.subject for r in results) == sorted(f"s{i}" for i in range(10))
    assert idp.jwks_hits == 2


async def test_periodic_refresh_drops_removed_keys(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    await verifier.verify(mint(keys["ec256"], "ES256", claims_for(idp, clock)))
    idp.publish(keys["rsa"])  # the EC key is withdrawn
    clock.now += 600
    await verifier.verify(mint(keys["ec256"], "ES256", claims_for(idp, clock)))
    assert idp.jwks_hits == 1  # still fresh enough
    clock.now += 3600
    await rejected(verifier, mint(keys["ec256"], "ES256", claims_for(idp, clock)), "unknown_key")
    assert idp.jwks_hits == 2


async def test_cached_keys_survive_a_brief_outage_but_not_a_long_one(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    await verifier.start()
    idp.status = 503
    clock.now += 7200
    await verifier.verify(mint(keys["rsa"], "RS256", claims_for(idp, clock)))
    assert idp.jwks_hits == 2  # the refresh failed, the cached keys still served
    clock.now += 86400
    e = await rejected(
        verifier, mint(keys["rsa"], "RS256", claims_for(idp, clock)), "jwks_unavailable"
    )
    assert e.sqlstate == "28000"


# ------------------------------------------------------------------------------ unavailability


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_jwks_server_down(
    clock: Clock, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    issuer = f"http://127.0.0.1:{closed_port()}"
    v = OidcVerifier(Oidc(issuer=issuer), clock=clock, http_timeout=2)
    with caplog.at_level(logging.WARNING, logger="pgwarden.oidc"):
        await v.start()  # not fatal
    assert any("cannot refresh" in r.getMessage() for r in caplog.records)
    token = mint(keys["rsa"], "RS256", {"iss": issuer, "aud": "pgwarden", "sub": "x"})
    e = await rejected(v, token, "jwks_unavailable")
    assert e.sqlstate == "28000"
    assert issuer in e.message
    assert all(token not in r.getMessage() for r in caplog.records)


async def test_http_error_and_garbage_documents(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    idp.status = 500
    v = OidcVerifier(settings_for(idp), clock=clock, min_refresh_interval=0)
    token = mint(keys["rsa"], "RS256", claims_for(idp, clock))
    with caplog.at_level(logging.WARNING, logger="pgwarden.oidc"):
        await rejected(v, token, "jwks_unavailable")
        assert "HTTP 500" in caplog.text
        idp.status = 200
        idp.published = [{"kty": "RSA", "n": "garbage", "e": "AQAB", "kid": "bad"}]
        await rejected(v, token, "jwks_unavailable")
        assert "no usable signing key" in caplog.text
        idp.publish(keys["rsa"])
        await v.verify(token)
    assert token not in caplog.text


async def test_discovery_issuer_must_match(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    idp.discovery_issuer = "https://elsewhere.example.com"
    v = OidcVerifier(settings_for(idp), clock=clock)
    with caplog.at_level(logging.WARNING, logger="pgwarden.oidc"):
        await rejected(v, mint(keys["rsa"], "RS256", claims_for(idp, clock)), "jwks_unavailable")
    assert "elsewhere.example.com" in caplog.text
    assert idp.jwks_hits == 0


async def test_fetch_survives_the_cancellation_of_the_login_that_started_it(
    verifier: OidcVerifier, idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    idp.delay = 0.2
    token = mint(keys["rsa"], "RS256", claims_for(idp, clock))
    first = asyncio.create_task(verifier.verify(token))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(verifier.verify(token))
    await asyncio.sleep(0.05)
    first.cancel()
    assert (await second).subject == "user-123"
    assert first.cancelled()
    assert idp.hits["/.well-known/openid-configuration"] == 1
    assert idp.jwks_hits == 1


async def test_slow_issuer_times_out(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    idp.delay = 1.0
    v = OidcVerifier(settings_for(idp), clock=clock, http_timeout=0.2)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pgwarden.oidc"):
        await rejected(v, mint(keys["rsa"], "RS256", claims_for(idp, clock)), "jwks_unavailable")
    assert time.monotonic() - started < 0.9
    assert "no answer within 0.2s" in caplog.text


@pytest.mark.parametrize(
    "target", ["http://idp.example.com/jwks", "ftp://127.0.0.1/jwks", "file:///etc/passwd"]
)
async def test_redirects_to_insecure_urls_are_not_followed(
    idp: IdP,
    clock: Clock,
    keys: dict[str, SigningKey],
    caplog: pytest.LogCaptureFixture,
    target: str,
) -> None:
    idp.redirect_to = target
    v = OidcVerifier(settings_for(idp, jwksUri=idp.url + "/redirect"), clock=clock)
    with caplog.at_level(logging.WARNING, logger="pgwarden.oidc"):
        await rejected(v, mint(keys["rsa"], "RS256", claims_for(idp, clock)), "jwks_unavailable")
    assert "edirect" in caplog.text  # ours, or urllib's own refusal of non-HTTP schemes


async def test_redirect_to_an_acceptable_url_is_followed(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    idp.redirect_to = idp.url + "/jwks"
    v = OidcVerifier(settings_for(idp, jwksUri=idp.url + "/redirect"), clock=clock)
    await v.verify(mint(keys["rsa"], "RS256", claims_for(idp, clock)))


async def test_discovered_jwks_uri_must_be_secure(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    idp.discovery_jwks_uri = "http://idp.example.com/jwks"
    v = OidcVerifier(settings_for(idp), clock=clock)
    with caplog.at_level(logging.WARNING, logger="pgwarden.oidc"):
        await rejected(v, mint(keys["rsa"], "RS256", claims_for(idp, clock)), "jwks_unavailable")
    assert "discovered jwks_uri" in caplog.text


async def test_private_keys_in_the_jwks_are_not_trusted(
    idp: IdP, clock: Clock, keys: dict[str, SigningKey]
) -> None:
    idp.published = [keys["rsa"].as_dict(private=True), keys["ec256"].as_dict(private=False)]
    v = OidcVerifier(settings_for(idp), clock=clock)
    await v.verify(mint(keys["ec256"], "ES256", claims_for(idp, clock)))
    await rejected(v, mint(keys["rsa"], "RS256", claims_for(idp, clock)), "unknown_key")


# ------------------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    "issuer",
    ["http://idp.example.com", "ftp://127.0.0.1", "idp.example.com", "http://10.0.0.1", "https://"],
)
def test_insecure_issuer_urls_are_refused(issuer: str) -> None:
    with pytest.raises(ValueError, match="https://"):
        OidcVerifier(Oidc(issuer=issuer))


def test_insecure_jwks_uri_is_refused() -> None:
    with pytest.raises(ValueError, match="jwksUri"):
        OidcVerifier(Oidc.model_validate({"issuer": "https://idp", "jwksUri": "http://idp/k"}))


@pytest.mark.parametrize(
    "issuer",
    [
        "https://idp.example.com",
        "http://localhost:8080",
        "http://127.0.0.5:1",
        "http://[::1]:9000/realms/x",
    ],
)
def test_accepted_issuer_urls(issuer: str) -> None:
    OidcVerifier(Oidc(issuer=issuer))


def test_rejection_attributes() -> None:
    e = TokenRejected("expired", "token expired")
    assert (e.reason, e.sqlstate, e.message, str(e)) == (
        "expired",
        "28P01",
        "token expired",
        "token expired",
    )
    assert TokenRejected("jwks_unavailable", "x").sqlstate == "28000"
    assert TokenRejected("missing_claim", "x").sqlstate == "28000"


async def test_a_private_issuer_is_trusted_through_ca_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An issuer behind a private CA (the cluster's own, an internal Keycloak): its TLS
    certificate must chain to `caFile`; without it the system's roots refuse it."""
    certs = make_certs(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certs.cert, certs.key)
    with LocalIssuer(tls=tls) as issuer:
        assert issuer.issuer.startswith("https://")
        token = issuer.mint()
        untrusted = OidcVerifier(Oidc(issuer=issuer.issuer), min_refresh_interval=0)
        with pytest.raises(TokenRejected) as refused:
            await untrusted.verify(token)
        assert refused.value.reason == "jwks_unavailable"
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
        settings = Oidc.model_validate({"issuer": issuer.issuer, "caFile": certs.ca_cert})
        identity = await OidcVerifier(settings).verify(token)
        assert identity.username
