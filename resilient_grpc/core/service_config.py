"""gRPC service config (gRFC A6 JSON) read into, and written from, plain values.

This is the pure half of :mod:`resilient_grpc.service_config` (whose docstring states the
rules): it validates the JSON, applies gRPC's method-selection rules and formats durations, but
builds no policy. ``RetryPolicy``, ``HedgingPolicy`` and ``RetryBudget`` import it and build
themselves from what it returns (:func:`build`), so the dependency runs one way only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Protocol, TypeVar

from resilient_grpc.core.codes import code_name
from resilient_grpc.core.methods import method_patterns

#: gRPC treats any ``maxAttempts`` above this as this.
MAX_ATTEMPTS_CAP = 5

#: The window of a ``RetryBudget`` made from ``retryThrottling`` (seconds).
DEFAULT_BUDGET_WINDOW = 10.0

_DURATION = re.compile(r"^(-?)([0-9]+)(?:\.([0-9]{1,9}))?s$")
_MAX_DURATION_SECONDS = 315_576_000_000  # protobuf Duration's range
_UINT32_MAX = 2**32 - 1
_NANOSECOND = Decimal("0.000000001")
_MILLI = Decimal("0.001")

_Built = TypeVar("_Built")
_Spec = TypeVar("_Spec", "RetrySpec", "HedgingSpec")


@dataclass(frozen=True)
class RetrySpec:
    """A validated ``retryPolicy``: the ``RetryPolicy`` keyword arguments it stands for."""

    max_attempts: int
    initial_backoff: float
    max_backoff: float
    multiplier: float
    retryable_codes: frozenset[str]
    #: Where it was read (``methodConfig[0].retryPolicy``), for error messages.
    path: str = field(default="", compare=False)

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of the equivalent ``RetryPolicy`` (gRPC's jitter is full)."""
        return {
            "max_attempts": self.max_attempts,
            "initial_backoff": self.initial_backoff,
            "max_backoff": self.max_backoff,
            "multiplier": self.multiplier,
            "jitter": "full",
            "retryable_codes": self.retryable_codes,
        }


@dataclass(frozen=True)
class HedgingSpec:
    """A validated ``hedgingPolicy`` with the entry's names as ``methods``."""

    max_attempts: int
    delay: float
    non_fatal_codes: frozenset[str]
    methods: tuple[str, ...]
    #: Where it was read (``methodConfig[0].hedgingPolicy``), for error messages.
    path: str = field(default="", compare=False)

    def arguments(self) -> dict[str, Any]:
        """The keyword arguments of the equivalent ``HedgingPolicy``."""
        return {
            "max_attempts": self.max_attempts,
            "delay": self.delay,
            "non_fatal_codes": self.non_fatal_codes,
            "methods": self.methods,
        }


@dataclass(frozen=True)
class RetryThrottling:
    """``retryThrottling``: gRPC's token bucket (``token_ratio`` with gRPC's 3 decimals)."""

    max_tokens: int
    token_ratio: float


@dataclass(frozen=True)
class MethodEntry:
    """One validated ``methodConfig`` entry, its policies still as specs."""

    index: int
    names: tuple[tuple[str, str], ...]
    retry: RetrySpec | None
    timeout: float | None
    wait_for_ready: bool | None
    hedging: HedgingSpec | None


@dataclass(frozen=True)
class ParsedServiceConfig:
    """The retry-related parts of a validated service config, as plain values."""

    method_configs: tuple[MethodEntry, ...]
    retry_throttling: RetryThrottling | None


class _Named(Protocol):
    @property
    def names(self) -> tuple[tuple[str, str], ...]: ...


_Entry = TypeVar("_Entry", bound=_Named)


def entry_for(entries: Sequence[_Entry], method: str) -> _Entry | None:
    """The entry gRPC would apply to ``method`` (``"/pkg.Service/Method"``), if any.

    The most specific name wins: ``{service, method}``, else ``{service}``, else ``{}``.
    """
    service, name = _split_full_method(method)
    by_name = {n: entry for entry in entries for n in entry.names}
    for candidate in ((service, name), (service, ""), ("", "")):
        if candidate in by_name:
            return by_name[candidate]
    return None


def build(factory: Callable[..., _Built], spec: RetrySpec | HedgingSpec) -> _Built:
    """``factory(**spec.arguments())``, an error (not expected after validation) naming the path."""
    try:
        return factory(**spec.arguments())
    except ValueError as error:
        raise ValueError(f"{spec.path}: {error}") from None


# --- reading --------------------------------------------------------------------------------


def parse(
    config: str | bytes | Mapping[str, Any], *, max_attempts_cap: int | None = MAX_ATTEMPTS_CAP
) -> ParsedServiceConfig:
    """Validate ``config`` (JSON text or the decoded dict) and read its retry-related parts."""
    root = _load(config)
    method_configs: list[MethodEntry] = []
    seen: dict[tuple[str, str], str] = {}
    raw_entries = root.get("methodConfig")
    if raw_entries is not None:
        if not isinstance(raw_entries, list):
            raise ValueError(f"methodConfig: expected a list, got {_kind(raw_entries)}")
        for index, raw in enumerate(raw_entries):
            entry = _method_config(raw, index, max_attempts_cap)
            for position, name in enumerate(entry.names):
                path = f"methodConfig[{index}].name[{position}]"
                if name in seen:
                    raise ValueError(
                        f"{path}: duplicate name {_show_name(name)} (also in {seen[name]})"
                    )
                seen[name] = path
            method_configs.append(entry)
    throttling = None
    raw_throttling = root.get("retryThrottling")
    if raw_throttling is not None:
        throttling = _retry_throttling(raw_throttling)
    return ParsedServiceConfig(tuple(method_configs), throttling)


def retry_spec(
    config: str | bytes | Mapping[str, Any],
    *,
    method: str | None = None,
    max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
) -> RetrySpec | None:
    """The ``retryPolicy`` gRPC applies to ``method`` (``None``: gRPC would not retry it).

    Without ``method`` the config must hold exactly one distinct ``retryPolicy``.
    """
    parsed = parse(config, max_attempts_cap=max_attempts_cap)
    if method is not None:
        entry = entry_for(parsed.method_configs, method)
        if entry is None:
            return None
        if entry.hedging is not None:
            raise ValueError(
                f"methodConfig[{entry.index}].hedgingPolicy: method {method} is hedged, not "
                "retried: read it with HedgingPolicy.from_service_config"
            )
        return entry.retry
    return _the_only(parsed, "retryPolicy", lambda entry: entry.retry)


def hedging_spec(
    config: str | bytes | Mapping[str, Any],
    *,
    method: str | None = None,
    max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
) -> HedgingSpec:
    """The ``hedgingPolicy`` gRPC applies to ``method`` (one attempt if it neither hedges nor
    retries it; a retried method is refused). Without ``method`` the config must hold exactly
    one distinct ``hedgingPolicy``."""
    parsed = parse(config, max_attempts_cap=max_attempts_cap)
    if method is not None:
        entry = entry_for(parsed.method_configs, method)
        if entry is not None and entry.hedging is not None:
            return entry.hedging
        if entry is not None and entry.retry is not None:
            raise ValueError(
                f"methodConfig[{entry.index}].retryPolicy: method {method} is retried, not "
                "hedged: read it with RetryPolicy.from_service_config"
            )
        return HedgingSpec(
            max_attempts=1, delay=0.0, non_fatal_codes=frozenset(), methods=(method,)
        )
    return _the_only(parsed, "hedgingPolicy", lambda entry: entry.hedging)


def _the_only(
    parsed: ParsedServiceConfig, kind: str, spec_of: Callable[[MethodEntry], _Spec | None]
) -> _Spec:
    """The one distinct ``kind`` spec of the config (an error if there are none or several)."""
    with_policy = [entry for entry in parsed.method_configs if spec_of(entry) is not None]
    if not with_policy:
        raise ValueError(f"methodConfig: no entry has a {kind}")
    if len({spec_of(entry) for entry in with_policy}) > 1:
        where = ", ".join(f"methodConfig[{entry.index}]" for entry in with_policy)
        raise ValueError(
            f"methodConfig: {len(with_policy)} entries have different {kind} values "
            f"({where}); pass method='/package.Service/Method' to choose one"
        )
    spec = spec_of(with_policy[0])
    assert spec is not None
    return spec


def _method_config(raw: object, index: int, cap: int | None) -> MethodEntry:
    path = f"methodConfig[{index}]"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected an object, got {_kind(raw)}")
    names = _names(raw.get("name"), f"{path}.name")
    retry = raw.get("retryPolicy")
    hedging = raw.get("hedgingPolicy")
    if retry is not None and hedging is not None:
        raise ValueError(f"{path}: retryPolicy and hedgingPolicy cannot both be set")
    if hedging is not None and not isinstance(hedging, Mapping):
        raise ValueError(f"{path}.hedgingPolicy: expected an object, got {_kind(hedging)}")
    policy = None if retry is None else _retry_policy(retry, f"{path}.retryPolicy", cap)
    hedging_policy = (
        None if hedging is None else _hedging_policy(hedging, f"{path}.hedgingPolicy", cap, names)
    )
    timeout = None
    if raw.get("timeout") is not None:
        timeout = _duration(raw["timeout"], f"{path}.timeout")
    wait_for_ready = raw.get("waitForReady")
    if wait_for_ready is not None and not isinstance(wait_for_ready, bool):
        raise ValueError(f"{path}.waitForReady: expected true or false, got {wait_for_ready!r}")
    return MethodEntry(index, names, policy, timeout, wait_for_ready, hedging_policy)


def _retry_policy(raw: object, path: str, cap: int | None) -> RetrySpec:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected an object, got {_kind(raw)}")
    max_attempts = _integer(_required(raw, "maxAttempts", path), f"{path}.maxAttempts")
    if max_attempts < 2:
        raise ValueError(f"{path}.maxAttempts: must be greater than 1, got {max_attempts}")
    if cap is not None:
        max_attempts = min(max_attempts, cap)
    initial = _duration(_required(raw, "initialBackoff", path), f"{path}.initialBackoff")
    maximum = _duration(_required(raw, "maxBackoff", path), f"{path}.maxBackoff")
    multiplier = _number(_required(raw, "backoffMultiplier", path), f"{path}.backoffMultiplier")
    if multiplier <= 0:
        raise ValueError(f"{path}.backoffMultiplier: must be greater than 0, got {multiplier!r}")
    if multiplier < 1:
        raise ValueError(
            f"{path}.backoffMultiplier: {multiplier!r} < 1 (a shrinking backoff) is valid in "
            "gRPC but not supported by RetryPolicy"
        )
    codes = _status_codes(
        _required(raw, "retryableStatusCodes", path), f"{path}.retryableStatusCodes"
    )
    return RetrySpec(
        max_attempts=max_attempts,
        initial_backoff=min(initial, maximum),
        max_backoff=maximum,
        multiplier=multiplier,
        retryable_codes=codes,
        path=path,
    )


def _hedging_policy(
    raw: object, path: str, cap: int | None, names: tuple[tuple[str, str], ...]
) -> HedgingSpec:
    """gRFC A6 ``hedgingPolicy``: ``maxAttempts`` (> 1, capped like gRPC), ``hedgingDelay``
    (a duration >= 0, default 0s) and ``nonFatalStatusCodes`` (default none)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected an object, got {_kind(raw)}")
    max_attempts = _integer(_required(raw, "maxAttempts", path), f"{path}.maxAttempts")
    if max_attempts < 2:
        raise ValueError(f"{path}.maxAttempts: must be greater than 1, got {max_attempts}")
    if cap is not None:
        max_attempts = min(max_attempts, cap)
    delay = 0.0
    if raw.get("hedgingDelay") is not None:
        delay = _duration(raw["hedgingDelay"], f"{path}.hedgingDelay", allow_zero=True)
    codes: frozenset[str] = frozenset()
    raw_codes = raw.get("nonFatalStatusCodes")
    if raw_codes is not None:
        codes = _status_codes(
            raw_codes, f"{path}.nonFatalStatusCodes", allow_empty=True, what="non-fatal"
        )
    methods = () if ("", "") in names else tuple(_pattern_of(name) for name in names)
    return HedgingSpec(max_attempts, delay, codes, methods, path=path)


def _load(config: object) -> Mapping[str, Any]:
    if isinstance(config, bytes):
        try:
            config = config.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"service config: not UTF-8 text ({error})") from None
    if isinstance(config, str):
        try:
            config = json.loads(config, parse_constant=_reject_constant)
        except ValueError as error:
            raise ValueError(f"service config: invalid JSON ({error})") from None
    if not isinstance(config, Mapping):
        raise ValueError(f"service config: expected a JSON object, got {_kind(config)}")
    return config


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _names(raw: object, path: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ValueError(
            f"{path}: expected a list of {{service, method}} objects, got {_kind(raw)}"
        )
    names: list[tuple[str, str]] = []
    for position, item in enumerate(raw):
        here = f"{path}[{position}]"
        if not isinstance(item, Mapping):
            raise ValueError(
                f"{here}: expected an object with service and method, got {_kind(item)}"
            )
        service = _optional_string(item.get("service"), f"{here}.service")
        method = _optional_string(item.get("method"), f"{here}.method")
        if method and not service:
            raise ValueError(f"{here}.method: {method!r} is set without a service")
        if "/" in service or "/" in method:
            raise ValueError(f"{here}: service and method names cannot contain '/'")
        names.append((service, method))
    return tuple(names)


def _optional_string(raw: object, path: str) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str):
        raise ValueError(f"{path}: expected a string, got {_kind(raw)}")
    return raw


def _pattern_of(name: tuple[str, str]) -> str:
    service, method = name
    return f"/{service}/{method or '*'}"


def _retry_throttling(raw: object) -> RetryThrottling:
    path = "retryThrottling"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected an object, got {_kind(raw)}")
    max_tokens = _integer(_required(raw, "maxTokens", path), f"{path}.maxTokens")
    if not 0 < max_tokens <= _UINT32_MAX:
        raise ValueError(
            f"{path}.maxTokens: must be an integer in [1, {_UINT32_MAX}], got {max_tokens}"
        )
    ratio = _number(_required(raw, "tokenRatio", path), f"{path}.tokenRatio")
    milli = _decimal(ratio).quantize(_MILLI, rounding=ROUND_DOWN)
    if milli <= 0:
        raise ValueError(
            f"{path}.tokenRatio: must be greater than 0 with gRPC's 3 decimals, got {ratio!r}"
        )
    return RetryThrottling(max_tokens, float(milli))


def _required(raw: Mapping[str, Any], field: str, path: str) -> Any:
    value = raw.get(field)
    if value is None:
        raise ValueError(f"{path}.{field}: required")
    return value


def _integer(raw: object, path: str) -> int:
    """A protobuf JSON integer: a number with no fraction, or a decimal string."""
    if isinstance(raw, bool):
        raise ValueError(f"{path}: expected an integer, got {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and re.fullmatch(r"-?[0-9]+", raw.strip()):
        return int(raw)
    raise ValueError(f"{path}: expected an integer, got {raw!r}")


def _number(raw: object, path: str) -> float:
    """A protobuf JSON float: a finite number, or a decimal string."""
    if isinstance(raw, bool):
        raise ValueError(f"{path}: expected a number, got {raw!r}")
    value: float
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{path}: expected a number, got {raw!r}") from None
    else:
        raise ValueError(f"{path}: expected a number, got {_kind(raw)}")
    if not math.isfinite(value):
        raise ValueError(f"{path}: expected a finite number, got {raw!r}")
    return value


def _duration(raw: object, path: str, *, allow_zero: bool = False) -> float:
    """A protobuf JSON duration (``"0.1s"``) that must be > 0 (or >= 0), in seconds."""
    if not isinstance(raw, str):
        raise ValueError(f'{path}: expected a duration string like "0.1s", got {raw!r}')
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError(
            f"{path}: {raw!r} is not a duration (seconds with up to 9 decimals and an 's', "
            'e.g. "0.1s")'
        )
    sign, whole, fraction = match.groups()
    value = Decimal(f"{sign}{whole}.{fraction or '0'}")
    if value > _MAX_DURATION_SECONDS:
        raise ValueError(f"{path}: {raw!r} is beyond the protobuf Duration range")
    if allow_zero and value < 0:
        raise ValueError(f"{path}: must not be negative, got {raw!r}")
    if not allow_zero and value <= 0:
        raise ValueError(f"{path}: must be greater than 0, got {raw!r}")
    return float(value)


def _status_codes(
    raw: object, path: str, *, allow_empty: bool = False, what: str = "retried"
) -> frozenset[str]:
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a list of status codes, got {_kind(raw)}")
    if not raw and not allow_empty:
        raise ValueError(f"{path}: must not be empty")
    codes: set[str] = set()
    for position, item in enumerate(raw):
        here = f"{path}[{position}]"
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"{here}: expected a status code name or number, got {item!r}")
        try:
            name = code_name(item, field=here)
        except ValueError:
            raise ValueError(f"{here}: {item!r} is not a gRPC status code") from None
        if name == "OK":
            raise ValueError(f"{here}: OK is not an error and cannot be {what}")
        codes.add(name)
    return frozenset(codes)


def _split_full_method(method: str) -> tuple[str, str]:
    if (
        not isinstance(method, str)
        or not method.startswith("/")
        or method.count("/") != 2
        or method.endswith("/")
        or method.startswith("//")
    ):
        raise ValueError(f"method: expected '/package.Service/Method', got {method!r}")
    service, _, name = method[1:].partition("/")
    return service, name


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _show_name(name: tuple[str, str]) -> str:
    service, method = name
    if not service:
        return "{} (the default)"
    return f"{{service: {service!r}" + (f", method: {method!r}}}" if method else "}")


def _decimal(value: float) -> Decimal:
    try:
        return Decimal(repr(value))
    except InvalidOperation:  # pragma: no cover - finite floats always convert
        raise ValueError(f"not a number: {value!r}") from None


# --- writing --------------------------------------------------------------------------------


def method_config_entry(methods: Iterable[str], *, timeout: float | None) -> dict[str, Any]:
    """A ``methodConfig`` entry naming ``methods`` (with ``timeout`` as its deadline), no policy.

    ``methods`` holds ``"/pkg.Service/Method"``, ``"/pkg.Service/*"`` or ``"*"``.
    """
    if isinstance(methods, (str, bytes)):
        raise ValueError(
            f"methods: expected a collection of method names, got the string {methods!r}"
        )
    chosen = frozenset(methods)
    if not chosen:
        raise ValueError("methods: give at least one method, '/package.Service/*' or '*'")
    names = sorted(
        (_name_of(pattern) for pattern in method_patterns(chosen - {"*"}, field="methods")),
        key=lambda name: (name.get("service", ""), name.get("method", "")),
    )
    if "*" in chosen:
        names.insert(0, {})
    entry: dict[str, Any] = {"name": names}
    if timeout is not None:
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ValueError(f"timeout: must be a finite number of seconds > 0, got {timeout!r}")
        entry["timeout"] = format_duration(timeout)
    return entry


def retry_throttling_json(
    *, ratio: float, min_retries_per_second: float, window: float
) -> dict[str, Any]:
    """The ``retryThrottling`` object nearest to a budget (inverse of the reading mapping)."""
    max_tokens = max(1, min(_UINT32_MAX, round(2 * min_retries_per_second * window)))
    milli = max(_decimal(ratio).quantize(_MILLI, rounding=ROUND_DOWN), _MILLI)
    return {"maxTokens": max_tokens, "tokenRatio": float(milli)}


def format_duration(seconds: float) -> str:
    """``seconds`` as a protobuf JSON duration (``0.1`` -> ``"0.1s"``), at least 1 ns."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not (math.isfinite(seconds) and 0 < seconds <= _MAX_DURATION_SECONDS)
    ):
        raise ValueError(
            f"duration: expected seconds in (0, {_MAX_DURATION_SECONDS}], got {seconds!r}"
        )
    value = _decimal(seconds).quantize(_NANOSECOND, rounding=ROUND_HALF_EVEN)
    value = max(value, _NANOSECOND)
    text = f"{value:f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text}s"


def _name_of(pattern: str) -> dict[str, str]:
    service, _, method = pattern[1:].partition("/")
    if method == "*":
        return {"service": service}
    return {"service": service, "method": method}
