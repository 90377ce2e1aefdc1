"""Types of the C statement log line (_eventline.c says what it does)."""

from pgwarden_proxy.events import StatementEvent

def statement_line(event: StatementEvent, middle: str, now: float, /) -> str | None: ...
