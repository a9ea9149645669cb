"""gRPC status codes by name, so the core can reason about them without importing grpc."""

from __future__ import annotations

from collections.abc import Iterable

#: The package's one table of status codes: name -> number (as ``grpc.StatusCode`` has them).
CODE_NUMBERS: dict[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

STATUS_CODE_NAMES: frozenset[str] = frozenset(CODE_NUMBERS)

_BY_NUMBER: dict[int, str] = {number: name for name, number in CODE_NUMBERS.items()}

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


def code_number(code: object) -> int:
    """The number of a status code given as a name, number or ``grpc.StatusCode`` (2, UNKNOWN,
    for anything else: telemetry reports what it is given and never raises)."""
    return name_and_number(code)[1]


def name_and_number(code: object) -> tuple[str, int]:
    """The name and number of a status code given as a name (the hot path), number or enum;
    ``("UNKNOWN", 2)`` for anything that is not a status code."""
    if code.__class__ is str:
        number = CODE_NUMBERS.get(code)
        if number is not None:
            return code, number
    try:
        name = code_name(code)
    except ValueError:
        name = "UNKNOWN"
    return name, CODE_NUMBERS[name]
