"""Output of the comparison: a rich table per scenario, a markdown table, the JSON and the PNG."""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from benchmarks.metrics import TrialMetrics

COLUMNS = (
    "policy",
    "goodput",
    "goodput after",
    "ok/s during",
    "amp. during",
    "amp. after",
    "p50 ms",
    "p99 ms",
    "p99.9 ms",
    "dup. exec.",
    "lost",
    "recover",
)


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def row(label: str, metrics: TrialMetrics, *, has_after: bool, run_after: float) -> list[str]:
    """The table cells of one trial."""
    if not has_after:
        recover = "-"
    elif metrics.time_to_recover is None:
        recover = f"> {run_after:g} s"
    else:
        recover = f"{metrics.time_to_recover:.1f} s"
    return [
        label,
        f"{metrics.goodput:.1%}",
        "-" if metrics.goodput_after is None else f"{metrics.goodput_after:.1%}",
        _num(metrics.goodput_during_per_s, ".0f"),
        _num(metrics.amplification_during, ".2f") + ("x" if metrics.amplification_during else ""),
        _num(metrics.amplification_after, ".2f") + ("x" if metrics.amplification_after else ""),
        _num(metrics.p50_ms, ".0f"),
        _num(metrics.p99_ms, ".0f"),
        _num(metrics.p999_ms, ".0f"),
        str(metrics.duplicates),
        str(metrics.lost),
        recover,
    ]


def scenario_rows(
    scenario: Mapping[str, Any],
    results: Mapping[str, TrialMetrics],
    labels: Mapping[str, str],
) -> list[list[str]]:
    has_after = bool(scenario["has_after"])
    run_after = float(scenario["duration"]) - float(scenario["trigger"][1]) - 1.0
    return [
        row(labels[name], metrics, has_after=has_after, run_after=max(run_after, 0.0))
        for name, metrics in results.items()
    ]


def print_tables(
    console: Console,
    scenarios: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, TrialMetrics]],
    labels: Mapping[str, str],
) -> None:
    """One rich table per scenario."""
    for scenario in scenarios:
        if scenario["name"] not in results:
            continue
        table = Table(title=f"{scenario['label']}: {scenario['description']}", title_justify="left")
        for index, column in enumerate(COLUMNS):
            table.add_column(column, justify="left" if index == 0 else "right", no_wrap=index == 0)
        for cells in scenario_rows(scenario, results[scenario["name"]], labels):
            table.add_row(*cells)
        console.print(table)


def markdown(
    scenarios: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, TrialMetrics]],
    labels: Mapping[str, str],
) -> str:
    """The same tables in GitHub markdown (for the README)."""
    out: list[str] = []
    for scenario in scenarios:
        if scenario["name"] not in results:
            continue
        out.append(f"**{scenario['label']}**: {scenario['description']}\n")
        out.append("| scenario | " + " | ".join(COLUMNS) + " |")
        out.append("|---" * (len(COLUMNS) + 1) + "|")
        for cells in scenario_rows(scenario, results[scenario["name"]], labels):
            out.append(f"| {scenario['name']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def environment() -> dict[str, str]:
    """Where a result was measured, for every benchmark's JSON: Python, grpcio, platform."""
    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(),
    }


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write a benchmark's result document (its directory is made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=False) + "\n")


def write_plot(
    path: Path,
    scenarios: Sequence[Mapping[str, Any]],
    results: Mapping[str, Mapping[str, TrialMetrics]],
    labels: Mapping[str, str],
) -> None:
    """Server attempts/s and goodput/s over time: one row per policy, one column per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in scenarios if s["name"] in results]
    policies = list(labels)
    if not shown or not policies:
        return
    fig, axes = plt.subplots(
        len(policies),
        len(shown),
        figsize=(4.6 * len(shown), 1.7 * len(policies) + 0.8),
        sharex="col",
        squeeze=False,
    )
    for col, scenario in enumerate(shown):
        top = 0.0
        for trial in results[scenario["name"]].values():
            top = max(top, *trial.series.get("server_attempts", [0.0]))
        for row_index, name in enumerate(policies):
            ax = axes[row_index][col]
            metrics = results[scenario["name"]].get(name)
            if metrics is None:
                ax.set_visible(False)
                continue
            series = metrics.series
            start, end = scenario["trigger"]
            ax.axvspan(start, end, color="tab:red", alpha=0.12, lw=0)
            ax.plot(series["t"], series["offered"], color="0.6", lw=1, ls="--", label="offered/s")
            ax.plot(
                series["t"],
                series["server_attempts"],
                color="tab:orange",
                lw=1.3,
                label="server attempts/s",
            )
            ax.plot(series["t"], series["goodput"], color="tab:green", lw=1.3, label="goodput/s")
            ax.plot(
                series["t"],
                series["late_executions"],
                color="tab:red",
                lw=0.9,
                ls=":",
                label="executions after the deadline/s",
            )
            ax.set_ylim(0, top * 1.05 + 1)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel(labels[name], fontsize=8)
            if row_index == 0:
                ax.set_title(scenario["label"], fontsize=9)
            if row_index == len(policies) - 1:
                ax.set_xlabel("seconds", fontsize=8)
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
