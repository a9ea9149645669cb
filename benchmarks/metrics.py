"""Turn one trial's raw logs (client records, server attempts and executions) into metrics.

Definitions (also printed under the table):

* goodput: logical requests that succeeded, as a fraction of those offered (overall, and
  "after": of those arriving after the trigger); "ok/s during": logical requests that
  succeeded per second during the trigger window (counted by the time they succeeded), to
  compare with the server's capacity;
* amplification: attempts that reached the server per logical request, counted by arrival time
  during the trigger window and after it (attempts after the trigger, tail included, over the
  requests that arrived after it);
* late executions: transfers the server finished after their attempt's deadline (work
  nobody waits for any more), per second after the trigger;
* latency: p50 / p99 / p99.9 of successful logical requests, from their scheduled arrival;
* duplicates: executions of a logical request beyond its first;
* lost: requests that failed and were never applied; failed-but-applied is the other kind
  of failure (the client saw an error, the server executed it);
* time to recover: the first 1 s window after the trigger (sliding in 0.1 s steps) in which the
  requests arriving succeed at >= 95 % (goodput back within 5 % of offered load); ``None`` if
  that never happens before the run ends.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from benchmarks.load import RequestRecord

RECOVERY_WINDOW = 1.0
RECOVERY_STEP = 0.1
RECOVERY_LEVEL = 0.95
SERIES_BIN = 0.25


@dataclass
class TrialMetrics:
    """The numbers of one policy in one scenario."""

    requests: int
    succeeded: int
    goodput: float
    goodput_after: float | None
    goodput_during_per_s: float | None
    amplification_during: float | None
    amplification_after: float | None
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    duplicates: int
    lost: int
    failed_applied: int
    time_to_recover: float | None
    recovered: bool
    server_attempts: int
    executions: int
    late_executions: int
    late_executions_per_s_after: float | None
    failures: dict[str, int]
    server_status: dict[str, int]
    series: dict[str, list[float]] = field(default_factory=dict)
    proxy: dict[str, int] | None = None
    #: A protected server's admission decisions by outcome (``admit`` or the shed reason), over
    #: the run and during the trigger, and per bin: decisions by outcome, the lowest limit,
    #: the most calls in flight; ``None`` for an unprotected server.
    admission: dict[str, Any] | None = None
    #: The longest stall (ms) per bin of the client's event loop and of the server process
    #: (a 10 ms timer's lateness): what a busy machine or a garbage collection costs the run.
    stalls: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) by linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def time_to_recover(
    records: Sequence[RequestRecord], origin: float, trigger_end: float, run_end: float
) -> float | None:
    """Seconds from the trigger's end to the first 1 s window whose arrivals succeed >= 95 %."""
    step = 0
    while True:
        offset = round(step * RECOVERY_STEP, 6)  # no accumulated float error
        if trigger_end + offset + RECOVERY_WINDOW > run_end + 1e-9:
            return None
        low = origin + trigger_end + offset
        high = low + RECOVERY_WINDOW
        window = [r for r in records if low <= r.start < high]
        if window and sum(r.ok for r in window) >= RECOVERY_LEVEL * len(window):
            return offset
        step += 1


def _series(
    records: Sequence[RequestRecord],
    attempts: Sequence[tuple[float, str]],
    executions: Sequence[tuple[float, str, bool]],
    origin: float,
    span: float,
) -> dict[str, list[float]]:
    """Per-second rates in ``SERIES_BIN`` bins: offered, goodput, server attempts, wasted work."""
    bins = max(1, math.ceil(span / SERIES_BIN))

    def rate(times: Sequence[float]) -> list[float]:
        counts = [0] * bins
        for t in times:
            index = int((t - origin) / SERIES_BIN)
            if 0 <= index < bins:
                counts[index] += 1
        return [round(c / SERIES_BIN, 1) for c in counts]

    return {
        "t": [round((i + 0.5) * SERIES_BIN, 3) for i in range(bins)],
        "offered": rate([r.start for r in records]),
        "goodput": rate([r.end for r in records if r.ok]),
        "server_attempts": rate([t for t, _code in attempts]),
        "late_executions": rate([t for t, _key, late in executions if late]),
    }


def compute(
    records: Sequence[RequestRecord],
    keys: Sequence[str],
    attempts: Sequence[tuple[float, str]],
    executions: Sequence[tuple[float, str, bool]],
    *,
    origin: float,
    trigger: tuple[float, float],
    duration: float,
) -> TrialMetrics:
    """Metrics of one trial; ``keys[i]`` is the logical id of request ``i``; times are monotonic."""
    start, end = origin + trigger[0], origin + trigger[1]
    runs_on = end < origin + duration - 1e-9
    executed = collections.Counter(key for _t, key, _late in executions)
    succeeded = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    latencies = [r.latency * 1000 for r in succeeded]
    during_requests = sum(1 for r in records if start <= r.start < end)
    during_attempts = sum(1 for t, _code in attempts if start <= t < end)
    after = [r for r in records if r.start >= end]
    after_requests = len(after)
    after_seconds = duration - trigger[1]
    late_after = sum(1 for t, _key, late in executions if late and end <= t < origin + duration)
    after_attempts = sum(1 for t, _code in attempts if t >= end)
    recover = time_to_recover(records, origin, trigger[1], duration) if runs_on else None
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    span = max([duration, *((r.end - origin) for r in records)]) if records else duration
    return TrialMetrics(
        requests=len(records),
        succeeded=len(succeeded),
        goodput=round(len(succeeded) / len(records), 4) if records else 0.0,
        goodput_after=(
            _round(_ratio(sum(r.ok for r in after), after_requests), 4) if runs_on else None
        ),
        goodput_during_per_s=(
            round(sum(1 for r in succeeded if start <= r.end < end) / (end - start), 1)
            if end > start
            else None
        ),
        amplification_during=_round(_ratio(during_attempts, during_requests)),
        amplification_after=_round(_ratio(after_attempts, after_requests)) if runs_on else None,
        p50_ms=_round(p50, 1),
        p99_ms=_round(p99, 1),
        p999_ms=_round(percentile(latencies, 0.999), 1),
        duplicates=sum(n - 1 for n in executed.values() if n > 1),
        lost=sum(1 for r in failed if executed[keys[r.index]] == 0),
        failed_applied=sum(1 for r in failed if executed[keys[r.index]] > 0),
        time_to_recover=recover,
        recovered=recover is not None,
        server_attempts=len(attempts),
        executions=len(executions),
        late_executions=sum(1 for _t, _key, late in executions if late),
        late_executions_per_s_after=_round(late_after / after_seconds, 1) if runs_on else None,
        failures=dict(collections.Counter(r.code for r in failed)),
        server_status=dict(collections.Counter(code for _t, code in attempts)),
        series=_series(records, attempts, executions, origin, span),
    )


def _bins(span: float) -> int:
    return max(1, math.ceil(span / SERIES_BIN))


def _bin(t: float, origin: float, bins: int) -> int | None:
    index = int((t - origin) / SERIES_BIN)
    return index if 0 <= index < bins else None


def admission_summary(
    decisions: Sequence[tuple[float, str, int, int, float]],
    *,
    origin: float,
    trigger: tuple[float, float],
    span: float,
) -> dict[str, Any]:
    """A protected server's decisions (time, outcome, limit, in flight, expected s) summed up."""
    bins = _bins(span)
    start, end = origin + trigger[0], origin + trigger[1]
    outcomes = sorted({outcome for _t, outcome, *_rest in decisions})
    per_bin = {outcome: [0.0] * bins for outcome in outcomes}
    limit_min: list[float | None] = [None] * bins
    in_flight_max = [0.0] * bins
    expected_max = [0.0] * bins
    for t, outcome, limit, in_flight, expected in decisions:
        index = _bin(t, origin, bins)
        if index is None:
            continue
        per_bin[outcome][index] += 1 / SERIES_BIN
        current = limit_min[index]
        limit_min[index] = limit if current is None else min(current, limit)
        in_flight_max[index] = max(in_flight_max[index], in_flight)
        expected_max[index] = max(expected_max[index], round(expected * 1000, 1))
    return {
        "total": dict(collections.Counter(o for t, o, *_ in decisions if t >= origin)),
        "during": dict(collections.Counter(o for t, o, *_ in decisions if start <= t < end)),
        "per_s": {outcome: [round(v, 1) for v in values] for outcome, values in per_bin.items()},
        "limit_min": limit_min,
        "in_flight_max": in_flight_max,
        "expected_ms_max": expected_max,
    }


def stall_series(lags: Sequence[tuple[float, float]], *, origin: float, span: float) -> list[float]:
    """The longest lag (ms) per bin of (time, lag seconds) samples."""
    bins = _bins(span)
    worst = [0.0] * bins
    for t, lag in lags:
        index = _bin(t, origin, bins)
        if index is not None:
            worst[index] = max(worst[index], round(lag * 1000, 1))
    return worst


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
