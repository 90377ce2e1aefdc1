"""SCRAM-SHA-256 and MD5 against RFC vectors, a small server written here, and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden_proxy.auth.scram import (
    MAX_ITERATIONS,
    AuthFailed,
    ScramClient,
    md5_response,
    saslprep,
)

MECHS = ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def h(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


@dataclass
class Verifier:
    """What PostgreSQL stores in pg_authid.rolpassword for a SCRAM role."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    @classmethod
    def make(cls, password: bytes, salt: bytes | None = None, iterations: int = 4096) -> Verifier:
        salt = salt or secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        return cls(
            salt,
            iterations,
            hashlib.sha256(h(salted, b"Client Key")).digest(),
            h(salted, b"Server Key"),
        )


class TinyServer:
    """The server side of one exchange, as PostgreSQL's auth-scram.c does it."""

    def __init__(self, verifier: Verifier, channel_binding: bytes = b"") -> None:
        self.v = verifier
        self.channel_binding = channel_binding
        self.nonce = b64(secrets.token_bytes(18))

    def first(self, client_first: bytes) -> bytes:
        text = client_first.decode()
        gs2_flag, _authzid, bare = text.split(",", 2)
        self.gs2_header = text[: len(text) - len(bare)]
        assert gs2_flag in ("n", "y", "p=tls-server-end-point")
        user, nonce = bare.split(",")
        assert user.startswith("n=")
        assert nonce.startswith("r=")
        self.client_first_bare = bare
        self.full_nonce = nonce[2:] + self.nonce
        self.server_first = f"r={self.full_nonce},s={b64(self.v.salt)},i={self.v.iterations}"
        return self.server_first.encode()

    def final(self, client_final: bytes) -> bytes:
        text = client_final.decode()
        without_proof, proof_attr = text.rsplit(",", 1)
        c_attr, r_attr = without_proof.split(",")
        expected_c = base64.b64decode(c_attr[2:])
        assert expected_c == self.gs2_header.encode() + self.channel_binding
        assert r_attr == f"r={self.full_nonce}"
        auth_message = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        signature = h(self.v.stored_key, auth_message)
        proof = base64.b64decode(proof_attr[2:])
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if hashlib.sha256(client_key).digest() != self.v.stored_key:
            return b"e=invalid-proof"
        return f"v={b64(h(self.v.server_key, auth_message))}".encode()


def exchange(client: ScramClient, server: TinyServer) -> None:
    server_final = server.final(client.client_final(server.first(client.client_first())))
    client.verify_server_final(server_final)


# ------------------------------------------------------------------------------ RFC 7677


def test_rfc7677_vector() -> None:
    client = ScramClient("pencil", ["SCRAM-SHA-256"], nonce="rOprNGfwEbeRWgbNEkqO", username="user")
    assert client.mechanism == "SCRAM-SHA-256"
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = (
        b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert client.client_final(server_first) == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_client_first_is_what_postgres_expects() -> None:
    client = ScramClient("pw", MECHS)
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")
    nonce = first.removeprefix(b"n,,n=,r=")
    assert len(nonce) == 24  # 18 random bytes, base64, as libpq
    assert ScramClient("pw", MECHS).client_first() != first


def test_username_is_saslname_escaped() -> None:
    client = ScramClient("pw", MECHS, nonce="abc", username="a=b,c")
    assert client.client_first() == b"n,,n=a=3Db=2Cc,r=abc"


# ------------------------------------------------------------------------------ round trips


@settings(max_examples=30, deadline=None)
@given(password=st.text(max_size=40))
def test_round_trip_any_password(password: str) -> None:
    prepared = saslprep(password)
    server = TinyServer(Verifier.make(prepared, iterations=64))
    exchange(ScramClient(password, ["SCRAM-SHA-256"]), server)


def test_wrong_password_is_refused_by_the_server() -> None:
    server = TinyServer(Verifier.make(b"right", iterations=64))
    client = ScramClient("wrong", MECHS)
    final = server.final(client.client_final(server.first(client.client_first())))
    assert final == b"e=invalid-proof"
    with pytest.raises(AuthFailed, match="invalid-proof") as e:
        client.verify_server_final(final)
    assert "wrong" not in str(e.value)


def test_server_that_does_not_know_the_password_is_detected() -> None:
    # The impostor accepts any proof and signs with a key derived from another password.
    secret = "correct horse battery staple"
    client = ScramClient(secret, MECHS)
    impostor = TinyServer(Verifier.make(b"guess", iterations=64))
    impostor.first(client.client_first())
    client.client_final(impostor.server_first.encode())
    forged = b"v=" + base64.b64encode(secrets.token_bytes(32))
    with pytest.raises(AuthFailed, match="signature does not match") as e:
        client.verify_server_final(forged)
    assert secret not in str(e.value)
    assert secret not in repr(client)


# ------------------------------------------------------------------------------ validation


def started(password: str = "pw") -> ScramClient:
    client = ScramClient(password, MECHS, nonce="clientnonce")
    client.client_first()
    return client


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        (b"r=othernonceXYZ,s=c2FsdA==,i=4096", "nonce mismatch"),
        (b"r=clientnonce,s=c2FsdA==,i=4096", "nonce mismatch"),  # not extended
        (b"r=clientnonceXYZ,s=***,i=4096", "not base64"),
        (b"r=clientnonceXYZ,s=,i=4096", "empty salt"),
        (b"r=clientnonceXYZ,s=c2FsdA==,i=0", "iterations"),
        (b"r=clientnonceXYZ,s=c2FsdA==,i=-1", "iteration count"),
        (b"r=clientnonceXYZ,s=c2FsdA==,i=4k", "iteration count"),
        (f"r=clientnonceXYZ,s=c2FsdA==,i={MAX_ITERATIONS + 1}".encode(), "iterations"),
        (b"r=clientnonceXYZ,i=4096,s=c2FsdA==", "expected nonce, salt"),
        (b"m=ext,r=clientnonceXYZ,s=c2FsdA==,i=4096", "extension"),
        (b"garbage", "malformed"),
        (b"", "malformed"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_server_first_is_refused(server_first: bytes, match: str) -> None:
    with pytest.raises(AuthFailed, match=match):
        started().client_final(server_first)


def test_server_first_may_carry_extensions_after_the_iterations() -> None:
    client = started()
    assert client.client_final(b"r=clientnonceXYZ,s=c2FsdA==,i=1,x=future").startswith(b"c=biws,")


@pytest.mark.parametrize(
    ("server_final", "match"),
    [
        (b"e=other-error", "rejected the SCRAM exchange: other-error"),
        (b"v=***", "not base64"),
        (b"x=1", "no server signature"),
        (b"v=" + base64.b64encode(b"\0" * 32), "does not match"),
    ],
)
def test_bad_server_final_is_refused(server_final: bytes, match: str) -> None:
    client = started()
    client.client_final(b"r=clientnonceXYZ,s=c2FsdA==,i=1")
    with pytest.raises(AuthFailed, match=match):
        client.verify_server_final(server_final)


def test_server_error_text_is_bounded_and_printable() -> None:
    client = started()
    client.client_final(b"r=clientnonceXYZ,s=c2FsdA==,i=1")
    with pytest.raises(AuthFailed) as e:
        client.verify_server_final(b"e=" + b"\x07" * 500)
    assert "\x07" not in str(e.value)
    assert len(str(e.value)) < 200


def test_mechanism_must_be_offered() -> None:
    with pytest.raises(AuthFailed, match="OAUTHBEARER"):
        ScramClient("pw", ["OAUTHBEARER"])
    with pytest.raises(AuthFailed, match="none"):
        ScramClient("pw", [])
    # PLUS alone needs the certificate to bind to.
    with pytest.raises(AuthFailed, match="SCRAM-SHA-256 is required"):
        ScramClient("pw", ["SCRAM-SHA-256-PLUS"])


def test_steps_out_of_order() -> None:
    client = ScramClient("pw", MECHS)
    with pytest.raises(RuntimeError):
        client.client_final(b"r=x,s=c2FsdA==,i=1")
    client.client_first()
    with pytest.raises(RuntimeError):
        client.client_first()
    with pytest.raises(RuntimeError):
        client.verify_server_final(b"v=")


def test_a_failed_step_cannot_be_retried() -> None:
    client = started()
    with pytest.raises(AuthFailed):
        client.client_final(b"r=wrong,s=c2FsdA==,i=1")
    with pytest.raises(RuntimeError):
        client.client_final(b"r=clientnonceXYZ,s=c2FsdA==,i=1")


def test_bad_injected_nonce() -> None:
    with pytest.raises(ValueError, match="printable"):
        ScramClient("pw", MECHS, nonce="a,b")


# ------------------------------------------------------------------------------ channel binding


def _certificate(hash_name: str | None) -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if hash_name is None:
        ed = ed25519.Ed25519PrivateKey.generate()
        cert = builder.public_key(ed.public_key()).sign(ed, None)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        algorithm: dict[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
            "sha256": hashes.SHA256(),
            "sha384": hashes.SHA384(),
            "sha512": hashes.SHA512(),
        }
        cert = builder.public_key(key.public_key()).sign(key, algorithm[hash_name])
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("hash_name", "expected_hash"),
    [("sha256", "sha256"), ("sha384", "sha384"), ("sha512", "sha512")],
)
def test_channel_binding_tls_server_end_point(hash_name: str, expected_hash: str) -> None:
    der = _certificate(hash_name)
    cbind = hashlib.new(expected_hash, der).digest()
    client = ScramClient("pw", MECHS, channel_binding=der)
    assert client.mechanism == "SCRAM-SHA-256-PLUS"
    server = TinyServer(Verifier.make(b"pw", iterations=64), channel_binding=cbind)
    first = client.client_first()
    assert first.startswith(b"p=tls-server-end-point,,n=,r=")
    exchange_from_first(client, server, first)


def exchange_from_first(client: ScramClient, server: TinyServer, first: bytes) -> None:
    client.verify_server_final(server.final(client.client_final(server.first(first))))


def test_channel_binding_is_not_used_unless_asked() -> None:
    assert ScramClient("pw", MECHS).mechanism == "SCRAM-SHA-256"


def test_channel_binding_offered_by_us_only_says_y() -> None:
    client = ScramClient("pw", ["SCRAM-SHA-256"], channel_binding=_certificate("sha256"))
    assert client.mechanism == "SCRAM-SHA-256"
    first = client.client_first()
    assert first.startswith(b"y,,n=,r=")
    exchange_from_first(client, TinyServer(Verifier.make(b"pw", iterations=64)), first)


def test_channel_binding_with_an_ed25519_certificate_is_refused() -> None:
    with pytest.raises(AuthFailed, match="signature algorithm"):
        ScramClient("pw", MECHS, channel_binding=_certificate(None))
    with pytest.raises(AuthFailed, match="DER"):
        ScramClient("pw", MECHS, channel_binding=b"not a certificate")


# ------------------------------------------------------------------------------ SASLprep


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        # RFC 4013 section 3 examples
        ("I\u00adX", b"IX"),  # soft hyphen maps to nothing
        ("user", b"user"),
        ("USER", b"USER"),  # no case folding
        ("\u00aa", b"a"),  # NFKC
        ("\u2168", b"IX"),  # NFKC
        # ASCII is used unchanged, control characters included (libpq's fast path)
        ("\u0007", b"\x07"),
        ("", b""),
        # non-ASCII space maps to SPACE
        ("a\u00a0b", b"a b"),
        ("caf\u00e9", "caf\u00e9".encode()),
        ("cafe\u0301", "caf\u00e9".encode()),  # composed by NFKC
        # prohibited output or bad bidi: the raw UTF-8 bytes, as libpq falls back
        ("\u00e9\u0007", "\u00e9\u0007".encode()),
        ("\u0627\u0031", "\u0627\u0031".encode()),
        ("\u00ad", "\u00ad".encode()),  # maps to the empty string
        ("\U000e0001x\u00e9", "\U000e0001x\u00e9".encode()),  # language tag (C.9)
        ("\u0221\u00e9", "\u0221\u00e9".encode()),  # unassigned in Unicode 3.2
        ("\u0627\u0628", "\u0627\u0628".encode()),  # pure RTL is fine
    ],
)
def test_saslprep(password: str, expected: bytes) -> None:
    assert saslprep(password) == expected


def test_saslprep_keeps_undecodable_bytes() -> None:
    raw = b"pw\xff\xfe"
    assert saslprep(raw.decode("utf-8", "surrogateescape")) == raw


_PG_PASSWORDS = [
    "plain",
    "I\u00adX",
    "\u2168 and \u00aa",
    "a\u00a0b\u3000c",
    "cafe\u0301",
    "\u00e9\u0007",
    "\u0627\u0031",
    "\u00ad",
    "\u0221\u00e9",
    "\u0627\u0628",
    "\ufb01ne",
]


def test_verifier_matches_postgresql(pg: object) -> None:
    """PostgreSQL's own pg_saslprep decides which bytes it hashes; ours must agree."""
    from pgwarden.embedded.postgres import ThrowawayPostgres

    assert isinstance(pg, ThrowawayPostgres)
    suffix = secrets.token_hex(4)
    names = [f"scram_prep_{suffix}_{i}" for i in range(len(_PG_PASSWORDS))]
    statements = ["SET client_encoding = 'UTF8';", "SET password_encryption = 'scram-sha-256';"]
    for name, password in zip(names, _PG_PASSWORDS, strict=True):
        literal = password.replace("'", "''")
        statements.append(f"CREATE ROLE {name} PASSWORD '{literal}';")
    quoted = ", ".join(f"'{n}'" for n in names)
    statements.append(
        f"SELECT rolname || ' ' || rolpassword FROM pg_authid WHERE rolname IN ({quoted});"
    )
    try:
        out = pg.sql("\n".join(statements))
    finally:
        pg.sql(";".join(f"DROP ROLE IF EXISTS {n}" for n in names))
    stored = dict(line.split(" ", 1) for line in out.splitlines() if line)
    for name, password in zip(names, _PG_PASSWORDS, strict=True):
        # SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>
        _, rest = stored[name].split("$", 1)
        iter_salt, keys = rest.split("$")
        iterations, salt = iter_salt.split(":")
        stored_key, server_key = keys.split(":")
        ours = Verifier.make(saslprep(password), base64.b64decode(salt), int(iterations))
        assert b64(ours.stored_key) == stored_key, ascii(password)
        assert b64(ours.server_key) == server_key, ascii(password)


# ------------------------------------------------------------------------------ MD5


def test_md5_response_known_value() -> None:
    # md5(md5("secret" + "alice").hex + salt), computed independently
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"secretalice").hexdigest().encode()
    assert (
        md5_response("alice", "secret", salt)
        == b"md5" + hashlib.md5(inner + salt).hexdigest().encode()
    )
    assert md5_response("postgres", "postgres", b"\x00\x00\x00\x00") == (
        b"md5" + hashlib.md5(b"3175bce1d3201d16594cebf9d7eb3f9d" + b"\0" * 4).hexdigest().encode()
    )


def test_md5_response_shape_and_salt_check() -> None:
    response = md5_response("u", "p\u00e9", b"abcd")
    assert response.startswith(b"md5")
    assert len(response) == 35
    with pytest.raises(AuthFailed, match="salt"):
        md5_response("u", "p", b"abc")
