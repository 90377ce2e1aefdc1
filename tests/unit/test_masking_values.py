"""Value masking primitives: every strategy on every kind, every detector on free text."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.api.policy import Detector, MaskStrategy
from pgwarden_proxy.masking import detectors, strategies
from pgwarden_proxy.masking.detectors import NULL, DetectorSet, Finding, Nullify
from pgwarden_proxy.masking.strategies import HASH_PREFIX, REDACTED, Masker, partial

KEY = b"unit-test-key-0123456789abcdef"
OTHER_KEY = b"another-key-0123456789abcdef"
KINDS: list[str | None] = [None, *(d.value for d in Detector), "unknown-kind"]

EMAIL = Detector.EMAIL
CARD = Detector.CREDIT_CARD
SSN = Detector.US_SSN
PHONE = Detector.PHONE
IBAN = Detector.IBAN
IP = Detector.IP_ADDRESS
SECRET = Detector.SECRET

# Token-shaped test values are assembled from pieces so that no secret scanner mistakes this
# file for a leak.
AWS_KEY = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_TEMP_KEY = "ASIA" + "Z2X3C4V5B6N7M8Q9"
GITHUB_TOKEN = "ghp" + "_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
GITHUB_PAT = "github" + "_pat_" + "11ABCDEFG0123456789_" + "abcdefghijKLMNOPQRSTuvwxyz0123"
SLACK_TOKEN = "xox" + "b-" + "123456789012-1234567890123-" + "AbCdEfGhIjKlMnOpQrStUvWx"
STRIPE_KEY = "sk" + "_live_" + "4eC39HqLyjWDarjtT1zdp7dc"
STRIPE_RESTRICTED = "rk" + "_test_" + "51H8abcdefghijklmnopqrstu"
GOOGLE_KEY = "AI" + "za" + "SyD-abcdefghijklmnopqrstuvwxyz01234"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM = (
    "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEowIBAAKCAQEA1234567890abcdef\n"
    "b2xkIGtleSBkYXRh\n-----END RSA " + "PRIVATE KEY-----"
)
PEM_PKCS8 = "-----BEGIN " + "PRIVATE KEY-----\nMIIEvQIBADANBg\n-----END " + "PRIVATE KEY-----"
PEM_CUT = "-----BEGIN EC " + "PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk"  # no END line


def luhn_ok(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()][::-1]
    total = sum(
        d if i % 2 == 0 else (d * 2 - 9 if d * 2 > 9 else d * 2) for i, d in enumerate(digits)
    )
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    return next(prefix + str(d) for d in range(10) if luhn_ok(prefix + str(d)))


def iban_ok(iban: str) -> bool:
    compact = iban.replace(" ", "")
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


CARD_19 = luhn_complete("601100000000000000")
assert len(CARD_19) == 19


def masker(strategy: MaskStrategy = MaskStrategy.REDACT) -> Masker:
    return Masker(strategy, KEY)


def only(detector: Detector, strategy: MaskStrategy = MaskStrategy.REDACT) -> DetectorSet:
    return DetectorSet([(detector, masker(strategy))])


ALL = DetectorSet((d, masker()) for d in Detector)
ALL_PARTIAL = DetectorSet((d, masker(MaskStrategy.PARTIAL)) for d in Detector)


def found(ds: DetectorSet, text: str) -> list[str]:
    return [text[f.start : f.end] for f in ds.find(text)]


# --- test data sanity --------------------------------------------------------------------


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111111",
        "5555555555554444",
        "378282246310005",
        "6011111111111117",
        "3530111333300000",
        "30569309025904",
        "4222222222222",
        "6200000000000005",
        CARD_19,
    ],
)
def test_card_fixtures_pass_luhn(number: str) -> None:
    assert luhn_ok(number)


@pytest.mark.parametrize(
    "iban",
    [
        "GB82 WEST 1234 5698 7654 32",
        "DE89370400440532013000",
        "FR1420041010050500013M02606",
        "NL91ABNA0417164300",
        "BE68539007547034",
        "CH9300762011623852957",
    ],
)
def test_iban_fixtures_pass_mod97(iban: str) -> None:
    assert iban_ok(iban)


# --- detectors: positives ----------------------------------------------------------------

POSITIVES: list[tuple[Detector, str, list[str]]] = [
    # email
    (EMAIL, "contact alice@example.org for details", ["alice@example.org"]),
    (EMAIL, "Mail: John.Smith+tag@mail.example.co.uk.", ["John.Smith+tag@mail.example.co.uk"]),
    (EMAIL, "<bob_99@sub-domain.example.com>", ["bob_99@sub-domain.example.com"]),
    (EMAIL, "a@b.io,c@d.io", ["a@b.io", "c@d.io"]),
    (EMAIL, "mailto:carol@example.net", ["carol@example.net"]),
    (EMAIL, '{"email": "dave@example.com", "id": 7}', ["dave@example.com"]),
    (EMAIL, "...eve@example.org", ["eve@example.org"]),
    (EMAIL, "git clone git@github.com:org/repo.git", ["git@github.com"]),
    (EMAIL, "x" * 80 + "@example.org", ["x" * 80 + "@example.org"]),
    # credit cards
    (CARD, "card 4111 1111 1111 1111 exp 12/25", ["4111 1111 1111 1111"]),
    (CARD, "card: 4111-1111-1111-1111.", ["4111-1111-1111-1111"]),
    (CARD, "paid with 5555555555554444.", ["5555555555554444"]),
    (CARD, "amex 3782 822463 10005 ok", ["3782 822463 10005"]),
    (CARD, "diners 3056 930902 5904", ["3056 930902 5904"]),
    (CARD, "discover 6011111111111117", ["6011111111111117"]),
    (CARD, "jcb 3530111333300000", ["3530111333300000"]),
    (CARD, "visa13 4222222222222", ["4222222222222"]),
    (CARD, f"long {CARD_19}", [CARD_19]),
    (CARD, "cards: 4111111111111111,5555555555554444", ["4111111111111111", "5555555555554444"]),
    (CARD, "4111 1111 1111 1111 123", ["4111 1111 1111 1111"]),
    (CARD, "4111 1111 1111 1111 12/25 123", ["4111 1111 1111 1111"]),
    (CARD, "CC-4111111111111111", ["4111111111111111"]),
    (CARD, '{"pan": "5555 5555 5555 4444"}', ["5555 5555 5555 4444"]),
    # US SSN
    (SSN, "SSN 123-45-6789 on file", ["123-45-6789"]),
    (SSN, "ssn:078-05-1120.", ["078-05-1120"]),
    (SSN, "(899-99-9999)", ["899-99-9999"]),
    # phone
    (PHONE, "call +1 (555) 123-4567 today", ["+1 (555) 123-4567"]),
    (PHONE, "tel +44 20 7946 0958", ["+44 20 7946 0958"]),
    (PHONE, "tel +44 (0)20 7946 0958", ["+44 (0)20 7946 0958"]),
    (PHONE, "Berlin: +49 30 12345678", ["+49 30 12345678"]),
    (PHONE, "+33 1 23 45 67 89", ["+33 1 23 45 67 89"]),
    (PHONE, "mobile:+4915112345678", ["+4915112345678"]),
    (PHONE, "office (555) 123-4567", ["(555) 123-4567"]),
    (PHONE, "office 555-123-4567.", ["555-123-4567"]),
    (PHONE, "office 555.123.4567", ["555.123.4567"]),
    (PHONE, "office 555 123 4567", ["555 123 4567"]),
    (PHONE, "toll free 1-800-555-0199", ["1-800-555-0199"]),
    (PHONE, "toll free 1 (800) 555-0199", ["1 (800) 555-0199"]),
    (PHONE, "a: 212-555-0100, b: 415.555.0199", ["212-555-0100", "415.555.0199"]),
    # IBAN
    (IBAN, "iban GB82 WEST 1234 5698 7654 32 please", ["GB82 WEST 1234 5698 7654 32"]),
    (IBAN, "IBAN: DE89370400440532013000.", ["DE89370400440532013000"]),
    (IBAN, "DE89 3704 0044 0532 0130 00", ["DE89 3704 0044 0532 0130 00"]),
    (IBAN, "to FR1420041010050500013M02606", ["FR1420041010050500013M02606"]),
    (IBAN, "NL91ABNA0417164300", ["NL91ABNA0417164300"]),
    (IBAN, "BE68 5390 0754 7034 CODE", ["BE68 5390 0754 7034"]),
    (IBAN, "(CH9300762011623852957)", ["CH9300762011623852957"]),
    # IP addresses
    (IP, "connect from 10.0.0.1:5432", ["10.0.0.1"]),
    (IP, "dns=8.8.8.8.", ["8.8.8.8"]),
    (IP, "hosts 192.168.1.20, 172.16.0.254", ["192.168.1.20", "172.16.0.254"]),
    (IP, "gw 255.255.255.255", ["255.255.255.255"]),
    (IP, "v6 2001:db8::1 up", ["2001:db8::1"]),
    (IP, "fe80::1ff:fe23:4567:890a%eth0", ["fe80::1ff:fe23:4567:890a"]),
    (
        IP,
        "addr 2001:0db8:85a3:0000:0000:8a2e:0370:7334",
        ["2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
    ),
    (IP, "mapped ::ffff:192.0.2.1", ["::ffff:192.0.2.1"]),
    (IP, "[2001:db8::2]:5432", ["2001:db8::2"]),
    # secrets
    (SECRET, f"aws {AWS_KEY} key", [AWS_KEY]),
    (SECRET, f"AWS_ACCESS_KEY_ID={AWS_TEMP_KEY}", [AWS_TEMP_KEY]),
    (SECRET, f"token {GITHUB_TOKEN}", [GITHUB_TOKEN]),
    (SECRET, f"pat={GITHUB_PAT}", [GITHUB_PAT]),
    (SECRET, f"slack {SLACK_TOKEN} end", [SLACK_TOKEN]),
    (SECRET, f"stripe {STRIPE_KEY}", [STRIPE_KEY]),
    (SECRET, f"restricted {STRIPE_RESTRICTED}", [STRIPE_RESTRICTED]),
    (SECRET, f"maps {GOOGLE_KEY}", [GOOGLE_KEY]),
    (SECRET, f"Cookie: session={JWT}; path=/", [JWT]),
    (SECRET, f"key:\n{PEM}\ntrailer", [PEM]),
    (SECRET, PEM_PKCS8, [PEM_PKCS8]),
    (SECRET, f"cut {PEM_CUT}", [PEM_CUT]),
    (SECRET, "password=hunter22", ["hunter22"]),
    (SECRET, "DB_PASSWORD=correcthorse other=1", ["correcthorse"]),
    (SECRET, '{"password": "s3cr3t value", "user": "x"}', ["s3cr3t value"]),
    (SECRET, "api_key: abcd1234efgh", ["abcd1234efgh"]),
    (SECRET, "UPDATE users SET password = 'hunter2!x' WHERE id = 1", ["hunter2!x"]),
    (SECRET, "client_secret='Zm9vYmFyYmF6'", ["Zm9vYmFyYmF6"]),
    (SECRET, "postgres://app:s3cretpw@db.internal:5432/app", ["s3cretpw"]),
    (
        SECRET,
        "Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123",
        ["abcdefghijklmnopqrstuvwxyz0123"],
    ),
]


@pytest.mark.parametrize(("detector", "text", "expected"), POSITIVES)
def test_detector_finds(detector: Detector, text: str, expected: list[str]) -> None:
    assert found(only(detector), text) == expected
    # The same findings with every detector enabled, and scan replaces each of them.
    assert found(ALL, text) == expected
    out = only(detector).scan(text)
    assert isinstance(out, str)
    for piece in expected:
        assert piece not in out
    assert out.count(REDACTED) == len(expected)


# --- detectors: negatives ----------------------------------------------------------------

NEGATIVES = [
    "",
    "Hello, world! Nothing to see here.",
    "José García \u2013 café ☕ Zürich Straße 5, 8001 Zürich",
    "2024-01-15",
    "2024-01-15T10:30:00Z",
    "2024-01-15T10:30:00+01:00",
    "12:30",
    "12:30:45.123",
    "10:30:00 UTC, 23:59:59",
    "version 1.2.3",
    "release 10.2.3-rc1",
    "v1.2.3.4",
    "1.2.3.4.5",
    "256.1.1.1",
    "01.02.03.04",
    "550e8400-e29b-41d4-a716-446655440000",
    "Order #100234 shipped",
    "ORD-2024-000123",
    "INV-0001234567890",
    "4111111111111112",
    "1234567890123456",
    "tracking 9400111899223100012345",
    "5551234567",
    "12345678",
    "3.14159 and 1,234,567.89",
    "ISBN 978-3-16-148410-0",
    "SELECT * FROM users WHERE id = 42 AND created_at > '2024-01-15 10:30:00'",
    '{"id": 123, "ts": "2024-01-15T10:30:00Z", "tags": ["a", "b"], "ok": true}',
    "d41d8cd98f00b204e9800998ecf8427e",
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
    "SGVsbG8gV29ybGQ=",
    "eyJhbGciOiJIUzI1NiJ9",
    "eyJhbGciOiJIUzI1NiJ9.bm90IGEgand0",
    "user@localhost",
    "ping @alice",
    "pkg@1.2.3",
    "npm i @types/node",
    "std::vector<int> v; x[1::2]",
    "::1",
    "a::b",
    "00:1a:2b:3c:4d:5e",
    "password: null",
    "reset your password",
    "password_changed_at: 2024-01-15",
    "password=$1",
    "password = %s",
    "secretName: my-secret",
    "the secret: short",
    "api_key: ********",
    "password=<redacted>",
    'password: "[REDACTED]"',
    'SECRET = "secret"',
    "password = self._password",
    'make_proxy(upstream={"password": db.users[user]})',
    "password = secrets.token_urlsafe(16)",
    '{"user": user, "password": password, "key": db_password}',
    "conn.backend_secret = r.int32()",
    "postgres://user:password@db.example.com/app",
    "postgres://app:${DB_PASSWORD}@db.example.com/app",
    "000-12-3456",
    "666-12-3456",
    "900-12-3456",
    "123-00-4567",
    "123-45-0000",
    "12-123-45-6789",
    "555-1234",
    "temperature +12.5",
    "+0100",
    "1 + 12345678",
    "GB82 WEST 1234 5698 7654 33",
    "DE89370400440532013001",
    "XX82WEST12345698765432",
    "xoxo-gossip-girl",
    "sk_live_abc",
    "task_test_runner_for_everything",
    "high_performance_computing_cluster_nodes_are_fast",
    "PAKIAIOSFODNN7EXAMPLE",
    "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.",
]


@pytest.mark.parametrize("text", NEGATIVES)
def test_harmless_text_is_left_alone(text: str) -> None:
    assert ALL.find(text) == []
    assert ALL.scan(text) is None
    assert ALL_PARTIAL.scan(text) is None


@pytest.mark.parametrize(
    ("detector", "text"),
    [
        (PHONE, "SSN 123-45-6789"),
        (PHONE, "2024-01-15 and 2024-12-31"),
        (PHONE, "1.2.3 and 10.20.30"),
        (PHONE, "4111 1111 1111 1111"),
        (PHONE, "192.168.1.20"),
        (SSN, "555-123-4567"),
        (SSN, "2024-01-15"),
        (CARD, "555-123-4567"),
        (CARD, "+44 20 7946 0958"),
        (IP, "4111.1111.1111.1111"),
        (IBAN, "gb82 west 1234 5698 7654 32"),
        (EMAIL, "postgres://app:s3cretpw@db.internal:5432/app"),
    ],
)
def test_detector_ignores_other_shapes(detector: Detector, text: str) -> None:
    assert only(detector).find(text) == []


# --- partial shapes ----------------------------------------------------------------------

PARTIAL_SHAPES: list[tuple[str | None, str, str]] = [
    ("email", "alice@example.org", "a***@example.org"),
    ("email", "John.Smith+tag@mail.example.co.uk", "J***@mail.example.co.uk"),
    ("credit-card", "4111-1111-1111-1234", "****-****-****-1234"),
    ("credit-card", "4111 1111 1111 1111", "**** **** **** 1111"),
    ("credit-card", "4111111111111111", "************1111"),
    ("credit-card", "3782 822463 10005", "**** ****** *0005"),
    ("us-ssn", "123-45-6789", "***-**-6789"),
    ("phone", "+1 (555) 123-4567", "+* (***) ***-**67"),
    ("phone", "555.123.4567", "***.***.**67"),
    ("phone", "+44 20 7946 0958", "+** ** **** **58"),
    ("iban", "GB82 WEST 1234 5698 7654 32", "GB** **** **** **** **54 32"),
    ("iban", "DE89370400440532013000", "DE****************3000"),
    ("ip-address", "10.1.2.3", "10.*.*.*"),
    ("ip-address", "192.168.1.20", "192.*.*.*"),
    ("ip-address", "2001:db8::1", "2001:*:*:*:*:*:*:*"),
    ("ip-address", "fe80::1ff:fe23:4567:890a", "fe80:*:*:*:*:*:*:*"),
    ("secret", STRIPE_KEY, "sk_l***"),
    ("secret", "abcdefghijkl", "abcd***"),
    ("secret", "abcdefghijk", "***"),
    ("secret", "hunter22", "***"),
    (None, "John Smith", "J***"),
    # A whole column value keeps the first shape it fits.
    (None, "123-45-6789", "***-**-6789"),
    (None, "4111 1111 1111 1111", "**** **** **** 1111"),
    (None, "DE89370400440532013000", "DE****************3000"),
    (None, "10.1.2.3", "10.*.*.*"),
    (None, "+1 555 123 4567", "+* *** *** **67"),
    (None, "Jonathan Alexander Smith-Wellington", "J***"),
    (None, "alice@example.org", "a***@example.org"),
    (None, "Ünïcode text", "Ü***"),
    (None, "abcd", "a***"),
    (None, "abc", "***"),
    (None, "a", "***"),
    (None, "", ""),
    # A value that does not fit its kind's shape gets the generic shape.
    ("email", "not an email", "n***"),
    ("email", "alice@", "a***"),
    ("credit-card", "hello world", "h***"),
    ("credit-card", "1234", "1***"),
    ("us-ssn", "123456789", "*******89"),  # the generic shape of a digit string: a phone
    ("phone", "12", "***"),
    ("iban", "GB82", "G***"),
    ("ip-address", "999.1.1.1", "9***"),
    ("unknown-kind", "John Smith", "J***"),
]


@pytest.mark.parametrize(("kind", "value", "expected"), PARTIAL_SHAPES)
def test_partial_shapes(kind: str | None, value: str, expected: str) -> None:
    assert partial(value, kind) == expected
    assert masker(MaskStrategy.PARTIAL).mask(value, kind) == expected


def test_partial_hides_length() -> None:
    shapes = {partial("x" * n) for n in range(4, 200)}
    assert shapes == {"x***"}
    assert {partial("x" * n) for n in range(1, 4)} == {"***"}


def test_partial_accepts_detector_members_as_kind() -> None:
    assert partial("alice@example.org", Detector.EMAIL) == "a***@example.org"


# --- redact, null, hash ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", ["alice@example.org", "4111111111111111", "", "x", "☕" * 50])
def test_redact_and_null(kind: str | None, value: str) -> None:
    assert masker(MaskStrategy.REDACT).mask(value, kind) == REDACTED == "[redacted]"
    assert masker(MaskStrategy.NULL).mask(value, kind) is None


HASH_FORMAT = re.compile(r"hmac:[0-9a-f]{24}")


def test_hash_format_and_value() -> None:
    out = masker(MaskStrategy.HASH).mask("alice@example.org")
    assert out is not None
    assert HASH_FORMAT.fullmatch(out)
    expected = hmac.new(KEY, b"alice@example.org", hashlib.sha256).hexdigest()[:24]
    assert out == HASH_PREFIX + expected


def test_hash_is_stable_and_ignores_kind() -> None:
    a = masker(MaskStrategy.HASH)
    b = Masker(MaskStrategy.HASH, KEY)
    outs = {a.mask("alice@example.org", k) for k in KINDS} | {b.mask("alice@example.org")}
    assert len(outs) == 1


def test_hash_depends_on_key_and_value() -> None:
    h = masker(MaskStrategy.HASH)
    other = Masker(MaskStrategy.HASH, OTHER_KEY)
    assert h.mask("alice@example.org") != other.mask("alice@example.org")
    assert h.mask("alice@example.org") != h.mask("alice@example.com")
    assert h.mask("") != h.mask(" ")
    outs = {h.mask(str(i)) for i in range(2000)}
    assert len(outs) == 2000


def test_hash_of_lone_surrogates_and_huge_values() -> None:
    h = masker(MaskStrategy.HASH)
    a, b = h.mask("\ud800"), h.mask("\udfff")
    assert a is not None
    assert b is not None
    assert a != b
    assert HASH_FORMAT.fullmatch(h.mask("x" * 5_000_000) or "")
    # A surrogate pair spelled as two code points is not the character it would encode.
    assert h.mask("\ud83d\ude00") != h.mask("😀")


def test_hash_needs_a_key() -> None:
    with pytest.raises(ValueError, match="key"):
        Masker(MaskStrategy.HASH, b"")
    assert Masker(MaskStrategy.REDACT, b"").mask("x") == REDACTED


def test_masker_accepts_strategy_strings_and_reprs() -> None:
    m = Masker(MaskStrategy("partial"), KEY)
    assert m.strategy is MaskStrategy.PARTIAL
    assert repr(m) == "Masker(partial)"


# --- properties of every strategy ----------------------------------------------------------

ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=200) | st.text(
    max_size=60
)


@settings(max_examples=300, deadline=None)
@given(value=ANY_TEXT, kind=st.sampled_from(KINDS))
def test_masking_never_raises_nor_returns_the_value(value: str, kind: str | None) -> None:
    redacted = masker(MaskStrategy.REDACT).mask(value, kind)
    assert redacted == REDACTED
    assert masker(MaskStrategy.NULL).mask(value, kind) is None
    hashed = masker(MaskStrategy.HASH).mask(value, kind)
    assert hashed is not None
    assert HASH_FORMAT.fullmatch(hashed)
    assert hashed != value
    shaped = masker(MaskStrategy.PARTIAL).mask(value, kind)
    assert isinstance(shaped, str)
    if not value:
        assert shaped == ""
    else:
        # Only a value that already has a masked shape (`J***`, `a***@x.org`) can stay as is.
        assert shaped != value or "***" in value


@settings(max_examples=200, deadline=None)
@given(value=st.text(min_size=1, max_size=40), kind=st.sampled_from(KINDS))
def test_masking_is_deterministic(value: str, kind: str | None) -> None:
    for strategy in MaskStrategy:
        assert Masker(strategy, KEY).mask(value, kind) == Masker(strategy, KEY).mask(value, kind)


# --- scan --------------------------------------------------------------------------------


def test_scan_with_partial_shapes_in_free_text() -> None:
    text = "alice@example.org paid 4111 1111 1111 1111 from 10.0.0.1 (SSN 123-45-6789)"
    assert ALL_PARTIAL.scan(text) == (
        "a***@example.org paid **** **** **** 1111 from 10.*.*.* (SSN ***-**-6789)"
    )


def test_scan_with_hash_is_stable_inside_text() -> None:
    ds = DetectorSet([(EMAIL, masker(MaskStrategy.HASH))])
    first = ds.scan("from alice@example.org")
    second = ds.scan("to alice@example.org!")
    assert isinstance(first, str)
    assert isinstance(second, str)
    token = first.removeprefix("from ")
    assert HASH_FORMAT.fullmatch(token)
    assert second == f"to {token}!"
    assert token == masker(MaskStrategy.HASH).mask("alice@example.org")


def test_scan_null_makes_the_whole_value_null() -> None:
    ds = DetectorSet([(EMAIL, masker(MaskStrategy.NULL)), (CARD, masker())])
    assert ds.scan("contact alice@example.org") is NULL
    assert ds.scan("card 4111111111111111") == f"card {REDACTED}"
    assert ds.scan("nothing here") is None
    result = ds.scan("alice@example.org")
    assert isinstance(result, Nullify)
    assert result is Nullify.NULL


def test_scan_null_wins_even_when_overlapped() -> None:
    # The secret (longer) covers the email; the email's `null` still applies.
    ds = DetectorSet([(EMAIL, masker(MaskStrategy.NULL)), (SECRET, masker())])
    assert ds.find("password=alice@example.org#x") == [Finding(9, 28, SECRET)]
    assert ds.scan("password=alice@example.org#x") is NULL


def test_overlaps_earliest_then_longest_then_strictest() -> None:
    # Both phone patterns find `+1 555-123-4567`, in different lengths: one finding.
    assert found(ALL, "call +1 555-123-4567") == ["+1 555-123-4567"]
    # Same span for an email and a secret: the stricter strategy wins.
    ds = DetectorSet([(EMAIL, masker(MaskStrategy.PARTIAL)), (SECRET, masker())])
    assert ds.find("password=alice@example.org") == [Finding(9, 26, SECRET)]
    assert ds.scan("password=alice@example.org") == f"password={REDACTED}"
    ds = DetectorSet([(EMAIL, masker()), (SECRET, masker(MaskStrategy.PARTIAL))])
    assert ds.find("password=alice@example.org") == [Finding(9, 26, EMAIL)]


def test_partly_overlapping_findings_merge() -> None:
    # Glued emails: the second starts inside the first and ends after it.
    text = "alice@example.orgbob@example.org"
    assert ALL.find(text) == [Finding(0, len(text), EMAIL)]
    assert ALL.scan(text) == REDACTED
    assert ALL_PARTIAL.scan(text) == "a***@example.org"


def test_findings_are_sorted_and_disjoint() -> None:
    text = f"{AWS_KEY} alice@example.org 10.0.0.1 +44 20 7946 0958 DE89370400440532013000"
    findings = ALL.find(text)
    assert [f.detector for f in findings] == [SECRET, EMAIL, IP, PHONE, IBAN]
    assert all(a.end <= b.start for a, b in itertools.pairwise(findings))
    assert ALL.scan(text) == " ".join([REDACTED] * 5)


def test_detector_named_twice_keeps_the_strictest_strategy() -> None:
    ds = DetectorSet(
        [
            (EMAIL, masker(MaskStrategy.PARTIAL)),
            (EMAIL, masker(MaskStrategy.REDACT)),
            (EMAIL, masker(MaskStrategy.HASH)),
        ]
    )
    assert ds.scan("alice@example.org") == REDACTED
    assert ds.detectors == frozenset({EMAIL})
    assert "email=redact" in repr(ds)


def test_empty_detector_set() -> None:
    ds = DetectorSet([])
    assert not ds
    assert ds.scan("alice@example.org 4111111111111111") is None
    assert ALL
    assert ALL.detectors == frozenset(Detector)


def test_only_enabled_detectors_run() -> None:
    text = "alice@example.org 4111111111111111 10.0.0.1"
    assert found(only(IP), text) == ["10.0.0.1"]
    assert found(only(CARD), text) == ["4111111111111111"]
    assert found(only(EMAIL), text) == ["alice@example.org"]


def test_long_text_with_findings_far_apart() -> None:
    filler = "lorem ipsum dolor sit amet " * 20_000
    text = filler + "alice@example.org " + filler + "4111 1111 1111 1111 " + filler
    out = ALL.scan(text)
    assert isinstance(out, str)
    assert out == filler + REDACTED + " " + filler + REDACTED + " " + filler


ADVERSARIAL = [
    "1 " * 50_000,
    "1-" * 50_000,
    "1." * 50_000,
    "1:" * 50_000,
    "a_" * 50_000 + "=x",
    "a@" * 50_000,
    "x@" + "a." * 50_000,
    "a" * 100_000 + "@",
    "eyJ" * 30_000,
    "github_pat_" * 9_000,
    "xoxb-" * 20_000,
    "-----BEGIN RSA " + "PRIVATE KEY-----" * 3_000,
    "+1 " * 30_000,
    "GB82 " * 20_000,
    "ab:" * 30_000,
    "password=" * 10_000,
    "://a:" * 20_000,
    "4111 " * 20_000,
    'password="' + "a" * 100_000,
    "bearer " * 10_000,
    "(555) " * 20_000,
    "my_secret_" * 10_000 + "=",
    "9" * 100_000,
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("text", ADVERSARIAL, ids=lambda t: repr(t[:12]))
def test_pathological_input_stays_linear(text: str) -> None:
    result = ALL.scan(text)
    assert result is None or isinstance(result, str | Nullify)


# --- properties of scan ------------------------------------------------------------------

# Without digits, `@`, `:`, `=`, `_`, `-` and upper case no detector can fire.
SAFE_ALPHABET = (
    string.ascii_lowercase + " .,;!?'()\n\téàüßçøñ中文\u043a\u0430\u0436\u0434\u044b\u0439"
)
FRAGMENTS = [
    "alice@example.org",
    "4111 1111 1111 1111",
    "4111111111111112",
    "123-45-6789",
    "+44 20 7946 0958",
    "(555) 123-4567",
    "GB82 WEST 1234 5698 7654 32",
    "10.0.0.1",
    "2001:db8::1",
    "1.2.3.4.5",
    "2024-01-15T10:30:00Z",
    AWS_KEY,
    JWT,
    "password=hunter22",
    "postgres://u:pw123456@h.example.com/db",
    "Bearer " + "a" * 24,
    PEM,
    "@",
    ":",
    "-",
    ".",
    " ",
    "=",
    "_",
    "1",
]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=SAFE_ALPHABET, max_size=300))
def test_scan_of_text_without_findings_is_none(text: str) -> None:
    assert ALL.scan(text) is None
    assert ALL_PARTIAL.scan(text) is None


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=12), max_size=12).map("".join),
    st.sampled_from(list(MaskStrategy)),
)
def test_scan_never_raises_and_always_changes_what_it_finds(
    text: str, strategy: MaskStrategy
) -> None:
    ds = DetectorSet((d, masker(strategy)) for d in Detector)
    result = ds.scan(text)
    findings = ds.find(text)
    if not findings:
        assert result is None
    elif strategy is MaskStrategy.NULL:
        assert result is NULL
    else:
        assert isinstance(result, str)
        assert result != text
        if strategy is not MaskStrategy.PARTIAL:
            for f in findings:
                piece = text[f.start : f.end]
                assert result.count(piece) < text.count(piece)


@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_scan_of_arbitrary_text_never_raises(text: str) -> None:
    for ds in (ALL, ALL_PARTIAL):
        result = ds.scan(text)
        assert result is None or (isinstance(result, str) and result != text)


# --- documentation -----------------------------------------------------------------------


def test_module_docs_name_every_detector_and_strategy() -> None:
    assert detectors.__doc__ is not None
    assert strategies.__doc__ is not None
    for d in Detector:
        assert f"`{d.value}`" in detectors.__doc__
        assert f"`{d.value}`" in strategies.__doc__
    for s in MaskStrategy:
        assert f"`{s.value}`" in strategies.__doc__
