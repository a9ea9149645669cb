"""Server pushback (gRFC A6 ``grpc-retry-pushback-ms``): parse the trailer into a decision."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PUSHBACK_HEADER = "grpc-retry-pushback-ms"

_DIGITS = re.compile(r"^[0-9]{1,10}$")


@dataclass(frozen=True)
class Pushback:
    """What the server asked for: retry after ``delay`` seconds, or (``delay is None``) not at all."""

    delay: float | None
    source: str

    @property
    def stop(self) -> bool:
        """True when the server said not to retry (negative or malformed pushback)."""
        return self.delay is None


def parse_pushback_ms(value: str | bytes) -> Pushback:
    """Interpret one ``grpc-retry-pushback-ms`` value as gRFC A6 says.

    A non-negative decimal integer is a delay in milliseconds; anything else (negative,
    malformed, empty) means "do not retry".
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return Pushback(None, "pushback")
    text = value.strip()
    if not _DIGITS.match(text):
        return Pushback(None, "pushback")
    return Pushback(int(text) / 1000.0, "pushback")


def pushback_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Pushback | None:
    """The pushback in trailing metadata, if the server sent one (the first value wins)."""
    if not metadata:
        return None
    for key, value in metadata:
        if key.lower() == PUSHBACK_HEADER:
            return parse_pushback_ms(value)
    return None
