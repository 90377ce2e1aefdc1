"""Types of the C row loops (_rowwalk.c, which says what they do)."""

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
def count_rows(data: Buffer, pos: int, type: int, limit: int, /) -> tuple[int, int, int]: ...
