"""gRPC service config (gRFC A6 JSON) to and from :class:`RetryPolicy`, :class:`HedgingPolicy`
and :class:`RetryBudget`.

A team moving from gRPC's native retries keeps its service config: :func:`retry_policy_from_service_config`
reads a ``methodConfig[].retryPolicy`` and :func:`budget_from_service_config` reads
``retryThrottling``. :func:`service_config_from_policy` writes the subset native gRPC supports.

**Reading** follows gRPC's own rules:

* Method selection: the most specific ``name`` wins: ``{service, method}`` exactly, else
  ``{service}`` (every method of the service), else ``{}`` (the default for every method).
  ``method`` without ``service`` is invalid, each name may appear once in the whole config, an
  entry with an empty ``name`` list is skipped. A method that no entry matches, or whose entry
  has no ``retryPolicy``, is not retried by gRPC: you get a policy with ``max_attempts=1``.
* ``retryPolicy``: every field is required. ``maxAttempts`` must be > 1 and, as in gRPC, a
  value above 5 counts as 5 (``max_attempts_cap=None`` lifts that cap); ``initialBackoff`` /
  ``maxBackoff`` are protobuf JSON durations (``"0.1s"``, up to 9 decimals) > 0;
  ``backoffMultiplier`` > 0; ``retryableStatusCodes`` is a non-empty list of code names
  (``"UNAVAILABLE"``) or numbers (14). gRPC's jitter is uniform(0, backoff), which is
  ``jitter="full"``. gRPC caps every backoff at ``maxBackoff``, so an ``initialBackoff`` above
  ``maxBackoff`` behaves as ``maxBackoff`` and is read so.
* Not supported, so refused with ``ValueError`` rather than silently changed: a
  ``backoffMultiplier`` below 1 (a shrinking backoff). A method with a ``hedgingPolicy`` is
  read with :func:`hedging_policy_from_service_config` (``HedgingPolicy.from_service_config``):
  ``maxAttempts`` (> 1, capped at 5 like ``retryPolicy``), ``hedgingDelay`` (a duration >= 0,
  default ``"0s"``), ``nonFatalStatusCodes`` (default none); asking
  :func:`retry_policy_from_service_config` for such a method is refused, and the other way round.
* ``timeout`` in a method config is gRPC's default deadline for the *whole call*, not a
  per-attempt limit, so it does not go into :class:`RetryPolicy` (whose
  ``per_attempt_timeout`` bounds one attempt): read it with
  :func:`method_config_from_service_config` and use it as your call's deadline.
* The policy's ``idempotent_methods`` stays empty. gRPC retries the listed methods whether or not
  they are idempotent; this toolkit retries a non-idempotent method only when the call carries an
  idempotency key (every unary call gets one by default), which is what keeps retries safe.
  List methods that are safe to retry without a key with ``policy.with_changes(idempotent_methods=...)``.
* Unknown fields are ignored, as gRPC does. Anything invalid raises ``ValueError`` whose message
  starts with the field's path, e.g. ``methodConfig[0].retryPolicy.initialBackoff: ...``.

**retryThrottling -> RetryBudget.** gRPC keeps one token bucket per server name: it starts
full at ``maxTokens``, every failed attempt (retryable status) takes 1 token, every success gives
back ``tokenRatio``, and no retry is sent while the count is at or below ``maxTokens / 2``. In
the long run that keeps failures at or below ``tokenRatio`` x successes, after an initial
allowance of about ``maxTokens / 2`` failures. The Finagle budget here allows ``ratio`` x calls in
the last ``window`` seconds plus ``min_retries_per_second`` x ``window`` retries. The mapping
keeps both quantities: ``ratio = tokenRatio`` (the long-run share of retries; at most 1) and
``min_retries_per_second = (maxTokens / 2) / window``, so the reserve of retries per window
equals gRPC's initial allowance. What does not carry over: gRPC's allowance refills only through
successes, the budget's reserve refills every window (it still bounds a full outage to
``maxTokens / 2`` retries per window); gRPC counts first attempts' failures too; gRPC's
throttle is per server name, a budget is shared by whoever you give it to. ``tokenRatio`` is
read with 3 decimals, as gRPC does.

**Writing** (:func:`service_config_from_policy`) is lossy where native gRPC cannot express the
policy: ``jitter`` other than ``"full"`` becomes gRPC's uniform jitter; ``per_attempt_timeout``,
``idempotent_methods`` and ``max_pushback`` are dropped; ``max_attempts`` above 5 is written as 5 (what gRPC would
do anyway); ``max_attempts=1`` writes no ``retryPolicy`` (no retries); durations are rounded to
the nanosecond (and at least 1 ns). A budget becomes ``retryThrottling`` by the inverse mapping:
``maxTokens = round(2 x min_retries_per_second x window)`` (at least 1), ``tokenRatio = ratio``
with 3 decimals (at least 0.001, since gRPC requires > 0). gRPC also needs
``("grpc.enable_retries", 1)`` (the default in recent releases) and the config passed as the
``"grpc.service_config"`` channel option (``json.dumps`` it).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

from resilient_grpc.core.budget import RetryBudget
from resilient_grpc.core.codes import code_name
from resilient_grpc.core.hedging import HedgingPolicy
from resilient_grpc.core.methods import method_patterns
from resilient_grpc.core.policy import RetryPolicy
from resilient_grpc.core.validation import finite_number

#: gRPC treats any ``maxAttempts`` above this as this.
MAX_ATTEMPTS_CAP = 5

#: The window of a :class:`RetryBudget` made from ``retryThrottling`` (seconds).
DEFAULT_BUDGET_WINDOW = 10.0

_DURATION = re.compile(r"^(-?)([0-9]+)(?:\.([0-9]{1,9}))?s$")
_MAX_DURATION_SECONDS = 315_576_000_000  # protobuf Duration's range
_UINT32_MAX = 2**32 - 1
_NANOSECOND = Decimal("0.000000001")
_MILLI = Decimal("0.001")


@dataclass(frozen=True)
class MethodConfig:
    """One ``methodConfig`` entry: the names it applies to and what it sets.

    ``names`` holds ``(service, method)`` pairs, ``""`` where gRPC leaves a part out.
    ``retry_policy`` is ``None`` without a ``retryPolicy``; ``timeout`` is the default deadline
    of the whole call in seconds; ``hedging`` tells that the entry has a ``hedgingPolicy``
    (read into ``hedging_policy``).
    """

    index: int
    names: tuple[tuple[str, str], ...]
    retry_policy: RetryPolicy | None
    timeout: float | None
    wait_for_ready: bool | None
    hedging: bool
    #: The entry's ``hedgingPolicy`` (``None``: none), with ``methods`` set to its names.
    hedging_policy: HedgingPolicy | None = None


@dataclass(frozen=True)
class RetryThrottling:
    """``retryThrottling``: gRPC's token bucket (``token_ratio`` with gRPC's 3 decimals)."""

    max_tokens: int
    token_ratio: float


@dataclass(frozen=True)
class ServiceConfig:
    """The retry-related parts of a validated service config."""

    method_configs: tuple[MethodConfig, ...]
    retry_throttling: RetryThrottling | None

    def for_method(self, method: str) -> MethodConfig | None:
        """The entry gRPC would apply to ``method`` (``"/pkg.Service/Method"``), if any."""
        service, name = _split_full_method(method)
        by_name = {n: entry for entry in self.method_configs for n in entry.names}
        for candidate in ((service, name), (service, ""), ("", "")):
            if candidate in by_name:
                return by_name[candidate]
        return None


# --- reading --------------------------------------------------------------------------------


def parse_service_config(
    config: str | bytes | Mapping[str, Any], *, max_attempts_cap: int | None = MAX_ATTEMPTS_CAP
) -> ServiceConfig:
    """Validate ``config`` (JSON text or the decoded dict) and read its retry-related parts."""
    root = _load(config)
    method_configs: list[MethodConfig] = []
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
    return ServiceConfig(tuple(method_configs), throttling)


def method_config_from_service_config(
    config: str | bytes | Mapping[str, Any], *, method: str
) -> MethodConfig | None:
    """The ``methodConfig`` entry gRPC applies to ``method`` (``None``: none applies)."""
    return parse_service_config(config).for_method(method)


def retry_policy_from_service_config(
    config: str | bytes | Mapping[str, Any],
    *,
    method: str | None = None,
    max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
) -> RetryPolicy:
    """The :class:`RetryPolicy` equivalent to a gRPC ``retryPolicy`` (see the module docstring).

    ``method`` (``"/pkg.Service/Method"``) selects the entry with gRPC's matching rules; a method
    that gRPC would not retry gets ``max_attempts=1``. Without ``method`` the config must hold
    exactly one distinct ``retryPolicy``.
    """
    parsed = parse_service_config(config, max_attempts_cap=max_attempts_cap)
    if method is not None:
        entry = parsed.for_method(method)
        if entry is None:
            return RetryPolicy(max_attempts=1)
        if entry.hedging:
            raise ValueError(
                f"methodConfig[{entry.index}].hedgingPolicy: method {method} is hedged, not "
                "retried: read it with HedgingPolicy.from_service_config"
            )
        return entry.retry_policy or RetryPolicy(max_attempts=1)
    with_policy = [entry for entry in parsed.method_configs if entry.retry_policy is not None]
    if not with_policy:
        raise ValueError("methodConfig: no entry has a retryPolicy")
    policies = {entry.retry_policy for entry in with_policy}
    if len(policies) > 1:
        where = ", ".join(f"methodConfig[{entry.index}]" for entry in with_policy)
        raise ValueError(
            f"methodConfig: {len(with_policy)} entries have different retryPolicy values "
            f"({where}); pass method='/package.Service/Method' to choose one"
        )
    policy = with_policy[0].retry_policy
    assert policy is not None
    return policy


def hedging_policy_from_service_config(
    config: str | bytes | Mapping[str, Any],
    *,
    method: str | None = None,
    max_attempts_cap: int | None = MAX_ATTEMPTS_CAP,
) -> HedgingPolicy:
    """The :class:`HedgingPolicy` equivalent to a gRPC ``hedgingPolicy``.

    Its ``methods`` are the entry's names (empty: the entry is the default for every method).
    ``method`` selects the entry with gRPC's matching rules; a method that gRPC would neither
    hedge nor retry gets a single-attempt policy for that method, and one that it would retry
    is refused (read it with :meth:`RetryPolicy.from_service_config`). Without ``method`` the
    config must hold exactly one distinct ``hedgingPolicy``.
    """
    parsed = parse_service_config(config, max_attempts_cap=max_attempts_cap)
    if method is not None:
        entry = parsed.for_method(method)
        if entry is not None and entry.hedging_policy is not None:
            return entry.hedging_policy
        if entry is not None and entry.retry_policy is not None:
            raise ValueError(
                f"methodConfig[{entry.index}].retryPolicy: method {method} is retried, not "
                "hedged: read it with RetryPolicy.from_service_config"
            )
        return HedgingPolicy(max_attempts=1, delay=0.0, non_fatal_codes=(), methods=[method])
    with_policy = [entry for entry in parsed.method_configs if entry.hedging_policy is not None]
    if not with_policy:
        raise ValueError("methodConfig: no entry has a hedgingPolicy")
    policies = {entry.hedging_policy for entry in with_policy}
    if len(policies) > 1:
        where = ", ".join(f"methodConfig[{entry.index}]" for entry in with_policy)
        raise ValueError(
            f"methodConfig: {len(with_policy)} entries have different hedgingPolicy values "
            f"({where}); pass method='/package.Service/Method' to choose one"
        )
    policy = with_policy[0].hedging_policy
    assert policy is not None
    return policy


def budget_from_service_config(
    config: str | bytes | Mapping[str, Any], *, window: float = DEFAULT_BUDGET_WINDOW
) -> RetryBudget | None:
    """The :class:`RetryBudget` equivalent to ``retryThrottling`` (``None`` if there is none)."""
    throttling = parse_service_config(config).retry_throttling
    if throttling is None:
        return None
    window = finite_number("window", window, above=0.0, unit=" of seconds")
    return RetryBudget(
        ratio=min(throttling.token_ratio, 1.0),
        min_retries_per_second=throttling.max_tokens / 2 / window,
        window=window,
    )


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


def _method_config(raw: object, index: int, cap: int | None) -> MethodConfig:
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
    return MethodConfig(
        index, names, policy, timeout, wait_for_ready, hedging is not None, hedging_policy
    )


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


def _retry_policy(raw: object, path: str, cap: int | None) -> RetryPolicy:
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
    try:
        return RetryPolicy(
            max_attempts=max_attempts,
            initial_backoff=min(initial, maximum),
            max_backoff=maximum,
            multiplier=multiplier,
            jitter="full",
            retryable_codes=codes,
        )
    except ValueError as error:  # not expected after the checks above; keep the path anyway
        raise ValueError(f"{path}: {error}") from None


def _hedging_policy(
    raw: object, path: str, cap: int | None, names: tuple[tuple[str, str], ...]
) -> HedgingPolicy:
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
    try:
        return HedgingPolicy(max_attempts, delay, codes, methods=methods)
    except ValueError as error:  # not expected after the checks above; keep the path anyway
        raise ValueError(f"{path}: {error}") from None


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


def service_config_from_policy(
    policy: RetryPolicy,
    methods: Iterable[str],
    *,
    budget: RetryBudget | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """A gRPC service config (a dict; ``json.dumps`` it) applying ``policy`` to ``methods``.

    ``methods`` holds ``"/pkg.Service/Method"``, ``"/pkg.Service/*"`` (every method of the
    service) or ``"*"`` (every method). ``budget`` becomes ``retryThrottling``, ``timeout``
    (seconds) the methods' default call deadline. What native gRPC cannot express is dropped
    or approximated as the module docstring lists.
    """
    if not isinstance(policy, RetryPolicy):
        raise ValueError(f"policy: expected a RetryPolicy, got {type(policy).__name__}")
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
    if policy.max_attempts >= 2:
        entry["retryPolicy"] = {
            "maxAttempts": min(policy.max_attempts, MAX_ATTEMPTS_CAP),
            "initialBackoff": format_duration(policy.initial_backoff),
            "maxBackoff": format_duration(policy.max_backoff),
            "backoffMultiplier": policy.multiplier,
            "retryableStatusCodes": sorted(policy.retryable_codes),
        }
    config: dict[str, Any] = {"methodConfig": [entry]}
    if budget is not None:
        config["retryThrottling"] = retry_throttling_from_budget(budget)
    return config


def service_config_from_hedging(
    policy: HedgingPolicy,
    methods: Iterable[str] | None = None,
    *,
    budget: RetryBudget | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """A gRPC service config (a dict) applying the ``hedgingPolicy`` of ``policy`` to ``methods``.

    ``methods`` defaults to ``policy.methods`` (``"*"``, every method, when it lists none).
    Lossy where gRPC cannot express the policy: ``idempotent_methods`` and ``max_pushback`` are
    dropped, ``max_attempts`` above 5 is written as 5, ``max_attempts=1`` writes no
    ``hedgingPolicy`` (one attempt), the delay is rounded to the nanosecond.
    """
    if not isinstance(policy, HedgingPolicy):
        raise ValueError(f"policy: expected a HedgingPolicy, got {type(policy).__name__}")
    if methods is None:
        methods = policy.methods or {"*"}
    config = service_config_from_policy(
        RetryPolicy(max_attempts=1), methods, budget=budget, timeout=timeout
    )
    if policy.max_attempts >= 2:
        config["methodConfig"][0]["hedgingPolicy"] = {
            "maxAttempts": min(policy.max_attempts, MAX_ATTEMPTS_CAP),
            "hedgingDelay": "0s" if policy.delay == 0 else format_duration(policy.delay),
            "nonFatalStatusCodes": sorted(policy.non_fatal_codes),
        }
    return config


def retry_throttling_from_budget(budget: RetryBudget) -> dict[str, Any]:
    """The ``retryThrottling`` object nearest to ``budget`` (inverse of the reading mapping)."""
    if not isinstance(budget, RetryBudget):
        raise ValueError(f"budget: expected a RetryBudget, got {type(budget).__name__}")
    max_tokens = max(1, min(_UINT32_MAX, round(2 * budget.min_retries_per_second * budget.window)))
    ratio = max(_decimal(budget.ratio).quantize(_MILLI, rounding=ROUND_DOWN), _MILLI)
    return {"maxTokens": max_tokens, "tokenRatio": float(ratio)}


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
