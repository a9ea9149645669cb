"""Compare retry policies under an outage, an overload spike and lost responses, on real gRPC.

Run ``python -m benchmarks`` (or ``python benchmarks/compare_policies.py``); ``--quick`` for a
short look. Each policy meets each scenario in a fresh model server (see
:mod:`benchmarks.server_model`: fixed workers, bounded queue, handlers that keep executing
abandoned work) running in its own process, driven by an open-loop Poisson load
(:mod:`benchmarks.load`) from a ``grpc.aio`` client. Output: a table per scenario, JSON at
``benchmarks/results/compare_policies.json`` and a plot at
``benchmarks/results/compare_policies.png``. Metric definitions: :mod:`benchmarks.metrics`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `protos` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from benchmarks import metrics as metrics_module
from benchmarks import report
from benchmarks.dedup_overhead import redis_url as shared_redis
from benchmarks.load import poisson_schedule, run_open_loop
from benchmarks.policies import (
    DEFAULT_POLICIES,
    POLICIES,
    POLICY_NAMES,
    ClientSettings,
    Policy,
)
from benchmarks.scenarios import DEFAULT_SCENARIOS, SCENARIO_NAMES, Scenario, build_scenarios
from benchmarks.server_model import PROXY_COUNTERS, CapacityConfig, ServerProcess
from protos import ledger_pb2

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_SCALE = 0.35
QUICK_POLICIES = ("no-retry", "budget", "full-stack", "grpc-native")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=(
            "Compare retry policies (no retry, naive x3, exponential with/without jitter, "
            "retry budget, circuit breaker, adaptive throttle, hedging with server dedup, the full "
            "resilient-grpc stack with server dedup and overload protection, naive x3 against a "
            "protected server, gRPC native retry, tenacity) under an outage, an overload spike, "
            "lost responses, and, with three replicas behind round_robin, a 10x slower replica "
            "and a partial outage."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"shorter scenarios (x{QUICK_SCALE}) and fewer policies "
        f"({', '.join(QUICK_POLICIES)}) unless --policies is given",
    )
    parser.add_argument(
        "--policies",
        help=f"comma-separated subset of: {', '.join(POLICY_NAMES)} (default: all but "
        "exp-no-jitter and tenacity)",
    )
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated subset of: {', '.join(SCENARIO_NAMES)} (default: all but "
        "partial-outage-kill)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply scenario durations (default 1, or the --quick value)",
    )
    parser.add_argument("--rate", type=float, default=180.0, help="normal arrival rate (req/s)")
    parser.add_argument(
        "--spike-rate",
        type=float,
        default=450.0,
        help="arrival rate during the overload spike (req/s)",
    )
    parser.add_argument(
        "--lost-rate",
        type=float,
        default=100.0,
        help="arrival rate of the lost-responses scenario (req/s)",
    )
    parser.add_argument("--workers", type=int, default=8, help="server workers")
    parser.add_argument("--queue", type=int, default=128, help="server queue bound")
    parser.add_argument(
        "--service-time",
        type=float,
        default=0.028,
        help="server work per call, seconds (capacity = workers / service time)",
    )
    parser.add_argument(
        "--cut-probability",
        type=float,
        default=0.02,
        help="fraction of responses the proxy cuts in the lost-responses scenario",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of arrivals and cuts")
    parser.add_argument(
        "--output-dir", type=Path, default=RESULTS_DIR, help="where compare_policies.json / .png go"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--shared-store",
        choices=("sqlite", "redis"),
        default="sqlite",
        help="the dedup store the replicas of the three-replica scenarios share: an embedded "
        "SQLiteStore file (on tmpfs where there is one; no server needed) or a RedisStore on a "
        "redis-server the run starts (or REDIS_URL)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="also print the tables as markdown (for the README)"
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.policy_list = (
        _pick(args.policies, POLICY_NAMES, "--policies")
        if args.policies
        else (list(QUICK_POLICIES) if args.quick else list(DEFAULT_POLICIES))
    )
    args.scenario_list = (
        _pick(args.scenarios, SCENARIO_NAMES, "--scenarios")
        if args.scenarios
        else list(DEFAULT_SCENARIOS)
    )
    if args.scale is None:
        args.scale = QUICK_SCALE if args.quick else 1.0
    if not args.scale > 0:
        parser.error(f"--scale must be > 0, got {args.scale}")
    return args


def _pick(value: str, known: Sequence[str], flag: str) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen:
        raise SystemExit(
            f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(known)}"
        )
    return chosen


@contextmanager
def shared_dedup_store(kind: str) -> Iterator[str]:
    """Where the replicas' shared dedup records live: a ``redis://`` URL, or the path of an
    embedded SQLite file (in ``/dev/shm`` when it exists, so it stays in memory)."""
    if kind == "redis":
        with shared_redis() as url:
            yield url
        return
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="bench-dedup-", dir=base) as directory:
        yield os.path.join(directory, "dedup.sqlite3")


async def run_trial(
    servers: Sequence[ServerProcess],
    proxy: ServerProcess,
    scenario: Scenario,
    policy: Policy,
    *,
    settings: ClientSettings,
    capacity: CapacityConfig,
    seed: int,
    on_tick: Callable[[float], None],
    shared_store: str | None = None,
) -> metrics_module.TrialMetrics:
    """One policy against one scenario on fresh servers (``scenario.replicas`` of them, each in
    its own process: replica 0 plays the slow or failing one); returns its metrics."""
    replicas = servers[: scenario.replicas]
    shared = scenario.replicas > 1 and policy.server_dedup
    if shared and shared_store is None:
        raise RuntimeError("replicas with server dedup need a shared store (shared_store)")

    def start(index: int, port: int = 0) -> int:
        odd = index == 0
        factor = scenario.slow_factor if odd else 1.0
        return int(
            replicas[index].request(
                cmd="start",
                port=port,
                # a slow replica takes factor x the service time, the extra before the queue
                workers=capacity.workers,
                queue=capacity.queue,
                service_time=capacity.service_time,
                delay=capacity.service_time * (factor - 1.0),
                dedup=policy.server_dedup,
                dedup_shared=shared_store if shared else None,
                dedup_prefix=f"bench:{seed}:{scenario.name}:{policy.name}:",
                protected=policy.server_protected,
                outage=list(scenario.trigger) if scenario.outage and odd else None,
            )["port"]
        )

    ports = [start(index) for index in range(len(replicas))]
    #: Logs of replica 0 taken just before it was killed (its process loses them).
    before_kill: dict[str, Any] = {"attempts": [], "executions": []}
    options: list[tuple[str, Any]] = []
    if scenario.replicas > 1:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        options.append(("grpc.lb_policy_name", "round_robin"))
    else:
        port = ports[0]
        if scenario.cut_probability:
            port = proxy.request(
                cmd="proxy", upstream=port, cut_probability=scenario.cut_probability, seed=seed
            )["port"]
        target = f"127.0.0.1:{port}"
    # the driver's heap grows trial after trial; without this, its full garbage collections
    # (measured: 36-255 ms in the later trials of a full run) land in whichever trial happens
    # to be running and decide the p99 of neighbouring rows
    gc.collect()
    gc.freeze()
    offsets = poisson_schedule(scenario.phases, random.Random(seed))
    keys = [f"{scenario.name}-{policy.name}-{index}" for index in range(len(offsets))]
    client = policy.connect(target, settings, options)
    try:
        await asyncio.wait_for(client.channel.channel_ready(), timeout=10)
        if scenario.replicas > 1:  # round_robin: every replica connected before the load starts
            await _warm_up(client, scenario.replicas)
        origin = time.monotonic() + 0.05
        for server in replicas:
            server.request(cmd="go", origin=origin)

        async def one(index: int) -> None:
            await client.call(
                ledger_pb2.TransferRequest(
                    from_account=f"acct-{index % 64}",
                    to_account="sink",
                    amount=1,
                    memo=keys[index],
                )
            )

        async def kill_and_restart() -> None:
            """SIGKILL replica 0 for the trigger window, then start it again on its port."""
            await asyncio.sleep(max(origin + scenario.trigger[0] - time.monotonic(), 0.0))
            victim = replicas[0]
            before_kill.update(await asyncio.to_thread(victim.request, cmd="logs"))
            await asyncio.to_thread(victim.kill)
            await asyncio.sleep(max(origin + scenario.trigger[1] - time.monotonic(), 0.0))
            await asyncio.to_thread(start, 0, ports[0])
            await asyncio.to_thread(victim.request, cmd="go", origin=origin)

        killer = asyncio.ensure_future(kill_and_restart()) if scenario.kill else None
        client_lags: list[tuple[float, float]] = []
        client_gc: list[tuple[float, float]] = []
        watch = asyncio.create_task(_watch_loop(client_lags, client_gc))
        try:
            records = await run_open_loop(
                one, offsets, origin, drain_timeout=settings.deadline + 1.0, on_tick=on_tick
            )
        finally:
            if killer is not None:
                await killer  # bounded: it ends at the trigger's end, inside the run
            watch.cancel()
            with suppress(asyncio.CancelledError):
                await watch
    finally:
        await client.close()
    counters = (
        proxy.request(cmd="proxy_stop")
        if scenario.cut_probability and scenario.replicas == 1
        else None
    )
    attempts: list[tuple[float, str]] = []
    executions: list[tuple[float, str, bool]] = []
    decisions: list[tuple[float, str, int, int, float]] = []
    server_lags: list[tuple[float, float]] = []
    for index, server in enumerate(replicas):
        logs = server.request(cmd="stop", drain_timeout=3.0)
        if index == 0 and scenario.kill:  # what it saw before it was killed, then after
            logs["attempts"] = [*before_kill["attempts"], *logs["attempts"]]
            logs["executions"] = [*before_kill["executions"], *logs["executions"]]
        decisions += [tuple(d) for d in logs.get("admission", ())]
        server_lags += [(float(t), float(lag)) for t, lag in logs.get("lags", ())]
        attempts += [(float(t), str(code)) for t, code in logs["attempts"] if float(t) >= origin]
        executions += [
            (float(t), str(key), bool(late))
            for t, key, late in logs["executions"]
            if str(key).startswith(f"{scenario.name}-")  # not the warm-up calls
        ]
    result = metrics_module.compute(
        records,
        keys,
        sorted(attempts),
        sorted(executions),
        origin=origin,
        trigger=scenario.trigger,
        duration=scenario.duration,
    )
    if counters is not None:
        result.proxy = {name: counters[name] for name in PROXY_COUNTERS}
    span = len(result.series["t"]) * metrics_module.SERIES_BIN
    if policy.server_protected:
        result.admission = metrics_module.admission_summary(
            sorted(decisions), origin=origin, trigger=scenario.trigger, span=span
        )
    result.stalls = {
        "client_ms": metrics_module.stall_series(client_lags, origin=origin, span=span),
        "server_ms": metrics_module.stall_series(sorted(server_lags), origin=origin, span=span),
        "client_gc2_ms": metrics_module.stall_series(client_gc, origin=origin, span=span),
    }
    return result


async def _watch_loop(
    lags: list[tuple[float, float]], pauses: list[tuple[float, float]], tick: float = 0.01
) -> None:
    """Until cancelled, record how late a 10 ms sleep wakes up on the client's event loop
    (``lags``) and how long each full (generation 2) garbage collection of the client process
    took (``pauses``): (end time, seconds)."""
    began: list[float] = []

    def gc_pause(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began.append(time.monotonic())
        elif began:
            now = time.monotonic()
            if info.get("generation") == 2:
                pauses.append((now, now - began[-1]))
            began.clear()

    gc.callbacks.append(gc_pause)
    try:
        while True:
            before = time.monotonic()
            await asyncio.sleep(tick)
            now = time.monotonic()
            lags.append((now, now - before - tick))
    finally:
        gc.callbacks.remove(gc_pause)


async def _warm_up(client: Any, replicas: int) -> None:
    """A few calls so the ``round_robin`` channel has a connection to every replica (their
    attempts arrive before the origin and count in no window; their executions are dropped)."""
    for index in range(2 * replicas):
        with suppress(grpc.RpcError):
            await client.call(
                ledger_pb2.TransferRequest(
                    from_account="warm-up", to_account="sink", amount=1, memo=f"warm-up-{index}"
                )
            )


def scenario_document(scenario: Scenario) -> dict[str, Any]:
    return {
        "name": scenario.name,
        "label": scenario.label,
        "description": scenario.describe(),
        "phases": [asdict(phase) for phase in scenario.phases],
        "trigger": list(scenario.trigger),
        "duration": scenario.duration,
        "has_after": scenario.trigger[1] < scenario.duration,
        "cut_probability": scenario.cut_probability,
    }


Results = dict[str, dict[str, metrics_module.TrialMetrics]]


async def run(args: argparse.Namespace, console: Console) -> tuple[dict[str, Any], Results]:
    """Every selected policy against every selected scenario: the JSON document and the metrics."""
    settings = ClientSettings()
    capacity = CapacityConfig(args.workers, args.queue, args.service_time)
    scenarios = [
        s
        for s in build_scenarios(
            rate=args.rate,
            spike_rate=args.spike_rate,
            lost_rate=args.lost_rate,
            scale=args.scale,
            cut_probability=args.cut_probability,
        )
        if s.name in args.scenario_list
    ]
    policies = [p for p in POLICIES if p.name in args.policy_list]
    results: Results = {}
    console.print(setup_line(settings, capacity))
    began = time.monotonic()
    total = sum(s.duration for s in scenarios) * len(policies)
    replicas = max(s.replicas for s in scenarios)
    needs_shared = any(s.replicas > 1 for s in scenarios) and any(p.server_dedup for p in policies)
    with (
        ExitStack() as stack,
        ServerProcess() as proxy,
        Progress(
            TextColumn("{task.description:<44}"),
            BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress,
    ):
        servers = [stack.enter_context(ServerProcess()) for _ in range(replicas)]
        shared_store = (
            stack.enter_context(shared_dedup_store(args.shared_store)) if needs_shared else None
        )
        bar = progress.add_task("starting", total=total)
        done = 0.0
        for scenario in scenarios:
            results[scenario.name] = {}
            for policy in policies:
                progress.update(bar, description=f"{scenario.name}: {policy.label}")

                def tick(elapsed: float, base: float = done) -> None:
                    progress.update(bar, completed=base + elapsed)

                results[scenario.name][policy.name] = await run_trial(
                    servers,
                    proxy,
                    scenario,
                    policy,
                    settings=settings,
                    capacity=capacity,
                    seed=args.seed,
                    on_tick=tick,
                    shared_store=shared_store,
                )
                done += scenario.duration
                progress.update(bar, completed=done)
        progress.update(bar, description="done")
    document = {
        "command": " ".join(["python -m benchmarks", *args.argv]),
        "elapsed_s": round(time.monotonic() - began, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "platform": platform.platform(),
        },
        "settings": asdict(settings),
        "server": {**asdict(capacity), "capacity_per_s": round(capacity.capacity, 1)},
        "scenarios": [scenario_document(s) for s in scenarios],
        "policies": {
            p.name: {
                "label": p.label,
                "description": p.description,
                "server_dedup": p.server_dedup,
                "server_protected": p.server_protected,
            }
            for p in policies
        },
        "definitions": metrics_module.__doc__,
        "results": {
            scenario: {name: m.to_json() for name, m in trials.items()}
            for scenario, trials in results.items()
        },
    }
    return document, results


def setup_line(settings: ClientSettings, capacity: CapacityConfig) -> str:
    """One line saying what the server can do and what every client is allowed."""
    return (
        f"server: {capacity.workers} workers x {capacity.service_time * 1000:g} ms = "
        f"{capacity.capacity:.0f} calls/s, queue {capacity.queue}, keeps executing abandoned "
        f"work; clients: {settings.max_attempts} attempts x {settings.attempt_timeout * 1000:g} ms, "
        f"deadline {settings.deadline * 1000:g} ms, backoff {settings.initial_backoff * 1000:g} ms "
        f"x{settings.multiplier:g}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console()
    if console.width < 132:  # the tables need 132 columns; wider output beats wrapped cells
        console = Console(width=132)
    document, results = asyncio.run(run(args, console))
    labels = {name: document["policies"][name]["label"] for name in document["policies"]}
    report.print_tables(console, document["scenarios"], results, labels)
    json_path = args.output_dir / "compare_policies.json"
    report.write_json(json_path, document)
    console.print(f"JSON: {json_path}")
    if not args.no_plot:
        png_path = args.output_dir / "compare_policies.png"
        report.write_plot(png_path, document["scenarios"], results, labels)
        console.print(f"plot: {png_path}")
    if args.markdown:
        console.print(
            report.markdown(document["scenarios"], results, labels),
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"finished in {document['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
