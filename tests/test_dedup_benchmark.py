"""Smoke test of ``python -m benchmarks.dedup_overhead --quick``: it runs end to end and writes
JSON of the documented shape. The numbers are the benchmark's business, never asserted here,
except the Redis round-trip counts, which are counts, not timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_quick_run_writes_the_documented_json(tmp_path: Path, redis_url: str) -> None:
    output = tmp_path / "dedup_overhead.json"
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.dedup_overhead", "--quick", "--output", str(output)],
        cwd=REPO,
        env={**os.environ, "REDIS_URL": redis_url, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert completed.returncode == 0, completed.stderr
    assert "DedupInterceptor cost per call (grpc.server" in completed.stdout
    report = json.loads(output.read_text())
    variants = {"none"} | {f"{s} {p}" for s in ("memory", "sqlite", "redis") for p in ("first", "replay")}
    for flavour in ("sync", "aio"):
        assert set(report[flavour]) == variants
        for row in report[flavour].values():
            assert row["calls"] == 40
            assert row["e2e_median_us"] > 0 and row["server_median_us"] > 0
        targets = report["targets"][flavour]
        assert targets["redis_first_round_trips"] == 2.0
        assert targets["redis_replay_round_trips"] == 1.0
