"""MemoryStore bounds: a flood of unique keys stays within the configured entries and bytes, and the
byte accounting covers what the records really occupy."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc

from resilient_grpc.core.dedup import Outcome, RecordState, fingerprint
from resilient_grpc.stores import MemoryStore
from resilient_grpc.stores.memory import ENTRY_OVERHEAD

FP = fingerprint(b"request")


def test_a_million_unique_keys_stay_within_the_byte_bound() -> None:
    limit = 4 * 1024 * 1024
    store = MemoryStore(max_entries=10**7, max_bytes=limit)
    peak = 0
    for index in range(1_000_000):
        store.claim(f"{index:064x}", FP, lease=30)
        if index % 4096 == 0:
            peak = max(peak, store.bytes_used)
    peak = max(peak, store.bytes_used)
    assert peak <= limit
    assert len(store) == limit // ENTRY_OVERHEAD
    assert store.evictions == 1_000_000 - len(store)
    assert store.get(f"{999_999:064x}") is not None, "the newest key is kept"
    assert store.get(f"{0:064x}") is None, "the oldest keys are evicted first"


def test_entries_bound() -> None:
    store = MemoryStore(max_entries=100)
    for index in range(1000):
        claim = store.claim(f"k{index}", FP, lease=30)
        assert claim.token is not None
        store.complete(f"k{index}", claim.token, Outcome(responses=(b"r",)))
    assert len(store) == 100
    assert store.get("k899") is None and store.get("k900") is not None


def test_accounting_covers_the_real_memory_of_completed_records() -> None:
    store = MemoryStore(max_entries=10**6, max_bytes=10**9)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index in range(5000):
            key = f"{index:064x}"
            claim = store.claim(key, FP, lease=30)
            assert claim.token is not None
            outcome = Outcome(
                "OK", "", (("x-request-id", f"id-{index}"),), (index.to_bytes(4, "big") * 10,)
            )
            store.complete(key, claim.token, outcome)
        real = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert real <= store.bytes_used, (real, store.bytes_used)


def test_an_oversized_outcome_evicts_older_records_but_never_the_bound() -> None:
    store = MemoryStore(max_entries=1000, max_bytes=64 * 1024)
    for index in range(50):
        store.claim(f"k{index}", FP, lease=30)
    claim = store.claim("big", FP, lease=30)
    assert claim.token is not None
    assert store.complete("big", claim.token, Outcome(responses=(b"x" * 40_000,)))
    assert store.bytes_used <= 64 * 1024
    record = store.get("big")
    assert record is not None and record.state is RecordState.COMPLETED


def test_eviction_wakes_waiters() -> None:
    store = MemoryStore(max_entries=1)
    assert store.claim("a", FP, lease=30).token is not None
    results: list[object] = []
    waiter = threading.Thread(target=lambda: results.append(store.wait("a", 5.0)))
    waiter.start()
    while "a" not in store._waiters:  # bounded by the join timeout below
        threading.Event().wait(0.005)
    store.claim("b", FP, lease=30)  # evicts "a"
    waiter.join(timeout=5)
    assert results == [None]


async def test_async_waiters_are_woken_by_a_completion_from_a_thread() -> None:
    store = MemoryStore()
    claim = store.claim("a", FP, lease=30)
    assert claim.token is not None
    token = claim.token
    view = store.as_async()
    timer = threading.Timer(
        0.05, lambda: store.complete("a", token, Outcome(responses=(b"done",)))
    )
    timer.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    record = await view.wait("a", 10.0)
    timer.join()
    assert record is not None and record.outcome == Outcome(responses=(b"done",))
    assert loop.time() - started < 5.0
