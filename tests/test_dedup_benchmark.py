"""Smoke tests of ``python -m benchmarks.dedup_overhead --quick`` and of
``benchmarks.dedup_scale --quick``: they run end to end and write JSON of the documented shape.
The numbers are the benchmarks' business, never asserted here, except counts (Redis and
PostgreSQL round trips, duplicate executions), which are not timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.child_process import run_module


@pytest.mark.timeout(120)
def test_quick_run_writes_the_documented_json(
    tmp_path: Path, redis_url: str, postgres_url: str
) -> None:
    output = tmp_path / "dedup_overhead.json"
    completed = run_module(
        "benchmarks.dedup_overhead",
        *("--quick", "--output", str(output)),
        timeout=110,
        env={"REDIS_URL": redis_url, "POSTGRES_URL": postgres_url},
    )
    assert completed.returncode == 0, completed.stderr
    assert "DedupInterceptor cost per call (grpc.server" in completed.stdout
    report = json.loads(output.read_text())
    variants = {"none"} | {
        f"{s} {p}" for s in ("memory", "sqlite", "redis") for p in ("first", "replay")
    }
    for flavour in ("sync", "aio"):
        assert set(report[flavour]) == variants
        for row in report[flavour].values():
            assert row["calls"] == 40
            assert row["e2e_median_us"] > 0 and row["server_median_us"] > 0
        targets = report["targets"][flavour]
        assert targets["redis_first_round_trips"] == 2.0
        assert targets["redis_replay_round_trips"] == 1.0
        postgres = report["postgres"]["targets"][flavour]
        assert postgres["transactional_extra_round_trips"] == 1.0
        assert postgres["transactional_replay_round_trips"] == 1.0
        assert postgres["lease_first_round_trips"] == 2.0
        assert postgres["lease_replay_round_trips"] == 1.0
    assert set(report["fingerprint"]) == {"TransferRequest", "Struct, 20 map entries"}
    for row in report["fingerprint"].values():
        assert row["canonical_us"] > 0 and row["raw_sha256_us"] > 0 and row["deserialize_us"] > 0


@pytest.mark.timeout(120)
def test_scale_quick_run_writes_the_documented_json(tmp_path: Path) -> None:
    output = tmp_path / "dedup_scale.json"
    completed = run_module(
        "benchmarks.dedup_scale",
        *("--quick", "--only", "memory", "--output", str(output)),
        timeout=110,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(output.read_text())
    (row,) = report["stores"]["memory"]
    assert row["servers"] == 1 and row["calls"] > 0 and row["keys_executed"] > 0
    assert row["duplicate_executions"] == 0  # a count, not a timing
