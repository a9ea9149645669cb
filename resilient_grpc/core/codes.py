"""gRPC status codes by name, so the core can reason about them without importing grpc."""

from __future__ import annotations

from collections.abc import Iterable

STATUS_CODE_NAMES: frozenset[str] = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

#: Codes retried by default: only UNAVAILABLE, which gRPC guarantees means "not processed".
DEFAULT_RETRYABLE_CODES: frozenset[str] = frozenset({"UNAVAILABLE"})

#: Codes that say the backend is unhealthy; the circuit breaker counts only these.
UNHEALTHY_CODES: frozenset[str] = frozenset(
    {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL"}
)


def code_name(code: object, *, field: str = "code") -> str:
    """Normalise a ``grpc.StatusCode``, its name or its numeric value to the upper-case name.

    Raises ``ValueError`` naming ``field`` for anything that is not a gRPC status code.
    """
    name: object
    if isinstance(code, str):
        name = code.strip().upper()
    elif isinstance(code, int) and not isinstance(code, bool):
        name = _BY_NUMBER.get(code)
    else:
        name = getattr(code, "name", None)
    if not isinstance(name, str) or name not in STATUS_CODE_NAMES:
        raise ValueError(f"{field}: {code!r} is not a gRPC status code")
    return name


def code_names(codes: Iterable[object], *, field: str) -> frozenset[str]:
    """Normalise a collection of status codes (see :func:`code_name`); rejects a bare string."""
    if isinstance(codes, (str, bytes)):
        raise ValueError(
            f"{field}: expected a collection of status codes, got the string {codes!r}"
        )
    return frozenset(code_name(c, field=field) for c in codes)


_BY_NUMBER: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
