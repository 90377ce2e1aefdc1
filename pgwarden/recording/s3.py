"""Recordings in S3 or an S3-compatible store (MinIO, Ceph RGW, …).

Only PutObject, GetObject and ListObjectsV2 are used, with settings that every S3 implementation
understands: path-style addressing when an endpoint URL is set, and a Content-MD5 on every PUT
(which also satisfies Object Lock's "a PUT with retention needs a checksum") instead of botocore's
newer default CRC32 checksums, which some S3-compatible servers reject.

Credentials, region and endpoint come from the usual AWS sources (environment, profile, IRSA,
instance role) unless given. The client is created once and is safe to use from another thread
(the shipper's). Botocore retries a failed call once; the shipper retries with backoff on its own,
so every failure surfaces quickly as `StoreError` (never a botocore exception), and a missing key
as `NotFound`. Error messages name the bucket, the key and the cause, never credentials.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from pgwarden.recording.store import NotFound, StoreError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from pgwarden.api.config import ObjectLock, S3Sink, ServerSideEncryption

__all__ = ["S3Store"]

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
# botocore's own attempts per call (the first included); the caller retries with backoff
MAX_ATTEMPTS = 2

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# AWS access key ids (long-term AKIA…, temporary ASIA…), and user:password@ in a URL
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{12,}\b")
_USERINFO = re.compile(r"(//)[^/@\s]+@")
_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def _redact(text: str) -> str:
    """Remove anything credential-like from an error message (belt and braces: neither botocore
    nor S3 puts secrets in messages, but a message can quote a URL or an access key id)."""
    for var in _SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "[redacted]")
    text = _KEY_ID.sub("[redacted]", text)
    return _USERINFO.sub(r"\1[redacted]@", text)


def _cause(e: Exception) -> str:
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = error.get("Code") or (str(status) if status else "error")
        message = error.get("Message") or ""
        return f"{code} (HTTP {status}): {message}" if message else f"{code} (HTTP {status})"
    return f"{type(e).__name__}: {e}"


def _check_key(key: str) -> None:
    # the same rule as FileStore: a key means the same object in every store
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"not a store key: {key!r}")


class S3Store:
    """Keys below `s3://bucket/prefix`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        object_lock: ObjectLock | None = None,
        sse: ServerSideEncryption | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"not a bucket name: {bucket!r}")
        prefix = prefix.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}"
        self.object_lock = object_lock
        self.sse = sse
        # Resolved here (not left to botocore) so that path-style addressing follows from it, and
        # so that AWS_ENDPOINT_URL works with botocore versions that do not read it themselves.
        self.endpoint_url = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or None
        )
        self.region = region or os.environ.get("AWS_REGION") or None  # else AWS_DEFAULT_REGION…
        options: dict[str, Any] = {
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": READ_TIMEOUT,
            "retries": {"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        }
        if self.endpoint_url:
            options["s3"] = {"addressing_style": "path"}
        if "request_checksum_calculation" in Config.OPTION_DEFAULTS:  # botocore >= 1.36
            # no default CRC32 (aws-chunked trailers on HTTPS): we send Content-MD5 ourselves
            options["request_checksum_calculation"] = "when_required"
        try:
            # an own session: boto3's default session is not thread-safe; the client is
            self._client: S3Client = boto3.session.Session().client(
                "s3",
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=Config(**options),
            )
        except (BotoCoreError, ClientError) as e:
            raise StoreError(_redact(f"cannot set up S3 for bucket {bucket}: {_cause(e)}")) from e

    @classmethod
    def from_sink(cls, sink: S3Sink) -> S3Store:
        return cls(
            sink.bucket,
            sink.prefix,
            region=sink.region,
            endpoint_url=sink.endpoint_url,
            object_lock=sink.object_lock,
            sse=sink.sse,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint_url!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled for the shipper's process, which makes its own client (a client holds sockets)
        return (
            _s3_store,
            (self.bucket, self.prefix, self.region, self.endpoint_url, self.object_lock, self.sse),
        )

    def _error(self, action: str, what: str, e: Exception) -> StoreError:
        return StoreError(_redact(f"cannot {action} s3://{self.bucket}/{what}: {_cause(e)}"))

    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        name = self.prefix + key
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        extra: dict[str, Any] = {}
        if self.object_lock is not None:
            until = datetime.now(UTC) + timedelta(days=self.object_lock.retain_days)
            extra["ObjectLockMode"] = self.object_lock.mode
            extra["ObjectLockRetainUntilDate"] = until
        if self.sse is not None:
            extra["ServerSideEncryption"] = self.sse.algorithm
            if self.sse.kms_key_id is not None:
                extra["SSEKMSKeyId"] = self.sse.kms_key_id
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=name,
                Body=data,
                ContentMD5=base64.b64encode(md5).decode("ascii"),
                **extra,
            )
        except (BotoCoreError, ClientError) as e:
            raise self._error("write", name, e) from e

    def get(self, key: str) -> bytes:
        _check_key(key)
        name = self.prefix + key
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
            body = response["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES:
                raise NotFound(key) from e
            raise self._error("read", name, e) from e
        except BotoCoreError as e:
            raise self._error("read", name, e) from e

    def list(self, prefix: str) -> Iterator[str]:
        """Keys in UTF-8 byte order, which is the order ListObjectsV2 returns them in (every page
        is fetched as the iteration reaches it, so a large listing is never held in memory)."""
        full = self.prefix + prefix
        start = len(self.prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    name = obj.get("Key", "")
                    if name.startswith(full):
                        yield name[start:]
        except (BotoCoreError, ClientError) as e:
            raise self._error("list", full + "*", e) from e


def _s3_store(
    bucket: str,
    prefix: str,
    region: str | None,
    endpoint_url: str | None,
    object_lock: ObjectLock | None,
    sse: ServerSideEncryption | None,
) -> S3Store:
    return S3Store(
        bucket, prefix, region=region, endpoint_url=endpoint_url, object_lock=object_lock, sse=sse
    )
