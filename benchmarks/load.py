"""Open-loop load: Poisson arrivals of logical requests, each started on time whatever happens.

Open loop means the generator never waits for earlier requests: a slow or retrying client adds
load instead of slowing the arrivals, as real independent users do. Each logical request is an
asyncio task on one event loop (the ``grpc.aio`` client), started at its scheduled instant.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Phase:
    """A stretch of the run with a constant Poisson arrival rate (requests per second)."""

    name: str
    duration: float
    rate: float


@dataclass(frozen=True)
class RequestRecord:
    """The client's view of one logical request (times are ``time.monotonic()``)."""

    index: int
    start: float
    end: float
    ok: bool
    code: str

    @property
    def latency(self) -> float:
        return self.end - self.start


def poisson_schedule(phases: Sequence[Phase], rng: random.Random) -> list[float]:
    """Arrival offsets (seconds from the run's origin) of a Poisson process, phase by phase."""
    offsets: list[float] = []
    phase_start = 0.0
    for phase in phases:
        if phase.rate > 0:
            t = phase_start + rng.expovariate(phase.rate)
            while t < phase_start + phase.duration:
                offsets.append(t)
                t += rng.expovariate(phase.rate)
        phase_start += phase.duration
    return offsets


def status_name(error: BaseException) -> str:
    """The gRPC status name of a failed call, or the exception type for anything else."""
    if isinstance(error, grpc.RpcError):
        code = error.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
    if isinstance(error, asyncio.TimeoutError):
        return "CLIENT_TIMEOUT"
    return type(error).__name__


async def run_open_loop(
    call: Callable[[int], Awaitable[object]],
    offsets: Sequence[float],
    origin: float,
    *,
    drain_timeout: float,
    on_tick: Callable[[float], None] | None = None,
) -> list[RequestRecord]:
    """Start ``call(index)`` at ``origin + offsets[index]`` (monotonic) and record each outcome.

    After the last arrival, waits up to ``drain_timeout`` seconds for calls still running; any
    left then is cancelled and recorded as failed (``CLIENT_TIMEOUT``). ``on_tick`` gets the
    elapsed time since ``origin`` now and then (for a progress bar).
    """
    records: list[RequestRecord | None] = [None] * len(offsets)

    async def one(index: int, start: float) -> None:
        try:
            await call(index)
        except asyncio.CancelledError:
            records[index] = RequestRecord(index, start, time.monotonic(), False, "CLIENT_TIMEOUT")
            raise
        except Exception as error:
            records[index] = RequestRecord(
                index, start, time.monotonic(), False, status_name(error)
            )
        else:
            records[index] = RequestRecord(index, start, time.monotonic(), True, "OK")

    tasks: list[asyncio.Task[None]] = []
    last_tick = 0.0
    for index, offset in enumerate(offsets):
        at = origin + offset
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        # the start is the scheduled instant: a late event loop shows up as latency, not as less load
        tasks.append(asyncio.create_task(one(index, at)))
        if on_tick is not None and offset - last_tick >= 0.1:
            last_tick = offset
            on_tick(offset)
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return [record for record in records if record is not None]
