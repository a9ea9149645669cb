"""Smoke test of ``python -m benchmarks.overhead``: it runs end to end and writes well-formed JSON.

The numbers are the benchmark's business and are never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.overhead import VARIANTS
from tests.child_process import run_module


@pytest.mark.timeout(90)
def test_tiny_run_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    output = tmp_path / "overhead.json"
    completed = run_module(
        "benchmarks.overhead",
        *("--rounds", "1", "--calls", "3", "--output", str(output)),
        timeout=80,
        env={"COLUMNS": "160"},
    )
    assert completed.returncode == 0, completed.stderr
    assert "resilient_grpc" in completed.stdout and "x bare" in completed.stdout
    document = json.loads(output.read_text())
    assert document["rounds"] == 1 and document["calls_per_round"] == 3
    for flavour in ("sync", "aio"):
        rows = document["results"][flavour]
        assert set(rows) == set(VARIANTS)
        assert rows["bare"]["ratio_to_bare"] == 1.0
        for row in rows.values():
            assert row["calls"] == 3 and row["median_us"] > 0 and row["p90_us"] > 0
