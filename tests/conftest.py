"""Session-wide real servers shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgwarden.embedded.issuer import LocalIssuer
from pgwarden.embedded.postgres import ThrowawayPostgres


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
