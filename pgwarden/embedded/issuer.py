"""A local OIDC issuer: discovery and JWKS over real HTTP, plus a token minter for its keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import ssl
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Literal, TypedDict, Unpack, cast
from urllib.parse import urlsplit

from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, KeyParameters, OKPKey, RSAKey

__all__ = ["ClaimOptions", "KeyType", "LocalIssuer"]

KeyType = Literal["RSA", "EC", "OKP"]
SigningKey = RSAKey | ECKey | OKPKey

_KTY_FOR_ALG: dict[str, KeyType] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), "RSA"),
    "ES256": "EC",
    "EdDSA": "OKP",
}
_DEFAULT_ALG: dict[KeyType, str] = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}
# Published JWKs name their algorithm, except RSA: one RSA key serves both RS256 and PS256,
# and verifiers (joserfc among them) reject a token whose alg differs from the key's "alg".
_JWK_ALG: dict[KeyType, str | None] = {"RSA": None, "EC": "ES256", "OKP": "EdDSA"}
SIGNING_ALGS = ["RS256", "PS256", "ES256", "EdDSA"]


class ClaimOptions(TypedDict, total=False):
    """Keyword arguments of :meth:`LocalIssuer.claims`, shared by every ``mint*`` method."""

    sub: str
    email: str | None
    groups: Sequence[str]
    audience: str | Sequence[str]
    lifetime: float
    issuer: str | None
    issued_at: float | None
    not_before: float | None
    extra: Mapping[str, object] | None
    omit: Sequence[str]


@dataclass(frozen=True)
class _Key:
    kty: KeyType
    key: SigningKey
    published: bool


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(value: Mapping[str, object]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def _generate(kty: KeyType, kid: str) -> SigningKey:
    params: KeyParameters = {"kid": kid, "use": "sig"}
    alg = _JWK_ALG[kty]
    if alg is not None:
        params["alg"] = alg
    if kty == "RSA":
        return RSAKey.generate_key(2048, parameters=params)
    if kty == "EC":
        return ECKey.generate_key("P-256", parameters=params)
    return OKPKey.generate_key("Ed25519", parameters=params)


class LocalIssuer:
    """Serves ``/.well-known/openid-configuration`` and ``/jwks`` on loopback.

    Starts with one RSA key (RS256/PS256) and one EC P-256 key (ES256); add an Ed25519 key with
    ``add_key("OKP")`` for EdDSA.
    """

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        """`tls`: a server context (certificate loaded) to serve https:// instead of http://."""
        self.host = host
        self.port = port
        self.tls = tls
        self.issuer = ""
        self.jwks_uri = ""
        self.discovery_requests = 0
        self.jwks_requests = 0
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._default: dict[KeyType, str] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.add_key("RSA")
        self.add_key("EC")

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("this LocalIssuer is already running")
        server = _Server((self.host, self.port), _Handler)
        server.owner = self
        self.port = server.server_address[1]
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        scheme = "https" if self.tls is not None else "http"
        self.issuer = f"{scheme}://{self.host}:{self.port}"
        self.jwks_uri = f"{self.issuer}/jwks"
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            daemon=True,
            name=f"local-issuer-{self.port}",
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> LocalIssuer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- documents ---------------------------------------------------------------------------

    def discovery(self) -> dict[str, object]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": SIGNING_ALGS,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        }

    def jwks(self) -> dict[str, list[dict[str, object]]]:
        with self._lock:
            published = [k.key for k in self._keys.values() if k.published]
        return {"keys": [dict(key.as_dict(private=False)) for key in published]}

    def _document(self, path: str) -> Mapping[str, object] | None:
        """The document served at ``path``, or None (404); counts the fetch before replying."""
        if path == "/.well-known/openid-configuration":
            with self._lock:
                self.discovery_requests += 1
            return self.discovery()
        if path == "/jwks":
            with self._lock:
                self.jwks_requests += 1
            return self.jwks()
        return None

    # -- keys --------------------------------------------------------------------------------

    def add_key(self, kty: KeyType, *, kid: str | None = None, publish: bool = True) -> str:
        """Add a key and return its kid.

        It becomes the signing default for its type only if that type has none yet; an
        unpublished key never does (it exists to sign tokens the JWKS cannot verify).
        """
        kid = kid or f"{kty.lower()}-{secrets.token_hex(4)}"
        key = _generate(kty, kid)
        with self._lock:
            if kid in self._keys:
                raise ValueError(f"kid {kid!r} already exists")
            self._keys[kid] = _Key(kty, key, publish)
            if publish:
                self._default.setdefault(kty, kid)
        return kid

    def key_types(self) -> frozenset[KeyType]:
        """The key types that have a published signing key."""
        with self._lock:
            return frozenset(self._default)

    def rotate(self, kty: KeyType = "RSA") -> str:
        """Publish a new key and sign with it from now on; older keys stay published."""
        kid = self.add_key(kty)
        with self._lock:
            self._default[kty] = kid
        return kid

    def remove_key(self, kid: str) -> None:
        """Forget a key; if it was the default, the newest remaining key of its type takes over."""
        with self._lock:
            removed = self._keys.pop(kid)
            if self._default.get(removed.kty) == kid:
                del self._default[removed.kty]
                rest = [k for k, v in self._keys.items() if v.kty == removed.kty and v.published]
                if rest:
                    self._default[removed.kty] = rest[-1]

    def kids(self, kty: KeyType | None = None) -> list[str]:
        with self._lock:
            return [k for k, v in self._keys.items() if kty is None or v.kty == kty]

    # -- tokens ------------------------------------------------------------------------------

    def claims(
        self,
        *,
        sub: str = "agent-1",
        email: str | None = "agent@example.com",
        groups: Sequence[str] = ("ai-agents",),
        audience: str | Sequence[str] = "pgwarden",
        lifetime: float = 600.0,
        issuer: str | None = None,
        issued_at: float | None = None,
        not_before: float | None = None,
        extra: Mapping[str, object] | None = None,
        omit: Sequence[str] = (),
    ) -> dict[str, object]:
        """The claim set every ``mint*`` method signs; ``omit`` drops claims for negative tests."""
        iat = time.time() if issued_at is None else issued_at
        claims: dict[str, object] = {
            "iss": self.issuer if issuer is None else issuer,
            "sub": sub,
            "aud": audience if isinstance(audience, str) else list(audience),
            "iat": int(iat),
            "exp": int(iat + lifetime),
            "jti": secrets.token_urlsafe(12),
            "groups": list(groups),
        }
        if email is not None:
            claims["email"] = email
        if not_before is not None:
            claims["nbf"] = int(not_before)
        claims.update(extra or {})
        for name in omit:
            claims.pop(name, None)
        return claims

    def mint(
        self, *, alg: str | None = None, kid: str | None = None, **options: Unpack[ClaimOptions]
    ) -> str:
        """A signed compact JWT.

        Without ``kid`` the default key for ``alg`` (default RS256) signs; with ``kid`` that key
        signs, with ``alg`` defaulting to the natural algorithm of its type.
        """
        with self._lock:
            if kid is None:
                kty = _KTY_FOR_ALG.get(alg or "RS256")
                if kty is None:
                    raise ValueError(f"no key type for alg {alg!r}; use mint_hs256/mint_unsigned")
                if kty not in self._default:
                    raise LookupError(f"no published {kty} key; call add_key({kty!r}) first")
                kid = self._default[kty]
            entry = self._keys[kid]
        alg = alg or _DEFAULT_ALG[entry.kty]
        with warnings.catch_warnings():
            # joserfc flags EdDSA as superseded by RFC 9864; tests still need it.
            warnings.simplefilter("ignore", SecurityWarning)
            return jwt.encode(
                {"alg": alg, "kid": kid}, self.claims(**options), entry.key, algorithms=[alg]
            )

    def mint_unsigned(self, **options: Unpack[ClaimOptions]) -> str:
        """An ``alg: none`` token with an empty signature (joserfc rightly refuses to make one)."""
        header = {"alg": "none", "typ": "JWT"}
        return f"{_b64json(header)}.{_b64json(self.claims(**options))}."

    def mint_hs256(self, secret: bytes, **options: Unpack[ClaimOptions]) -> str:
        """An HS256 token under a shared secret, built by hand so any secret length works."""
        header = {"alg": "HS256", "typ": "JWT"}
        signing_input = f"{_b64json(header)}.{_b64json(self.claims(**options))}"
        mac = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
        return f"{signing_input}.{_b64url(mac)}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: LocalIssuer


class _Handler(BaseHTTPRequestHandler):
    server_version = "pgwarden-local-issuer"

    def do_GET(self) -> None:
        owner = cast(_Server, self.server).owner
        path = urlsplit(self.path).path
        document = owner._document(path)
        if document is None:
            self._json(404, {"error": "not_found"})
        else:
            self._json(200, document)

    def _json(self, status: int, body: Mapping[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # Tests and the demo share a terminal; per-request lines would drown real output.
        return
