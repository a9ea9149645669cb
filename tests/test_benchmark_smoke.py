"""Smoke test of ``python -m benchmarks``: it runs end to end and its outputs have the right shape.

Speed and the numbers themselves are the benchmark's business, never asserted here. The run is
``--quick`` cut down to two policies (one without and one with the toolkit: the full stack,
hedging and server dedup included) and shorter scenarios, every scenario included (the two with
three replica processes behind ``round_robin`` share a Redis dedup store), to keep the suite
fast; plus small checks of the metric definitions on hand-made records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from benchmarks import client_cpu
from benchmarks.load import Phase, RequestRecord, poisson_schedule
from benchmarks.metrics import compute, time_to_recover
from benchmarks.policies import POLICY_NAMES
from tests.child_process import run_module

METRIC_FIELDS = {
    "requests",
    "succeeded",
    "goodput",
    "amplification_during",
    "amplification_after",
    "p50_ms",
    "p99_ms",
    "p999_ms",
    "duplicates",
    "lost",
    "time_to_recover",
    "series",
}


ALL_SCENARIOS = ["outage", "overload", "lost", "slow-replica", "partial-outage"]


@pytest.mark.timeout(150)
def test_quick_run_writes_table_json_and_plot(tmp_path: Path) -> None:
    # the replicas share an embedded SQLite dedup store (the default): no server needed
    completed = run_module(
        "benchmarks",
        *("--quick", "--scale", "0.25", "--policies", "naive-x3,full-stack"),
        *("--output-dir", str(tmp_path)),
        timeout=140,
        env={"COLUMNS": "140"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    out = completed.stdout
    for title in ("outage", "overload spike", "lost responses", "slow replica", "partial outage"):
        assert title in out
    for label in ("naive retry x3", "full stack (hedging"):
        assert label in out
    assert "p99.9" in out

    document = json.loads((tmp_path / "compare_policies.json").read_text())
    assert set(document["results"]) == set(ALL_SCENARIOS)
    assert [s["name"] for s in document["scenarios"]] == ALL_SCENARIOS
    for scenario, trials in document["results"].items():
        assert set(trials) == {"naive-x3", "full-stack"}, scenario
        for metrics in trials.values():
            assert set(metrics) >= METRIC_FIELDS
            assert metrics["requests"] > 0
            assert 0.0 <= metrics["goodput"] <= 1.0
            series = metrics["series"]
            assert len(series["t"]) == len(series["server_attempts"]) == len(series["goodput"])
    assert document["results"]["lost"]["full-stack"]["proxy"]["connections"] >= 1
    # three replicas answered (their attempts are merged), and the hedged, keyed writes of the
    # full stack ran once each although copies of one call reached different replicas
    for scenario in ("slow-replica", "partial-outage"):
        full = document["results"][scenario]["full-stack"]
        assert full["server_attempts"] >= full["requests"] > 0
        assert full["duplicates"] == 0, scenario
    partial = document["results"]["partial-outage"]["naive-x3"]["server_status"]
    assert partial.get("UNAVAILABLE", 0) >= 1  # replica 0 played its outage

    png = (tmp_path / "compare_policies.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_unknown_policy_is_refused() -> None:
    completed = run_module("benchmarks", "--policies", "naive-x3,nonsense", timeout=30)
    assert completed.returncode != 0
    assert "nonsense" in completed.stderr
    assert "naive-x3" in POLICY_NAMES


def test_poisson_schedule_follows_the_phase_rates() -> None:
    phases = (Phase("low", 20.0, 50.0), Phase("high", 20.0, 200.0))
    offsets = poisson_schedule(phases, random.Random(7))
    low = sum(1 for t in offsets if t < 20.0)
    high = len(offsets) - low
    assert offsets == sorted(offsets) and offsets[-1] < 40.0
    assert 800 < low < 1200 and 3600 < high < 4400


def _records(spec: list[tuple[float, bool]]) -> list[RequestRecord]:
    return [
        RequestRecord(i, t, t + 0.01, ok, "OK" if ok else "UNAVAILABLE")
        for i, (t, ok) in enumerate(spec)
    ]


def test_time_to_recover_is_the_first_good_second_after_the_trigger() -> None:
    # 10 arrivals a second; everything fails until 2.5 s after the trigger (which ends at 1.0)
    spec = [(i / 10, i / 10 >= 3.5) for i in range(80)]
    assert time_to_recover(_records(spec), 0.0, 1.0, 8.0) == pytest.approx(2.5)
    never = [(i / 10, False) for i in range(80)]
    assert time_to_recover(_records(never), 0.0, 1.0, 8.0) is None


def test_metrics_count_duplicates_lost_and_amplification() -> None:
    records = _records([(0.1, True), (0.2, False), (0.3, False), (1.5, True)])
    keys = ["a", "b", "c", "d"]
    attempts = [
        (0.1, "OK"),
        (0.2, "UNAVAILABLE"),
        (0.21, "OK"),
        (0.3, "UNAVAILABLE"),
        (0.35, "UNAVAILABLE"),
        (1.5, "OK"),
    ]
    executions = [(0.15, "a", False), (0.16, "a", False), (0.25, "b", True), (1.52, "d", False)]
    metrics = compute(
        records, keys, attempts, executions, origin=0.0, trigger=(0.0, 1.0), duration=2.0
    )
    assert metrics.duplicates == 1  # "a" ran twice
    assert metrics.lost == 1  # "c" failed and never ran; "b" failed but was applied
    assert metrics.failed_applied == 1
    assert metrics.amplification_during == pytest.approx(5 / 3, abs=1e-3)
    assert metrics.amplification_after == pytest.approx(1.0)
    assert metrics.goodput == pytest.approx(0.5)


@pytest.mark.timeout(120)
def test_the_kill_variant_of_the_partial_outage_kills_and_restarts_replica_0(
    tmp_path: Path,
) -> None:
    completed = run_module(
        "benchmarks",
        "--scale",
        "0.25",
        "--scenarios",
        "partial-outage-kill",
        "--policies",
        "no-retry,full-stack",
        "--no-plot",
        "--output-dir",
        str(tmp_path),
        timeout=110,
        env={"COLUMNS": "140"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:] + completed.stdout[-3000:]
    document = json.loads((tmp_path / "compare_policies.json").read_text())
    (scenario,) = document["scenarios"]
    assert scenario["name"] == "partial-outage-kill"
    assert "SIGKILL" in scenario["description"]
    trials = document["results"]["partial-outage-kill"]
    # no retry loses the calls in flight on the killed replica and those sent to it while down
    assert trials["no-retry"]["succeeded"] < trials["no-retry"]["requests"]
    full = trials["full-stack"]
    assert full["duplicates"] == 0
    # replica 0's log before the kill and after the restart are both counted
    assert full["server_attempts"] >= full["requests"] > 0


@pytest.mark.parametrize("flavour", [(), ("--aio",)], ids=["sync", "aio"])
def test_client_cpu_loop_runs_every_variant(flavour: tuple[str, ...]) -> None:
    """The loop ``benchmarks.client_cpu`` runs under callgrind (here without it)."""
    for variant in client_cpu.VARIANTS:
        completed = run_module(
            "benchmarks.client_cpu",
            "--run",
            variant,
            "--calls",
            "3",
            "--warmup",
            "1",
            *flavour,
            timeout=60,
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
