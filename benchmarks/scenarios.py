"""The scenarios: an outage, an overload spike, responses lost after the commit, and two with
three replicas behind a ``round_robin`` channel: one replica 10x slower, one replica in an outage
(answering UNAVAILABLE, or, in ``partial-outage-kill``, its process killed and restarted)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.load import Phase

#: Shortest time after a trigger, so a 1 s recovery window fits even in a shortened run.
MIN_AFTER = 1.5


@dataclass(frozen=True)
class Scenario:
    """Arrival phases, the trigger window (offsets in seconds) and the fault the server plays.

    ``replicas`` > 1: that many server processes behind one ``round_robin`` channel; replica 0
    is the odd one: ``slow_factor`` times slower (the extra time passes before the call reaches
    the server's queue, dedup and handler, as on a slow host or link: the replica is slow, not
    short of capacity) and, with ``outage``, the only one in the outage.
    """

    name: str
    label: str
    phases: tuple[Phase, ...]
    trigger: tuple[float, float]
    outage: bool = False
    cut_probability: float = 0.0
    replicas: int = 1
    slow_factor: float = 1.0
    #: Replica 0's server process is SIGKILLed at the trigger's start and started again (same
    #: port, same shared dedup store) at its end: a crash, not an answer.
    kill: bool = False

    @property
    def duration(self) -> float:
        return sum(phase.duration for phase in self.phases)

    def describe(self) -> str:
        parts = [f"{p.name} {p.duration:g}s @ {p.rate:g}/s" for p in self.phases]
        if self.replicas > 1:
            parts.append(f"{self.replicas} replicas, round_robin")
        if self.slow_factor != 1.0:
            parts.append(f"replica 0 {self.slow_factor:g}x slower, before its queue")
        if self.outage:
            who = "replica 0" if self.replicas > 1 else "server"
            parts.append(f"{who} answers UNAVAILABLE during the outage")
        if self.kill:
            parts.append("replica 0's process is SIGKILLed for the outage, restarted after")
        if self.cut_probability:
            parts.append(
                f"proxy cuts {self.cut_probability:.0%} of responses after the server committed"
            )
        return "; ".join(parts)


def build_scenarios(
    *,
    rate: float,
    spike_rate: float,
    lost_rate: float,
    scale: float = 1.0,
    cut_probability: float = 0.02,
) -> tuple[Scenario, ...]:
    """The scenarios with their default timings multiplied by ``scale`` (``--quick`` shortens).

    The lost-responses scenario runs at ``lost_rate``, well under capacity, so that what it
    shows is the effect of lost responses alone (duplicates), not an overload.
    """

    def s(seconds: float) -> float:
        return round(seconds * scale, 3)

    warm = s(1.0)
    outage = Scenario(
        "outage",
        "outage (UNAVAILABLE window)",
        (
            Phase("before", warm, rate),
            Phase("outage", s(1.5), rate),
            Phase("after", max(s(2.5), MIN_AFTER), rate),
        ),
        trigger=(warm, warm + s(1.5)),
        outage=True,
    )
    overload = Scenario(
        "overload",
        "overload spike",
        (
            Phase("before", warm, rate),
            Phase("spike", max(s(2.0), 1.0), spike_rate),
            Phase("after", max(s(5.0), MIN_AFTER), rate),
        ),
        trigger=(warm, warm + max(s(2.0), 1.0)),
    )
    lost = Scenario(
        "lost",
        "lost responses (TCP proxy)",
        (Phase("cuts", s(3.0), lost_rate),),
        trigger=(0.0, s(3.0)),
        cut_probability=cut_probability,
    )
    slow = Scenario(
        "slow-replica",
        "slow replica (1 of 3, 10x slower)",
        (Phase("steady", max(s(3.0), 1.0), rate),),
        trigger=(0.0, max(s(3.0), 1.0)),
        replicas=3,
        slow_factor=10.0,
    )
    partial = Scenario(
        "partial-outage",
        "partial outage (1 of 3 replicas UNAVAILABLE)",
        (
            Phase("before", warm, rate),
            Phase("outage", s(1.5), rate),
            Phase("after", MIN_AFTER, rate),
        ),
        trigger=(warm, warm + s(1.5)),
        outage=True,
        replicas=3,
    )
    killed = Scenario(
        "partial-outage-kill",
        "partial outage (1 of 3 replicas killed)",
        partial.phases,
        trigger=partial.trigger,
        replicas=3,
        kill=True,
    )
    return (outage, overload, lost, slow, partial, killed)


SCENARIO_NAMES: tuple[str, ...] = (
    "outage",
    "overload",
    "lost",
    "slow-replica",
    "partial-outage",
    "partial-outage-kill",
)
#: What a run covers unless ``--scenarios`` says otherwise (the kill variant is asked for by
#: name, so the full run stays under 5 minutes).
DEFAULT_SCENARIOS: tuple[str, ...] = SCENARIO_NAMES[:5]
