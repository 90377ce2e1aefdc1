"""Session-wide real servers shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgwarden.embedded.issuer import LocalIssuer
from pgwarden.embedded.postgres import ThrowawayPostgres
from tests.s3server import MotoServer


@pytest.fixture(scope="session")
def pg() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as server:
        yield server


@pytest.fixture(scope="session")
def pg_tls() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres(tls=True) as server:
        yield server


@pytest.fixture(scope="session")
def issuer() -> Iterator[LocalIssuer]:
    with LocalIssuer() as server:
        yield server


@pytest.fixture(scope="session")
def s3() -> Iterator[MotoServer]:
    """moto's S3 API over HTTP on 127.0.0.1 (`down()`/`up()` simulate an outage)."""
    with MotoServer() as server:
        yield server
