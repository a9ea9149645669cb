"""The three scenarios: an outage, an overload spike, and responses lost after the commit."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.load import Phase

#: Shortest time after a trigger, so a 1 s recovery window fits even in a shortened run.
MIN_AFTER = 1.5


@dataclass(frozen=True)
class Scenario:
    """Arrival phases, the trigger window (offsets in seconds) and the fault the server plays."""

    name: str
    label: str
    phases: tuple[Phase, ...]
    trigger: tuple[float, float]
    outage: bool = False
    cut_probability: float = 0.0

    @property
    def duration(self) -> float:
        return sum(phase.duration for phase in self.phases)

    def describe(self) -> str:
        parts = [f"{p.name} {p.duration:g}s @ {p.rate:g}/s" for p in self.phases]
        if self.outage:
            parts.append("server answers UNAVAILABLE during the outage")
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
    return (outage, overload, lost)


SCENARIO_NAMES: tuple[str, ...] = ("outage", "overload", "lost")
