"""Client side of PostgreSQL's password authentication towards the upstream database (sans-IO).

SCRAM-SHA-256 follows RFC 5802/7677 as PostgreSQL implements it (docs: "SASL Authentication"),
including libpq's password normalisation, so a password that works with psql works here. MD5 is
kept for servers still configured with it. Nothing here touches a socket: the caller moves the
bytes and maps :class:`AuthFailed` to its own error.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from collections.abc import Sequence
from typing import Final

__all__ = ["MAX_ITERATIONS", "AuthFailed", "ScramClient", "md5_response", "saslprep"]

SCRAM_SHA_256: Final = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS: Final = "SCRAM-SHA-256-PLUS"

# PostgreSQL's default is 4096; anything above this bound costs seconds of CPU per login and
# only a hostile or broken server would ask for it.
MAX_ITERATIONS: Final = 10_000_000

_NONCE_BYTES = 18  # what libpq uses (SCRAM_RAW_NONCE_LEN)
_PRINTABLE_NO_COMMA = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # RFC 5802 "printable"
_MAX_ERROR_TEXT = 100


class AuthFailed(Exception):
    """Upstream authentication failed; the message is safe to show and never holds the password."""


def saslprep(password: str) -> bytes:
    """The password bytes SCRAM hashes, exactly as libpq's ``pg_saslprep`` picks them.

    SASLprep (RFC 4013) when the password passes it, else the raw UTF-8 bytes: PostgreSQL
    stored the verifier that way, so normalising more strictly than libpq would lock users out.
    """
    raw = _utf8(password)
    if password.isascii():
        return raw  # libpq's fast path: ASCII is used unchanged, control characters included
    mapped = []
    for ch in password:
        if stringprep.in_table_c12(ch):
            mapped.append(" ")  # non-ASCII space -> SPACE
        elif not stringprep.in_table_b1(ch):  # B.1: commonly mapped to nothing
            mapped.append(ch)
    if not mapped:
        return raw
    normalized = unicodedata.ucd_3_2_0.normalize("NFKC", "".join(mapped))
    if any(_prohibited(ch) for ch in normalized):
        return raw
    # RFC 3454 section 6: right-to-left text must be all RTL-or-neutral and start and end RTL.
    if any(stringprep.in_table_d1(ch) for ch in normalized) and (
        any(stringprep.in_table_d2(ch) for ch in normalized)
        or not stringprep.in_table_d1(normalized[0])
        or not stringprep.in_table_d1(normalized[-1])
    ):
        return raw
    return _utf8(normalized)


def _prohibited(ch: str) -> bool:
    return (
        stringprep.in_table_c12(ch)
        or stringprep.in_table_c21_c22(ch)
        or stringprep.in_table_c3(ch)
        or stringprep.in_table_c4(ch)
        or stringprep.in_table_c5(ch)
        or stringprep.in_table_c6(ch)
        or stringprep.in_table_c7(ch)
        or stringprep.in_table_c8(ch)
        or stringprep.in_table_c9(ch)
        or stringprep.in_table_a1(ch)  # unassigned code points, as libpq refuses them too
    )


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # A str decoded with surrogateescape (e.g. from a non-UTF-8 file) gets its bytes back.
        try:
            return text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise AuthFailed("the password is not valid Unicode text") from None


def md5_response(username: str, password: str, salt: bytes) -> bytes:
    """The AuthenticationMD5Password answer: ``md5`` hex(md5(hex(md5(password + user)) + salt))."""
    if len(salt) != 4:
        raise AuthFailed(f"the server sent an MD5 salt of {len(salt)} bytes, expected 4")
    # MD5 is what the protocol prescribes here, not a choice made for security.
    inner = hashlib.md5(_utf8(password) + _utf8(username), usedforsecurity=False).hexdigest()
    outer = hashlib.md5(inner.encode("ascii") + salt, usedforsecurity=False).hexdigest()
    return b"md5" + outer.encode("ascii")


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise AuthFailed(f"invalid SCRAM message from the server: {what} is not base64") from None


def _saslname(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _parse_attributes(message: bytes, what: str) -> list[tuple[str, str]]:
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthFailed(f"invalid SCRAM {what} from the server: not UTF-8") from None
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not part[0].isascii() or not part[0].isalpha():
            raise AuthFailed(f"invalid SCRAM {what} from the server: malformed attribute")
        attrs.append((part[0], part[2:]))
    return attrs


def _server_error_text(value: str) -> str:
    text = "".join(ch if ch.isprintable() else "?" for ch in value[:_MAX_ERROR_TEXT])
    return text + ("..." if len(value) > _MAX_ERROR_TEXT else "")


def _tls_server_end_point(certificate_der: bytes) -> bytes:
    """RFC 5929 channel-binding data: the certificate hashed with its signature's hash."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    try:
        cert = x509.load_der_x509_certificate(certificate_der)
    except ValueError:
        raise AuthFailed("channel binding: the server certificate is not valid DER") from None
    algorithm = cert.signature_hash_algorithm
    if algorithm is None:
        # Ed25519/Ed448 certificates have no separate hash; PostgreSQL refuses them too.
        raise AuthFailed(
            "channel binding is not possible with this server certificate's signature algorithm"
        )
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()  # RFC 5929 section 4.1
    digest = hashes.Hash(algorithm)
    digest.update(certificate_der)
    return digest.finalize()


class ScramClient:
    """One SCRAM-SHA-256 exchange: ``client_first`` -> ``client_final`` -> ``verify_server_final``.

    ``client_final`` runs PBKDF2 with the server's iteration count (up to
    :data:`MAX_ITERATIONS`); at PostgreSQL's default of 4096 that takes a few milliseconds.
    """

    __slots__ = (
        "_auth_message",
        "_cbind_data",
        "_client_first_bare",
        "_gs2_header",
        "_mechanism",
        "_nonce",
        "_password",
        "_server_key",
        "_state",
    )

    def __init__(
        self,
        password: str,
        mechanisms: Sequence[str],
        *,
        channel_binding: bytes | None = None,
        nonce: str | None = None,
        username: str = "",
    ) -> None:
        """Pick the mechanism from the server's AuthenticationSASL list.

        ``channel_binding`` is the DER of the server's TLS certificate; when given and the server
        offers SCRAM-SHA-256-PLUS, the exchange is bound to the TLS channel
        (``tls-server-end-point``). ``nonce`` and ``username`` exist for test vectors: the nonce
        is random by default and PostgreSQL ignores the SCRAM username (libpq sends none).
        """
        offered = set(mechanisms)
        cbind_data: bytes | None = None
        if channel_binding is not None and SCRAM_SHA_256_PLUS in offered:
            self._mechanism: str = SCRAM_SHA_256_PLUS
            gs2_header = "p=tls-server-end-point,,"
            cbind_data = _tls_server_end_point(channel_binding)
        elif SCRAM_SHA_256 in offered:
            self._mechanism = SCRAM_SHA_256
            # "y": we could bind but the server did not offer it, which lets a server that does
            # support binding detect a downgrade by a man in the middle (RFC 5802 section 6).
            gs2_header = "y,," if channel_binding is not None else "n,,"
        else:
            names = ", ".join(mechanisms) or "none"
            raise AuthFailed(
                f"the database offers SASL mechanisms pgwarden cannot use ({names}); "
                "SCRAM-SHA-256 is required"
            )
        if nonce is None:
            nonce = _b64(secrets.token_bytes(_NONCE_BYTES))
        elif not _PRINTABLE_NO_COMMA.fullmatch(nonce):
            raise ValueError("a SCRAM nonce must be printable ASCII without commas")
        self._password: bytes | None = saslprep(password)
        self._nonce = nonce
        self._gs2_header = gs2_header
        self._cbind_data = cbind_data
        self._client_first_bare = f"n={_saslname(username)},r={nonce}"
        self._auth_message = b""
        self._server_key = b""
        self._state = "start"

    def __repr__(self) -> str:
        return f"<ScramClient {self._mechanism} state={self._state}>"

    @property
    def mechanism(self) -> str:
        """The mechanism name to send in SASLInitialResponse."""
        return self._mechanism

    def client_first(self) -> bytes:
        """The client-first-message (the SASLInitialResponse payload)."""
        self._expect("start")
        self._state = "first_sent"
        return (self._gs2_header + self._client_first_bare).encode("utf-8")

    def client_final(self, server_first: bytes) -> bytes:
        """The client-final-message with the proof, given AuthenticationSASLContinue's data."""
        self._expect("first_sent")
        self._state = "failed"  # until this exchange step completes
        attrs = _parse_attributes(server_first, "server-first-message")
        keys = [k for k, _ in attrs]
        if keys and keys[0] == "m":
            raise AuthFailed("the server requires a SCRAM extension pgwarden does not support")
        if keys[:3] != ["r", "s", "i"]:
            raise AuthFailed(
                "invalid SCRAM server-first-message: expected nonce, salt and iteration count"
            )
        server_nonce, salt_b64, iterations_text = (v for _, v in attrs[:3])
        if not _PRINTABLE_NO_COMMA.fullmatch(server_nonce):
            raise AuthFailed("invalid SCRAM server-first-message: bad nonce characters")
        if not server_nonce.startswith(self._nonce) or len(server_nonce) == len(self._nonce):
            raise AuthFailed("SCRAM nonce mismatch: the server did not extend the client nonce")
        salt = _b64decode(salt_b64, "the salt")
        if not salt:
            raise AuthFailed("invalid SCRAM server-first-message: empty salt")
        if not iterations_text.isascii() or not iterations_text.isdigit():
            raise AuthFailed("invalid SCRAM server-first-message: bad iteration count")
        iterations = int(iterations_text)
        if not 1 <= iterations <= MAX_ITERATIONS:
            raise AuthFailed(
                f"the server asks for {iterations} SCRAM iterations; "
                f"pgwarden accepts 1 to {MAX_ITERATIONS}"
            )

        password = self._password
        assert password is not None  # cleared only after this step
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        self._password = None  # the salted password is all we keep from here on
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        self._server_key = _hmac(salted, b"Server Key")

        channel = self._gs2_header.encode("ascii") + (self._cbind_data or b"")
        without_proof = f"c={_b64(channel)},r={server_nonce}"
        self._auth_message = b",".join(
            (self._client_first_bare.encode("utf-8"), server_first, without_proof.encode("ascii"))
        )
        signature = _hmac(stored_key, self._auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._state = "final_sent"
        return f"{without_proof},p={_b64(proof)}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> None:
        """Check AuthenticationSASLFinal: the server proves it knows the password too."""
        self._expect("final_sent")
        self._state = "failed"
        attrs = _parse_attributes(server_final, "server-final-message")
        key, value = attrs[0]
        if key == "e":
            raise AuthFailed(f"the server rejected the SCRAM exchange: {_server_error_text(value)}")
        if key != "v":
            raise AuthFailed("invalid SCRAM server-final-message: no server signature")
        received = _b64decode(value, "the server signature")
        expected = _hmac(self._server_key, self._auth_message)
        if not hmac.compare_digest(received, expected):
            raise AuthFailed(
                "the database server's SCRAM signature does not match: "
                "it does not know this password (wrong server or a man in the middle)"
            )
        self._state = "done"

    def _expect(self, state: str) -> None:
        if self._state != state:
            raise RuntimeError(f"SCRAM step called out of order (state {self._state})")
