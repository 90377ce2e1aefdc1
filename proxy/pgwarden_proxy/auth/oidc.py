"""Validation of the OIDC token (a signed JWT) that a client sends as its PostgreSQL password.

Keys come from the issuer's JWKS (found through OIDC discovery unless configured), cached by
``kid``. Only asymmetric signatures are accepted, the algorithm is checked before any key is
looked up, and a key is used only for the algorithm family it belongs to, which rules out the
classic ``none`` and HS256-with-a-public-key forgeries. Keys named by the token itself
(``jku``, ``jwk``, ``x5u``, ``x5c``) are never used: trust comes only from the configured issuer.

Every refusal is a :class:`TokenRejected` with a metrics slug, a SQLSTATE and a message that
tells the person what to do. The token never appears in messages or logs.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar
from urllib.parse import urlsplit

from joserfc import jws
from joserfc.errors import JoseError, UnsupportedAlgorithmError
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import ECKey, JWKRegistry, OKPKey, RSAKey
from joserfc.jws import CompactSignature, JWSRegistry
from pydantic import BaseModel, ConfigDict, ValidationError

from pgwarden.api.config import Oidc

__all__ = ["ALLOWED_ALGORITHMS", "Identity", "OidcVerifier", "TokenRejected"]

log = logging.getLogger("pgwarden.oidc")

_PublicKey = RSAKey | ECKey | OKPKey

# alg -> (JWK kty, curves allowed for it; None = any size the kty allows). Ed25519/Ed448 are
# RFC 9864's fully-specified names for EdDSA.
_ALG_KEYS: Final[dict[str, tuple[str, frozenset[str] | None]]] = {
    **{f"{family}{bits}": ("RSA", None) for family in ("RS", "PS") for bits in (256, 384, 512)},
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
    "Ed25519": ("OKP", frozenset({"Ed25519"})),
    "Ed448": ("OKP", frozenset({"Ed448"})),
}
ALLOWED_ALGORITHMS: Final = frozenset(_ALG_KEYS)

_MIN_RSA_BITS = 2048
_MAX_DOCUMENT_BYTES = 1024 * 1024  # discovery and JWKS documents are a few KiB
_MAX_TOKEN_CHARS = 64 * 1024
_DISCOVERY_PATH = "/.well-known/openid-configuration"
_SHOW_MAX = 80

# Kubernetes service-account tokens. Names are checked against the API server's rules (a
# namespace is a DNS-1123 label, a service account name lowercase alphanumerics, '-' and '.'),
# so that "NS:NAME" is never ambiguous and no name forges a line in logs.
_K8S_CLAIM = "kubernetes.io"
_SA_PREFIX = "system:serviceaccount:"
_SA_GROUP = "system:serviceaccounts"
_NAMESPACE_RE: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")
_SA_NAME_RE: Final = re.compile(r"(?=.{1,253}$)[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?")

_INVALID = "28P01"  # invalid_password: the credential itself is not acceptable
_REFUSED = "28000"  # invalid_authorization_specification: refused for another reason


class TokenRejected(Exception):
    """A token was refused. ``message`` is safe to send to the client and to log."""

    _NOT_THE_CREDENTIAL: Final = frozenset({"missing_claim", "jwks_unavailable"})

    def __init__(self, reason: str, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        if sqlstate is None:
            sqlstate = _REFUSED if reason in self._NOT_THE_CREDENTIAL else _INVALID
        self.sqlstate = sqlstate

    def __repr__(self) -> str:
        return f"TokenRejected(reason={self.reason!r}, sqlstate={self.sqlstate!r})"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who connected, as the issuer vouches for it."""

    username: str
    groups: frozenset[str]
    subject: str
    issuer: str
    expires_at: datetime  # UTC, the token's exp
    actor: Mapping[str, Any] | None  # RFC 8693 "act": the agent acting for the subject
    # exp plus the clock-skew leeway: login accepts the token until then, so a session ends then
    usable_until: datetime


class _Discovery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    issuer: str
    jwks_uri: str


class _Jwks(BaseModel):
    model_config = ConfigDict(extra="ignore")
    keys: list[dict[str, Any]]


_Doc = TypeVar("_Doc", _Discovery, _Jwks)


class _FetchError(Exception):
    """Discovery or JWKS could not be fetched; the message is for the operator's log."""


class _Registry(JWSRegistry):
    """joserfc's JWS checks, limited to our algorithms and sized for real-world tokens."""

    max_header_length = 4096  # some issuers put certificate chains in the header
    max_signature_length = 2048  # base64 of an RSA-8192 signature

    def get_alg(self, name: str) -> JWSAlgModel:
        if name not in ALLOWED_ALGORITHMS:
            raise UnsupportedAlgorithmError(f"Algorithm of '{name}' is not allowed")
        # Looked up directly: the base class warns about "EdDSA" on every call (RFC 9864).
        return self.algorithms[name]


# Non-strict: issuers add private header fields (Azure's "nonce", ...); crit is still enforced.
_REGISTRY = _Registry(strict_check_header=False)


def _show(value: object) -> str:
    """A token-supplied value, quoted and bounded, for a message."""
    text = repr(value)
    return text if len(text) <= _SHOW_MAX else text[: _SHOW_MAX - 3] + "..."


def _utc(timestamp: float) -> datetime:
    try:
        return datetime.fromtimestamp(timestamp, UTC)
    except (OverflowError, OSError, ValueError):
        return (
            datetime.max.replace(tzinfo=UTC) if timestamp > 0 else datetime.min.replace(tzinfo=UTC)
        )


def _iso(timestamp: float) -> str:
    return _utc(timestamp).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(url: str, what: str) -> None:
    """Raise ValueError unless the URL is https, or http to a loopback address."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise ValueError(f"{what} {url!r} is not a valid URL") from None
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and _is_loopback(host):
        return
    raise ValueError(
        f"{what} {url!r} must be an https:// URL (http:// is accepted only for loopback "
        "addresses, for local testing)"
    )


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs that pass the same scheme rule (no https -> http)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        try:
            _check_url(newurl, "redirect target")
        except ValueError as e:
            raise urllib.error.URLError(str(e)) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _http_get(url: str, timeout: float, ca_file: Path | None = None) -> bytes:
    """Blocking GET of a small JSON document (run in a worker thread); `ca_file`: trust only
    this CA bundle for https (a private issuer, the cluster's own)."""
    _check_url(url, "URL")
    # Loopback never goes through a proxy from the environment.
    proxies = urllib.request.ProxyHandler({} if _is_loopback(urlsplit(url).hostname) else None)
    handlers: list[urllib.request.BaseHandler] = [proxies, _CheckedRedirects()]
    if ca_file is not None:
        context = ssl.create_default_context(cafile=os.fspath(ca_file))
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(  # noqa: S310 - the scheme was checked above
        url, headers={"Accept": "application/json", "User-Agent": "pgwarden"}
    )
    with opener.open(request, timeout=timeout) as response:
        body: bytes = response.read(_MAX_DOCUMENT_BYTES + 1)
    if len(body) > _MAX_DOCUMENT_BYTES:
        raise _FetchError(f"{url}: the document exceeds {_MAX_DOCUMENT_BYTES} bytes")
    return body


def _fits(key: _PublicKey, alg: str) -> bool:
    """May this JWK verify a signature made with ``alg``?"""
    kty, curves = _ALG_KEYS[alg]
    if key.key_type != kty:
        return False
    if curves is not None and (not isinstance(key, ECKey | OKPKey) or key.curve_name not in curves):
        return False
    if key.alg is not None and key.alg != alg:
        return False
    key_ops = key.get("key_ops")
    return key_ops is None or "verify" in key_ops


def _import_jwks(document: _Jwks, source: str) -> list[tuple[str | None, _PublicKey]]:
    """The usable signing keys of a JWKS; anything unusable is skipped with a log line."""
    keys: list[tuple[str | None, _PublicKey]] = []
    for index, raw in enumerate(document.keys):
        raw_kid = raw.get("kid")
        kid = raw_kid if isinstance(raw_kid, str) else None
        label = f"{source} key {kid!r}" if kid is not None else f"{source} key #{index}"
        kty = raw.get("kty")
        if kty == "oct":
            # A symmetric key in a JWKS would let anyone holding it mint tokens: never trust it.
            log.warning("%s: ignoring a symmetric (oct) key", label)
            continue
        if raw.get("use") not in (None, "sig"):
            continue  # an encryption key
        try:
            key = JWKRegistry.import_key(raw)
        except (JoseError, ValueError, TypeError, KeyError) as e:
            log.warning("%s: ignoring a key that cannot be imported (%s)", label, e)
            continue
        if not isinstance(key, RSAKey | ECKey | OKPKey):
            continue
        if key.is_private:
            # The issuer publishes its private key: whatever it signs is forgeable.
            log.error("%s: ignoring a key published with its private part", label)
            continue
        if isinstance(key, RSAKey) and key.public_key.key_size < _MIN_RSA_BITS:
            log.warning("%s: ignoring an RSA key shorter than %d bits", label, _MIN_RSA_BITS)
            continue
        keys.append((kid, key))
    return keys


class OidcVerifier:
    """Verifies tokens of one issuer; share one instance across all sessions of a proxy."""

    def __init__(
        self,
        settings: Oidc,
        *,
        leeway: float = 60.0,
        min_refresh_interval: float = 30.0,
        http_timeout: float = 5.0,
        clock: Callable[[], float] = time.time,
        jwks_max_age: float = 3600.0,
        jwks_max_stale: float = 86400.0,
    ) -> None:
        """Check the settings; nothing is fetched until :meth:`start` or the first token.

        A JWKS older than ``jwks_max_age`` seconds is refetched on the next verification so
        that keys the issuer removed stop being trusted; while the issuer cannot be reached the
        cached keys stay in use, but for at most ``jwks_max_stale`` seconds.
        """
        _check_url(settings.issuer, "the OIDC issuer")
        if settings.jwks_uri is not None:
            _check_url(settings.jwks_uri, "jwksUri")
        self._settings = settings
        self._issuer = settings.issuer
        self._discovery_url = settings.issuer.rstrip("/") + _DISCOVERY_PATH
        self._leeway = leeway
        self._min_refresh_interval = min_refresh_interval
        self._http_timeout = http_timeout
        self._clock = clock
        self._jwks_max_age = jwks_max_age
        self._jwks_max_stale = jwks_max_stale

        self._jwks_uri: str | None = settings.jwks_uri
        self._keys: list[tuple[str | None, _PublicKey]] | None = None
        self._fetched_at = 0.0  # when _keys were fetched
        self._last_attempt: float | None = None  # any fetch, for the rate limit
        self._inflight: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------ public

    async def start(self) -> None:
        """Fetch discovery and JWKS ahead of the first login; a failure is only logged."""
        await self._refresh()

    async def verify(self, token: str) -> Identity:
        """The identity in a valid token, or :class:`TokenRejected`."""
        token = token.strip()
        obj = self._parse(token)
        headers = obj.headers()
        alg: str = headers["alg"]
        kid: str | None = headers.get("kid")
        key = await self._key_for(alg, kid)
        try:
            valid = jws.validate_compact(obj, key, registry=_REGISTRY)
        except (JoseError, ValueError):
            valid = False
        if not valid:
            raise TokenRejected(
                "bad_signature",
                f"the token's signature does not verify with the key {_show(kid)} of "
                f"{self._issuer}; the token was altered or was not issued by it",
            )
        claims = self._claims(obj.payload)
        return self._identity(claims)

    # ------------------------------------------------------------------------------ parsing

    def _parse(self, token: str) -> CompactSignature:
        if not token:
            raise TokenRejected(
                "malformed",
                f"no token was sent as the password; obtain an access token from "
                f"{self._issuer} and pass it as the password",
            )
        segments = token.count(".") + 1
        if len(token) > _MAX_TOKEN_CHARS or not token.isascii() or segments not in (3, 5):
            self._malformed()
        if segments == 5:
            raise TokenRejected(
                "malformed",
                "the password is an encrypted token (JWE); pgwarden needs a signed JWT: "
                f"obtain an access token or ID token from {self._issuer}",
            )
        try:
            obj = jws.extract_compact(token.encode("ascii"), registry=_REGISTRY)
        except (JoseError, ValueError):
            self._malformed()
        headers = obj.headers()
        alg = headers.get("alg")
        if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
            allowed = ", ".join(sorted(ALLOWED_ALGORITHMS))
            raise TokenRejected(
                "alg_not_allowed",
                f"the token is signed with algorithm {_show(alg)}; pgwarden accepts only "
                f"asymmetric signatures ({allowed}) made by {self._issuer}",
            )
        if "crit" in headers or "b64" in headers:
            raise TokenRejected(
                "malformed",
                "the token uses critical JWS header extensions, which pgwarden does not "
                f"support; obtain a standard access token from {self._issuer}",
            )
        try:
            _REGISTRY.check_header(headers)
        except (JoseError, ValueError):
            self._malformed()
        return obj

    def _malformed(self) -> NoReturn:
        raise TokenRejected(
            "malformed",
            "the password is not a signed JWT (three base64url parts separated by dots); "
            f"obtain an access token from {self._issuer} and pass it as the password",
        ) from None

    # ------------------------------------------------------------------------------ keys

    async def _key_for(self, alg: str, kid: str | None) -> _PublicKey:
        if self._keys is None or self._clock() - self._fetched_at >= self._jwks_max_age:
            await self._refresh()
        key = self._lookup(alg, kid)
        if key is None:
            # A new kid usually means the issuer rotated its keys: refetch, rate-limited.
            await self._refresh()
            key = self._lookup(alg, kid)
        if key is not None:
            return key
        if self._usable_keys() is None:
            raise TokenRejected(
                "jwks_unavailable",
                f"pgwarden cannot obtain the signing keys of {self._issuer} right now; try "
                "again in a minute, and if it persists ask the operator to check the proxy log",
            )
        if kid is None:
            raise TokenRejected(
                "unknown_key",
                f"the token names no key (kid) and {self._issuer} publishes no single key "
                f"for {alg}; obtain a fresh token from {self._issuer}",
            )
        raise TokenRejected(
            "unknown_key",
            f"the token is signed with key {_show(kid)}, which {self._issuer} does not publish "
            f"(any more); obtain a fresh token from {self._issuer} and reconnect",
        )

    def _usable_keys(self) -> list[tuple[str | None, _PublicKey]] | None:
        if self._keys is not None and self._clock() - self._fetched_at > self._jwks_max_stale:
            log.error(
                "the JWKS of %s could not be refreshed for %.0fs; its keys are no longer trusted",
                self._issuer,
                self._jwks_max_stale,
            )
            self._keys = None
        return self._keys

    def _lookup(self, alg: str, kid: str | None) -> _PublicKey | None:
        keys = self._usable_keys()
        if keys is None:
            return None
        if kid is None:
            fitting = [k for _, k in keys if _fits(k, alg)]
            return fitting[0] if len(fitting) == 1 else None
        named = [k for key_kid, k in keys if key_kid == kid]
        for key in named:
            if _fits(key, alg):
                return key
        if named:
            # The key exists but belongs to another algorithm: never stretch it to fit.
            raise TokenRejected(
                "alg_not_allowed",
                f"the token says {alg}, but {self._issuer}'s key {_show(kid)} is not a key "
                f"for {alg}; obtain a fresh token from {self._issuer}",
            )
        return None

    def _may_fetch(self, now: float) -> bool:
        last = self._last_attempt
        return last is None or now - last >= self._min_refresh_interval

    async def _refresh(self) -> None:
        """Join the JWKS fetch in flight, or start one unless the rate limit forbids it.

        The fetch is a task of its own, so a verification that gives up (its client hung up)
        does not cancel it for the others waiting on it.
        """
        task = self._inflight
        if task is None:
            now = self._clock()
            if not self._may_fetch(now):
                return
            self._last_attempt = now
            task = asyncio.get_running_loop().create_task(self._fetch(now))
            task.add_done_callback(self._fetch_done)
            self._inflight = task
        await asyncio.shield(task)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self, started: float) -> None:
        try:
            keys = await self._fetch_keys()
        except _FetchError as e:
            log.warning("cannot refresh the signing keys of %s: %s", self._issuer, e)
            return
        except Exception:
            # Shared by every waiting login: a surprise here must not escape as a crash.
            log.exception("unexpected failure refreshing the signing keys of %s", self._issuer)
            return
        self._keys = keys
        self._fetched_at = started
        log.info(
            "loaded %d signing key(s) of %s: %s",
            len(keys),
            self._issuer,
            ", ".join(kid or "(no kid)" for kid, _ in keys),
        )

    async def _fetch_keys(self) -> list[tuple[str | None, _PublicKey]]:
        jwks_uri = self._jwks_uri
        if jwks_uri is None:
            discovery = await self._get(self._discovery_url, _Discovery)
            if discovery.issuer != self._issuer:
                raise _FetchError(
                    f"{self._discovery_url} names issuer {discovery.issuer!r}, but the "
                    f"configured issuer is {self._issuer!r}; they must be identical"
                )
            try:
                _check_url(discovery.jwks_uri, "the discovered jwks_uri")
            except ValueError as e:
                raise _FetchError(str(e)) from None
            jwks_uri = discovery.jwks_uri
        try:
            document = await self._get(jwks_uri, _Jwks)
        except _FetchError:
            if self._settings.jwks_uri is None:
                self._jwks_uri = None  # rediscover next time: the issuer may have moved it
            raise
        if self._settings.jwks_uri is None:
            self._jwks_uri = jwks_uri
        keys = _import_jwks(document, jwks_uri)
        if not keys:
            raise _FetchError(f"{jwks_uri} holds no usable signing key")
        return keys

    async def _get(self, url: str, model: type[_Doc]) -> _Doc:
        try:
            async with asyncio.timeout(self._http_timeout):
                body = await asyncio.to_thread(
                    _http_get, url, self._http_timeout, self._settings.ca_file
                )
        except TimeoutError:
            raise _FetchError(f"{url}: no answer within {self._http_timeout:g}s") from None
        except urllib.error.HTTPError as e:
            raise _FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise _FetchError(f"{url}: {e.reason}") from None
        except (OSError, ValueError, http.client.HTTPException) as e:
            raise _FetchError(f"{url}: {e}") from None
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise _FetchError(f"{url}: not a valid {model.__name__[1:]} document ({e})") from None

    # ------------------------------------------------------------------------------ claims

    def _claims(self, payload: bytes) -> dict[str, Any]:
        def no_constants(name: str) -> NoReturn:
            raise ValueError(name)

        try:
            claims = json.loads(payload, parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError):
            claims = None
        if not isinstance(claims, dict):
            raise TokenRejected(
                "malformed",
                "the token's payload is not a JSON object of claims; obtain an access token "
                f"from {self._issuer}",
            )
        return claims

    def _required_time(self, claims: Mapping[str, Any], name: str) -> float:
        value = self._time_claim(claims, name)
        if value is None:
            raise TokenRejected(
                "missing_claim",
                f"the token has no {name!r} claim, which pgwarden requires; "
                f"ask the administrator of {self._issuer} to include it",
            )
        return value

    def _time_claim(self, claims: Mapping[str, Any], name: str) -> float | None:
        value = claims.get(name)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise TokenRejected(
                "malformed",
                f"the token's {name!r} claim is not a number of seconds since the epoch",
            )
        return float(value)

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        issuer = self._issuer
        leeway = self._leeway
        skew = f"(clock skew allowance {leeway:g}s)"

        iss = claims.get("iss")
        if iss != issuer:
            raise TokenRejected(
                "bad_issuer",
                f"the token was issued by {_show(iss)}, but this endpoint trusts only "
                f"{issuer}; obtain a token from {issuer}",
            )
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self._settings.audience not in audiences:
            raise TokenRejected(
                "bad_audience",
                f"the token is meant for audience {_show(aud)}, not {self._settings.audience!r}; "
                f"request a token for audience {self._settings.audience!r} from {issuer}",
            )

        now = self._clock()
        exp = self._required_time(claims, "exp")
        iat = self._required_time(claims, "iat")
        nbf = self._time_claim(claims, "nbf")
        if now > exp + leeway:
            raise TokenRejected(
                "expired",
                f"token expired at {_iso(exp)} {skew}; obtain a fresh token from {issuer} "
                "and reconnect",
            )
        if nbf is not None and now < nbf - leeway:
            raise TokenRejected(
                "not_yet_valid",
                f"token is not valid before {_iso(nbf)} {skew}; wait until then or check "
                "this machine's clock",
            )
        if iat > now + leeway:
            raise TokenRejected(
                "issued_in_future",
                f"token claims to be issued at {_iso(iat)}, in the future {skew}; the clocks "
                f"of pgwarden and {issuer} disagree, ask an operator to check them",
            )

        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenRejected(
                "missing_claim",
                f"the token has no 'sub' (subject) claim; ask the administrator of {issuer} "
                "to include it",
            )
        service_account = self._service_account(claims, subject)
        if service_account is not None:
            username, groups = service_account
        else:
            username, groups = self._username(claims), self._groups(claims)
        return Identity(
            username=username,
            groups=groups,
            subject=subject,
            issuer=issuer,
            expires_at=_utc(exp),
            actor=self._actor(claims),
            usable_until=_utc(exp + leeway),
        )

    def _service_account(
        self, claims: Mapping[str, Any], subject: str
    ) -> tuple[str, frozenset[str]] | None:
        """Identity and groups of a Kubernetes service-account token, when they are enabled.

        None for any other token (its identity comes from usernameClaim and groupsClaim).
        """
        if not self._settings.service_accounts or _K8S_CLAIM not in claims:
            return None
        k8s = claims[_K8S_CLAIM]
        namespace = k8s.get("namespace") if isinstance(k8s, dict) else None
        account = k8s.get("serviceaccount") if isinstance(k8s, dict) else None
        name = account.get("name") if isinstance(account, dict) else None
        if not (
            isinstance(namespace, str)
            and _NAMESPACE_RE.fullmatch(namespace)
            and isinstance(name, str)
            and _SA_NAME_RE.fullmatch(name)
        ):
            raise TokenRejected(
                "service_account_invalid",
                f"the token's {_K8S_CLAIM!r} claim does not name a namespace and a service "
                f"account (namespace, serviceaccount.name); pgwarden accepts only projected "
                f"service-account tokens of {self._issuer}",
                _REFUSED,
            )
        expected = f"{_SA_PREFIX}{namespace}:{name}"
        if subject != expected:
            raise TokenRejected(
                "service_account_mismatch",
                f"the token's subject {_show(subject)} does not match its {_K8S_CLAIM!r} claim "
                f"(service account {name!r} in namespace {namespace!r}, i.e. {expected!r}); "
                f"pgwarden refuses such a token: use a projected service-account token issued "
                f"by {self._issuer}",
                _REFUSED,
            )
        groups = frozenset({_SA_GROUP, f"{_SA_GROUP}:{namespace}"}) | self._groups(claims)
        return expected, groups

    def _username(self, claims: Mapping[str, Any]) -> str:
        name = self._settings.username_claim
        value = claims.get(name)
        # Control characters would let a username forge lines in logs and recordings.
        if not isinstance(value, str) or not value or not value.isprintable():
            problem = "has no" if value is None else "has an unusable"
            subject = claims.get("sub")
            if _K8S_CLAIM in claims or (
                isinstance(subject, str) and subject.startswith(_SA_PREFIX)
            ):
                raise TokenRejected(
                    "missing_claim",
                    f"the token {problem} {name!r} claim, which this endpoint uses as the user "
                    "name (usernameClaim); it looks like a Kubernetes service-account token: "
                    "to log in with those, the operator must set auth.oidc.serviceAccounts: true "
                    f"(with {self._issuer} as the cluster's issuer)",
                )
            raise TokenRejected(
                "missing_claim",
                f"the token {problem} {name!r} claim, which this endpoint uses as the user "
                f"name (usernameClaim); ask the administrator of {self._issuer} to include it "
                "as a string, or request a token with the scope that adds it",
            )
        return value

    def _groups(self, claims: Mapping[str, Any]) -> frozenset[str]:
        name = self._settings.groups_claim
        value = claims.get(name)
        if value is None:
            return frozenset()
        if isinstance(value, str):
            return frozenset({value})
        if isinstance(value, list) and all(isinstance(g, str) for g in value):
            return frozenset(value)
        raise TokenRejected(
            "missing_claim",
            f"the token's {name!r} claim (groupsClaim) must be a string or a list of strings; "
            f"ask the administrator of {self._issuer} to fix its format",
        )

    def _actor(self, claims: Mapping[str, Any]) -> Mapping[str, Any] | None:
        act = claims.get("act")
        if act is None:
            return None
        if not isinstance(act, dict):
            raise TokenRejected(
                "malformed", "the token's 'act' (actor, RFC 8693) claim is not a JSON object"
            )
        return dict(act)
