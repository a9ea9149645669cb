"""Server pushback (gRFC A6 ``grpc-retry-pushback-ms``): parse the trailer into a decision."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

PUSHBACK_HEADER = "grpc-retry-pushback-ms"

_DIGITS = re.compile(r"^[0-9]{1,10}$")

#: gRFC A6 carries the pushback as an int32: a larger value is malformed.
INT32_MAX = 2**31 - 1


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

    A decimal integer from 0 to 2**31 - 1 (an int32, as gRFC A6 defines it) is a delay in
    milliseconds; anything else (negative, beyond int32, malformed, empty) means "do not retry".
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return Pushback(None, "pushback")
    text = value.strip()
    if not _DIGITS.match(text):
        return Pushback(None, "pushback")
    milliseconds = int(text)
    if milliseconds > INT32_MAX:
        return Pushback(None, "pushback")
    return Pushback(milliseconds / 1000.0, "pushback")


def pushback_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Pushback | None:
    """The pushback in trailing metadata, if the server sent one (the first value wins)."""
    if not metadata:
        return None
    for key, value in metadata:
        if key.lower() == PUSHBACK_HEADER:
            return parse_pushback_ms(value)
    return None
