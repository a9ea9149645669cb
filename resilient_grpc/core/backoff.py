"""Jittered backoff delays: the arithmetic of the design, with an injectable random source."""

from __future__ import annotations

import random
from collections.abc import Callable

from resilient_grpc.core.policy import RetryPolicy

#: ``uniform(a, b)``: a float in ``[a, b]``. Tests inject a seeded or scripted one.
Uniform = Callable[[float, float], float]

_default_random = random.Random()


def default_uniform() -> Uniform:
    """The process-wide random source used when none is injected."""
    return _default_random.uniform


def jittered_backoff(
    policy: RetryPolicy, retry_number: int, previous: float | None, uniform: Uniform
) -> float:
    """The delay before retry ``retry_number`` (1-based), shaped by ``policy.jitter``.

    ``previous`` is the previous delay of the same call (used by decorrelated jitter; ``None``
    before the first retry). The result is always within ``[0, policy.max_backoff]``; for
    ``"equal"`` it is at least half the base delay, for ``"decorrelated"`` at least
    ``initial_backoff``.
    """
    base = policy.base_backoff(retry_number)
    if policy.jitter == "none":
        delay = base
    elif policy.jitter == "full":
        delay = uniform(0.0, base)
    elif policy.jitter == "equal":
        delay = base / 2 + uniform(0.0, base / 2)
    else:  # decorrelated (AWS architecture blog): grows from the previous delay, not from n
        last = policy.initial_backoff if previous is None else max(previous, policy.initial_backoff)
        delay = min(policy.max_backoff, uniform(policy.initial_backoff, 3 * last))
    # A misbehaving injected source must not break the bounds.
    return min(max(delay, 0.0), policy.max_backoff)
