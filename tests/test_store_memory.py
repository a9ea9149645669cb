"""MemoryStore bounds: a flood of unique keys stays within the configured entries and bytes, the
byte accounting covers what the records really occupy, and a live claim is never evicted (a store
full of live claims refuses new ones with StoreFullError instead)."""

from __future__ import annotations

import asyncio
import threading
import tracemalloc

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from resilient_grpc.core.dedup import Outcome, RecordState, fingerprint
from resilient_grpc.stores import MemoryStore, StoreFullError
from resilient_grpc.stores.memory import ENTRY_OVERHEAD

FP = fingerprint(b"request")


def test_a_flood_of_unique_keys_stays_within_the_byte_bound() -> None:
    limit = 4 * 1024 * 1024
    store = MemoryStore(max_entries=10**7, max_bytes=limit)
    outcome = Outcome(responses=(b"r" * 20,))
    peak = 0
    total = 200_000
    for index in range(total):
        key = f"{index:064x}"
        claim = store.claim(key, FP, lease=30)
        assert claim.token is not None
        assert store.complete(key, claim.token, outcome)
        if index % 4096 == 0:
            peak = max(peak, store.bytes_used)
    peak = max(peak, store.bytes_used)
    assert peak <= limit
    record_size = store.bytes_used // len(store)
    assert len(store) == limit // record_size
    assert store.evictions == total - len(store)
    assert store.get(f"{total - 1:064x}") is not None, "the newest key is kept"
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


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("bound", ["entries", "bytes"])
def test_live_claims_are_never_evicted_and_a_full_store_refuses_new_claims(bound: str) -> None:
    clock = Clock()
    if bound == "entries":
        store = MemoryStore(max_entries=10, clock=clock)
    else:
        store = MemoryStore(max_bytes=10 * ENTRY_OVERHEAD, clock=clock)
    tokens = [store.claim(f"k{index}", FP, lease=30).token for index in range(10)]
    assert all(tokens)
    clock.now += 12  # the oldest claim's lease ends in 18 s
    with pytest.raises(StoreFullError) as refused:
        store.claim("new", FP, lease=30)
    assert refused.value.retry_after == pytest.approx(18.0)
    assert "full of live claims" in str(refused.value)
    assert store.get("new") is None
    for index in range(10):  # every claim is still held: its duplicate waits, never runs
        record = store.get(f"k{index}")
        assert record is not None and record.state is RecordState.IN_PROGRESS
        again = store.claim(f"k{index}", FP, lease=30)
        assert again.token is None
    assert store.evictions == 0
    # a released claim frees room at once
    first = tokens[0]
    assert first is not None and store.release("k0", first)
    assert store.claim("new", FP, lease=30).token is not None


def test_completed_records_are_evicted_before_any_live_claim() -> None:
    store = MemoryStore(max_entries=4)
    assert store.claim("oldest-claim", FP, lease=30).token is not None
    for key in ("done-1", "done-2"):
        claim = store.claim(key, FP, lease=30)
        assert claim.token is not None
        assert store.complete(key, claim.token, Outcome(responses=(b"r",)))
    assert store.claim("claim-2", FP, lease=30).token is not None
    assert store.claim("claim-3", FP, lease=30).token is not None  # evicts done-1
    assert store.get("done-1") is None and store.get("done-2") is not None
    assert store.claim("claim-4", FP, lease=30).token is not None  # evicts done-2
    assert store.get("done-2") is None
    assert store.get("oldest-claim") is not None
    assert store.evictions == 2
    with pytest.raises(StoreFullError):
        store.claim("claim-5", FP, lease=30)


def test_a_lapsed_claim_behind_a_longer_live_one_is_evicted_to_make_room() -> None:
    """Per-method leases: the oldest claim (a 60 s lease) is live while a newer 1 s claim has
    lapsed; a full store drops the lapsed one instead of refusing, and when every claim is
    live it names the soonest lease end, not the oldest claim's."""
    clock = Clock()
    store = MemoryStore(max_entries=3, clock=clock)
    assert store.claim("long", FP, lease=60).token is not None
    assert store.claim("short", FP, lease=1).token is not None
    assert store.claim("medium", FP, lease=5).token is not None
    clock.now += 0.5
    with pytest.raises(StoreFullError) as refused:
        store.claim("new", FP, lease=30)
    assert refused.value.retry_after == pytest.approx(0.5)  # "short" ends first
    clock.now += 1.0
    assert store.claim("new", FP, lease=30).token is not None  # "short" lapsed: dropped
    assert store.get("short") is None
    assert store.get("long") is not None and store.get("medium") is not None


def test_a_lapsed_claim_is_evicted_to_make_room() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=2, clock=clock)
    assert store.claim("short", FP, lease=1).token is not None
    assert store.claim("long", FP, lease=60).token is not None
    clock.now += 2  # "short"'s executor is presumed dead
    assert store.claim("new", FP, lease=30).token is not None
    assert store.get("long") is not None and store.get("short") is None


def test_a_renewed_claim_moves_behind_the_claims_whose_lease_ends_sooner() -> None:
    """A full store checks the front of its claim queue for a lapsed lease: a renewal must move
    its claim to the back, or a lapsed claim behind it would never be found."""
    clock = Clock()
    store = MemoryStore(max_entries=2, clock=clock)
    first = store.claim("renewed", FP, lease=10).token
    assert first is not None
    clock.now += 1
    assert store.claim("abandoned", FP, lease=10).token is not None
    clock.now += 4
    assert store.renew("renewed", first, lease=10)  # now lasts until 15; "abandoned" until 11
    clock.now += 7
    assert store.claim("new", FP, lease=10).token is not None  # "abandoned" evicted
    assert store.get("renewed") is not None and store.get("abandoned") is None


def test_an_outcome_that_cannot_fit_among_live_claims_is_stored_without_its_payload() -> None:
    store = MemoryStore(max_bytes=4 * ENTRY_OVERHEAD + 400)
    tokens = [store.claim(f"k{index}", FP, lease=30).token for index in range(4)]
    token = tokens[0]
    assert token is not None
    assert store.complete("k0", token, Outcome(responses=(b"x" * 1000,)))
    record = store.get("k0")
    assert record is not None and record.state is RecordState.COMPLETED
    assert record.outcome == Outcome("OK", omitted_bytes=1000)  # replayed as "too large"
    assert store.bytes_used <= store.max_bytes
    assert all(store.get(f"k{index}") is not None for index in range(1, 4))


def test_eviction_of_a_lapsed_claim_wakes_its_waiters() -> None:
    clock = Clock()
    store = MemoryStore(max_entries=1, clock=clock)
    assert store.claim("a", FP, lease=30).token is not None
    results: list[object] = []
    waiter = threading.Thread(target=lambda: results.append(store.wait("a", 5.0)))
    waiter.start()
    while "a" not in store._waiters:  # bounded by the join timeout below
        threading.Event().wait(0.005)
    clock.now += 31
    store.claim("b", FP, lease=30)  # evicts the lapsed claim "a"
    waiter.join(timeout=5)
    assert results == [None]


async def test_async_waiters_are_woken_by_a_completion_from_a_thread() -> None:
    store = MemoryStore()
    claim = store.claim("a", FP, lease=30)
    assert claim.token is not None
    token = claim.token
    view = store.as_async()
    timer = threading.Timer(0.05, lambda: store.complete("a", token, Outcome(responses=(b"done",))))
    timer.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    record = await view.wait("a", 10.0)
    timer.join()
    assert record is not None and record.outcome == Outcome(responses=(b"done",))
    assert loop.time() - started < 5.0


@settings(max_examples=200, stateful_step_count=60, deadline=None)
class BoundedMemoryMachine(RuleBasedStateMachine):
    """Random claims, completions, releases and time under tight bounds: a live claim is never
    dropped, a refused claim means the store is really full of live claims, bounds always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.store = MemoryStore(
            max_entries=6, max_bytes=5 * ENTRY_OVERHEAD + 900, clock=self.clock
        )
        self.claims: dict[str, tuple[int, float]] = {}  # key -> (token, lease end) we hold

    keys = st.sampled_from([f"k{index}" for index in range(10)])

    def _live_claims(self) -> dict[str, tuple[int, float]]:
        return {k: v for k, v in self.claims.items() if v[1] > self.clock.now}

    @rule(key=keys, lease=st.sampled_from([1.0, 5.0, 30.0]))
    def claim(self, key: str, lease: float) -> None:
        live_before = self._live_claims()
        try:
            result = self.store.claim(key, FP, lease=lease)
        except StoreFullError as full:
            # Really full of live claims: nothing completed and no lapsed claim is left (with
            # mixed leases too), and the refusal says when the first of them ends.
            assert len(live_before) >= 1
            assert len(self.store) == len(live_before)
            soonest = min(until for _, until in live_before.values())
            assert full.retry_after == pytest.approx(soonest - self.clock.now)
            return
        if result.token is not None:
            assert key not in live_before
            self.claims[key] = (result.token, self.clock.now + lease)

    @rule(key=keys, size=st.integers(0, 1200))
    def complete(self, key: str, size: int) -> None:
        held = self.claims.pop(key, None)
        if held is None:
            return
        token, until = held
        accepted = self.store.complete(key, token, Outcome(responses=(b"x" * size,)))
        assert accepted == (until > self.clock.now)

    @rule(key=keys)
    def release(self, key: str) -> None:
        held = self.claims.pop(key, None)
        if held is not None:
            self.store.release(key, held[0])

    @rule(seconds=st.sampled_from([0.5, 2.0, 10.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def live_claims_are_kept_and_bounds_hold(self) -> None:
        for key in self._live_claims():
            record = self.store.get(key)
            assert record is not None and record.state is RecordState.IN_PROGRESS, key
        assert len(self.store) <= self.store.max_entries
        assert self.store.bytes_used <= self.store.max_bytes


TestBoundedMemoryMachine = BoundedMemoryMachine.TestCase
