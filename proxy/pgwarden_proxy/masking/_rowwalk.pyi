"""Types of the C row walk (_rowwalk.c); ResultMask.rows_from documents what it does."""

from collections.abc import Callable

from typing_extensions import Buffer

def rows_from(
    data: Buffer,
    start: int,
    limit: int,
    plan: tuple[tuple[int, dict[bytes, bytes], bytes | None], ...],
    miss: Callable[[int, bytes], bytes],
    same: bytes,
    error: type[Exception],
    /,
) -> tuple[bytes, int, int, int]: ...
