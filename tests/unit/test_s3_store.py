"""S3Store against a real S3 API over HTTP (moto in server mode, see tests/s3server.py)."""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import traceback
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from botocore.exceptions import ClientError

from pgwarden.api.config import ObjectLock, S3Sink, ServerSideEncryption
from pgwarden.recording.s3 import S3Store
from pgwarden.recording.store import NotFound, StoreError, open_store
from tests.s3server import MotoServer

ACCESS_KEY = "AKIAPGWARDENTEST0042"
SECRET_KEY = "pgwarden/secret+do-not-leak-0042"


@pytest.fixture
def env(s3: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> MotoServer:
    """The moto server's AWS environment, and nothing from the developer's."""
    s3.isolate(monkeypatch, tmp_path)
    return s3


@pytest.fixture
def bucket(env: MotoServer) -> str:
    return env.make_bucket(f"rec-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(env: MotoServer, bucket: str) -> S3Store:
    return S3Store(bucket, "pgwarden", endpoint_url=env.endpoint_url)


@pytest.fixture
def s3_down(env: MotoServer) -> Iterator[MotoServer]:
    env.down()
    try:
        yield env
    finally:
        env.up()


def test_prefix_normalised_and_url(env: MotoServer) -> None:
    assert S3Store("audit").url == "s3://audit/"
    assert S3Store("audit", "").prefix == ""
    assert S3Store("audit", "pgwarden").prefix == "pgwarden/"
    assert S3Store("audit", "pgwarden/").url == "s3://audit/pgwarden/"
    assert S3Store("audit", "a/b").url == "s3://audit/a/b/"
    with pytest.raises(ValueError, match="bucket"):
        S3Store("")


def test_put_get_round_trip(store: S3Store, env: MotoServer, bucket: str) -> None:
    data = b'{"v":1}\n' + bytes(range(256))
    store.put("sessions/c/2026-11-27/s1/events/0000000001-0000000002.jsonl", data)
    assert store.get("sessions/c/2026-11-27/s1/events/0000000001-0000000002.jsonl") == data
    # below the prefix in the bucket
    obj = env.client().get_object(
        Bucket=bucket, Key="pgwarden/sessions/c/2026-11-27/s1/events/0000000001-0000000002.jsonl"
    )
    assert obj["Body"].read() == data
    store.put("index/sessions/s1.json", b"first")
    store.put("index/sessions/s1.json", b"second")
    assert store.get("index/sessions/s1.json") == b"second"
    store.put("empty", b"")
    assert store.get("empty") == b""


def test_put_sends_content_md5_not_a_default_crc(store: S3Store) -> None:
    sent: list[dict[str, str]] = []

    def capture(request: Any, **_: Any) -> None:
        sent.append(
            {k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        )

    store._client.meta.events.register("before-send.s3.PutObject", capture)
    store.put("k", b"payload")
    (headers,) = sent
    expected = base64.b64encode(hashlib.md5(b"payload").digest()).decode()
    assert headers["Content-MD5"] == expected
    assert not any(h.lower().startswith("x-amz-checksum-") for h in headers)


def test_missing_key_is_not_found(store: S3Store) -> None:
    with pytest.raises(NotFound) as info:
        store.get("index/sessions/nope.json")
    assert isinstance(info.value, StoreError)
    assert "nope.json" in str(info.value)


def test_bad_keys_are_refused(store: S3Store) -> None:
    for key in ("", "/abs", "a//b", "a/../b", "./a"):
        with pytest.raises(ValueError, match="not a store key"):
            store.put(key, b"x")
        with pytest.raises(ValueError, match="not a store key"):
            store.get(key)


def test_list_paginates_sorted_and_relative(store: S3Store, env: MotoServer, bucket: str) -> None:
    client = env.client()
    many = [f"sessions/c/2026-11-27/s{i:05d}/manifest.json" for i in range(1030)]
    with ThreadPoolExecutor(16) as pool:
        # seeded directly (fast); in reverse so the store's order cannot be the insertion order
        list(
            pool.map(
                lambda k: client.put_object(Bucket=bucket, Key="pgwarden/" + k, Body=b"{}"),
                reversed(many),
            )
        )
    odd = ["sessions/c/2026-11-28/~", "sessions/c/2026-11-28/é", "sessions/c/2026-11-28/B"]
    for key in odd:
        store.put(key, b"x")
    # outside the store prefix, and outside the listed prefix
    client.put_object(Bucket=bucket, Key="sessions/c/2026-11-27/outside", Body=b"x")
    client.put_object(Bucket=bucket, Key="pgwarden-other/sessions/c", Body=b"x")
    store.put("index/sessions/s1.json", b"x")

    listed = list(store.list("sessions/c/2026-11-27/"))
    assert len(listed) == 1030
    assert listed == sorted(many)

    everything = list(store.list(""))
    assert everything == sorted([*many, *odd, "index/sessions/s1.json"])
    assert everything == sorted(everything, key=lambda k: k.encode())
    assert list(store.list("sessions/c/2026-11-28/")) == sorted(odd, key=lambda k: k.encode())
    assert list(store.list("sessions/c/2026-11-27/s0102")) == many[1020:1030]
    assert list(store.list("nothing/")) == []


def test_open_store_takes_the_endpoint_from_the_environment(env: MotoServer, bucket: str) -> None:
    store = open_store(f"s3://{bucket}/some/prefix")
    assert isinstance(store, S3Store)
    assert store.url == f"s3://{bucket}/some/prefix/"
    assert store.endpoint_url == env.endpoint_url
    store.put("a/b.json", b"{}")
    assert env.client().get_object(Bucket=bucket, Key="some/prefix/a/b.json")["Body"].read()
    assert list(store.list("a/")) == ["a/b.json"]


def test_open_store_without_prefix(env: MotoServer, bucket: str) -> None:
    store = open_store(f"s3://{bucket}")
    store.put("top.json", b"1")
    assert env.client().get_object(Bucket=bucket, Key="top.json")["Body"].read() == b"1"


def test_from_sink(env: MotoServer, bucket: str) -> None:
    sink = S3Sink.model_validate(
        {
            "bucket": bucket,
            "prefix": "rec",
            "region": "eu-central-1",
            "endpointUrl": env.endpoint_url,
            "objectLock": {"mode": "GOVERNANCE", "retainDays": 2},
            "sse": {"algorithm": "AES256"},
        }
    )
    store = S3Store.from_sink(sink)
    assert store.url == f"s3://{bucket}/rec/"
    assert store.region == "eu-central-1"
    assert store.endpoint_url == env.endpoint_url
    assert store.object_lock == sink.object_lock
    assert store.sse == sink.sse
    config: Any = store._client.meta.config  # the stubs do not declare its options
    assert (config.connect_timeout, config.read_timeout) == (5, 30)
    assert config.s3 == {"addressing_style": "path"}


def test_object_lock_retention(env: MotoServer) -> None:
    bucket = env.make_bucket(f"lock-{uuid.uuid4().hex[:12]}", object_lock=True)
    lock = ObjectLock.model_validate({"mode": "COMPLIANCE", "retainDays": 7})
    store = S3Store(bucket, "p/", endpoint_url=env.endpoint_url, object_lock=lock)
    before = datetime.now(UTC)
    store.put("sessions/x/manifest.json", b"{}")
    assert store.get("sessions/x/manifest.json") == b"{}"
    # moto 5.2 does not implement GetObjectRetention (it answers GET ?retention with the object);
    # HEAD shows the same retention, and a locked version cannot be deleted.
    client = env.client()
    head = client.head_object(Bucket=bucket, Key="p/sessions/x/manifest.json")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    until = head["ObjectLockRetainUntilDate"]
    assert before + timedelta(days=7) - timedelta(minutes=1) <= until
    assert until <= datetime.now(UTC) + timedelta(days=7, minutes=1)
    with pytest.raises(ClientError, match="AccessDenied"):
        client.delete_object(
            Bucket=bucket, Key="p/sessions/x/manifest.json", VersionId=head["VersionId"]
        )


def test_object_lock_needs_a_lock_enabled_bucket(store: S3Store, bucket: str) -> None:
    lock = ObjectLock.model_validate({"mode": "GOVERNANCE", "retainDays": 1})
    locked = S3Store(bucket, "pgwarden", endpoint_url=store.endpoint_url, object_lock=lock)
    with pytest.raises(StoreError, match=bucket) as info:
        locked.put("k", b"x")
    assert not isinstance(info.value, NotFound)


def test_server_side_encryption(env: MotoServer, bucket: str) -> None:
    aes = S3Store(bucket, "a", endpoint_url=env.endpoint_url, sse=ServerSideEncryption())
    aes.put("k", b"x")
    head = env.client().head_object(Bucket=bucket, Key="a/k")
    assert head["ServerSideEncryption"] == "AES256"

    key_id = "arn:aws:kms:us-east-1:123456789012:key/pgwarden"
    sse = ServerSideEncryption.model_validate({"algorithm": "aws:kms", "kmsKeyId": key_id})
    kms = S3Store(bucket, "b", endpoint_url=env.endpoint_url, sse=sse)
    kms.put("k", b"x")
    head = env.client().head_object(Bucket=bucket, Key="b/k")
    assert head["ServerSideEncryption"] == "aws:kms"
    assert head["SSEKMSKeyId"] == key_id


def test_server_down_is_a_store_error_and_recovers(store: S3Store, env: MotoServer) -> None:
    store.put("before", b"1")
    assert store.get("before") == b"1"  # leaves a pooled keep-alive connection behind
    env.down()
    try:
        assert not env.is_up
        with pytest.raises(StoreError, match=store.bucket) as put_info:
            store.put("during", b"2")
        assert "during" in str(put_info.value)
        with pytest.raises(StoreError) as get_info:
            store.get("before")
        assert not isinstance(get_info.value, NotFound)
        with pytest.raises(StoreError):
            list(store.list(""))
        for info in (put_info, get_info):
            assert type(info.value) is StoreError
            assert re.search("EndpointConnectionError|ConnectionClosedError", str(info.value))
    finally:
        env.up()
    assert env.is_up
    store.put("during", b"2")  # the same client, the same port, the same data
    assert store.get("before") == b"1"
    assert list(store.list("")) == ["before", "during"]


def test_missing_bucket(env: MotoServer) -> None:
    name = f"missing-{uuid.uuid4().hex[:12]}"
    store = S3Store(name, "p", endpoint_url=env.endpoint_url)
    with pytest.raises(StoreError, match="NoSuchBucket") as put_info:
        store.put("k", b"x")
    assert f"s3://{name}/p/k" in str(put_info.value)
    with pytest.raises(StoreError, match="NoSuchBucket") as get_info:
        store.get("k")
    assert not isinstance(get_info.value, NotFound)  # a missing bucket is not a missing key
    with pytest.raises(StoreError, match="NoSuchBucket"):
        list(store.list(""))


def test_missing_credentials(env: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store(bucket, endpoint_url=env.endpoint_url)
    with pytest.raises(StoreError, match="NoCredentialsError") as info:
        store.put("k", b"x")
    assert bucket in str(info.value)


def _full_text(e: BaseException) -> str:
    return "".join(traceback.format_exception(e))


def test_no_credentials_in_error_messages(
    env: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "pgwarden-session-token-0042")
    store = S3Store(bucket, "p", endpoint_url=env.endpoint_url)
    missing = S3Store(f"missing-{uuid.uuid4().hex[:12]}", endpoint_url=env.endpoint_url)
    errors: list[StoreError] = []
    for call in (lambda: store.get("nope"), lambda: missing.put("k", b"x")):
        with pytest.raises(StoreError) as info:
            call()
        errors.append(info.value)
    env.down()
    try:
        with pytest.raises(StoreError) as info:
            store.put("k", b"x")
        errors.append(info.value)
    finally:
        env.up()
    for error in errors:
        text = _full_text(error)
        for secret in (ACCESS_KEY, SECRET_KEY, "pgwarden-session-token-0042"):
            assert secret not in text


def test_usable_from_another_thread(store: S3Store) -> None:
    results: list[bytes] = []

    def ship() -> None:
        for i in range(5):
            store.put(f"chunk/{i}", str(i).encode())
        results.extend(store.get(f"chunk/{i}") for i in range(5))

    threads = [threading.Thread(target=ship)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [b"0", b"1", b"2", b"3", b"4"]
