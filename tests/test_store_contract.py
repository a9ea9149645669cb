"""Every store honours one contract: claim with a fencing token, fenced complete and release, get,
wait, lease lapse and TTL. Run against MemoryStore, SQLiteStore, a real Redis, a real Redis
Cluster and a real PostgreSQL, through the blocking interface and through the asyncio view.

Leases and TTLs lapse on the store's clock: MemoryStore and SQLiteStore get a
:class:`~tests.helpers.ShiftedClock` that :func:`elapse` moves forward, while the servers' own
expiry is what the test checks on Redis and PostgreSQL, so there :func:`elapse` sleeps (briefly)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from resilient_grpc.core.dedup import ClaimResult, Outcome, Record, RecordState, fingerprint
from resilient_grpc.stores import (
    AsyncStore,
    MemoryStore,
    PostgresStore,
    RedisStore,
    SQLiteStore,
    Store,
)
from resilient_grpc.stores.base import DirectAsyncStore
from tests.helpers import ShiftedClock, run_threads

FP_A = fingerprint(b"request-a")
FP_B = fingerprint(b"request-b")
OUTCOME = Outcome(
    "OK", "", (("x-trailer", "v"), ("x-blob-bin", b"\x00\xff")), (b"\x08\x01response",)
)


class Blocking(DirectAsyncStore):
    """Drives a blocking Store from the async scenarios (tests only: it blocks the loop)."""

    async def wait(self, key: str, timeout: float) -> Record | None:
        return await asyncio.to_thread(self.store.wait, key, timeout)


Elapse = Callable[[float], Awaitable[None]]


def _memory(_: Path, __: str, clock: ShiftedClock) -> Store:
    return MemoryStore(clock=clock)


def _sqlite(tmp_path: Path, __: str, clock: ShiftedClock) -> Store:
    return SQLiteStore(tmp_path / "dedup.sqlite3", clock=clock)


def _redis(_: Path, url: str, __: ShiftedClock) -> Store:
    return RedisStore.from_url(url)


def _postgres(_: Path, url: str, __: ShiftedClock) -> Store:
    return PostgresStore(url, table=f"dedup_{uuid.uuid4().hex}")


def _redis_cluster(_: Path, url: str, __: ShiftedClock) -> Store:
    return RedisStore.from_url(url, cluster=True)


MAKERS: dict[str, Callable[[Path, str, ShiftedClock], Store]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "postgres": _postgres,
    "redis-cluster": _redis_cluster,
}
#: the clock each store that takes one reads by default (the others keep time on their server)
CLOCKS: dict[str, Callable[[], float]] = {"memory": time.monotonic, "sqlite": time.time}
URL_FIXTURES = {"redis": "redis_url", "postgres": "postgres_url"}


def _url(name: str, request: pytest.FixtureRequest) -> str:
    if name == "redis-cluster":
        return str(request.getfixturevalue("redis_cluster").startup_url)
    fixture = URL_FIXTURES.get(name)
    return request.getfixturevalue(fixture) if fixture else ""


_ELAPSE = pytest.StashKey[Elapse]()


@pytest.fixture(params=[(name, view) for name in MAKERS for view in ("sync", "async")], ids=str)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncStore]:
    name, view = request.param
    url = _url(name, request)
    base = CLOCKS.get(name)
    clock = ShiftedClock(base or time.monotonic)

    async def elapse(seconds: float) -> None:
        if base is None:
            await asyncio.sleep(seconds)
        else:
            clock.advance(seconds)

    request.node.stash[_ELAPSE] = elapse
    blocking = MAKERS[name](tmp_path, url, clock)
    async_store = blocking.as_async() if view == "async" else Blocking(blocking)
    yield async_store
    await async_store.aclose()
    blocking.close()


@pytest.fixture
def elapse(store: AsyncStore, request: pytest.FixtureRequest) -> Elapse:
    """Let ``seconds`` pass on the store's clock: moved at once, or slept for a real server."""
    return request.node.stash[_ELAPSE]


async def test_claim_complete_replay(store: AsyncStore) -> None:
    first = await store.claim("k", FP_A, lease=5)
    assert first.token is not None and first.record is None
    again = await store.claim("k", FP_A, lease=5)
    assert again.token is None and again.record is not None
    assert again.record.state is RecordState.IN_PROGRESS
    assert again.record.fingerprint == FP_A
    assert 4 < again.record.lease_left <= 5
    assert await store.complete("k", first.token, OUTCOME)
    replay = await store.claim("k", FP_A, lease=5)
    assert replay.token is None
    assert replay.record == Record(RecordState.COMPLETED, FP_A, OUTCOME, 0.0)
    assert await store.get("k") == replay.record
    other = await store.claim("k", FP_B, lease=5)
    assert other.token is None and other.record is not None
    assert other.record.fingerprint == FP_A  # the caller sees a conflict


async def test_fencing_refuses_wrong_and_finished_tokens(store: AsyncStore) -> None:
    claim = await store.claim("k", FP_A, lease=5)
    assert claim.token is not None
    assert not await store.complete("k", claim.token + 1, OUTCOME)
    assert not await store.release("k", claim.token + 1)
    assert await store.complete("k", claim.token, OUTCOME)
    assert not await store.release("k", claim.token), "a completed record cannot be released"
    assert not await store.complete("k", claim.token, Outcome("NOT_FOUND"))
    record = await store.get("k")
    assert record is not None and record.outcome == OUTCOME
    assert not await store.complete("missing", 1, OUTCOME)


async def test_release_frees_the_key(store: AsyncStore) -> None:
    claim = await store.claim("k", FP_A, lease=5)
    assert claim.token is not None
    assert await store.release("k", claim.token)
    assert await store.get("k") is None
    again = await store.claim("k", FP_B, lease=5)
    assert again.token is not None and again.token != claim.token


async def test_lapsed_lease_lets_a_new_claim_in_and_fences_the_stale_one(
    store: AsyncStore, elapse: Elapse
) -> None:
    stale = await store.claim("k", FP_A, lease=0.05)
    assert stale.token is not None
    await elapse(0.12)
    assert await store.get("k") is None
    fresh = await store.claim("k", FP_A, lease=5)
    assert fresh.token is not None
    assert not await store.complete("k", stale.token, Outcome("OK", responses=(b"stale",)))
    assert not await store.release("k", stale.token)
    assert await store.complete("k", fresh.token, OUTCOME)
    record = await store.get("k")
    assert record is not None and record.outcome == OUTCOME


async def test_a_stale_executor_cannot_complete_after_its_lease_even_untaken(
    store: AsyncStore, elapse: Elapse
) -> None:
    stale = await store.claim("k", FP_A, lease=0.05)
    assert stale.token is not None
    await elapse(0.12)
    assert not await store.complete("k", stale.token, OUTCOME)
    assert await store.get("k") is None


async def test_renew_extends_only_the_tokens_live_claim(store: AsyncStore, elapse: Elapse) -> None:
    claim = await store.claim("k", FP_A, lease=0.2)
    assert claim.token is not None
    assert not await store.renew("k", claim.token + 1, lease=5)  # fenced: not our token
    assert not await store.renew("missing", claim.token, lease=5)
    assert await store.renew("k", claim.token, lease=5)
    await elapse(0.3)  # past the first lease: the renewal holds the key
    record = await store.get("k")
    assert record is not None and record.state is RecordState.IN_PROGRESS
    assert 4.0 < record.lease_left <= 5.0
    assert (await store.claim("k", FP_A, lease=5)).token is None
    assert await store.complete("k", claim.token, OUTCOME)
    assert not await store.renew("k", claim.token, lease=5)  # completed: nothing to renew
    record = await store.get("k")
    assert record is not None and record.outcome == OUTCOME


async def test_a_lapsed_claim_cannot_be_renewed(store: AsyncStore, elapse: Elapse) -> None:
    stale = await store.claim("k", FP_A, lease=0.05)
    assert stale.token is not None
    await elapse(0.12)
    assert not await store.renew("k", stale.token, lease=5)
    assert await store.get("k") is None


async def test_ttl_expires_completed_records(store: AsyncStore, elapse: Elapse) -> None:
    claim = await store.claim("k", FP_A, lease=5)
    assert claim.token is not None
    assert await store.complete("k", claim.token, OUTCOME, ttl=0.05)
    await elapse(0.12)
    assert await store.get("k") is None
    assert (await store.claim("k", FP_A, lease=5)).token is not None


async def test_wait_returns_the_outcome_once_completed(store: AsyncStore) -> None:
    claim = await store.claim("k", FP_A, lease=5)
    assert claim.token is not None
    token = claim.token

    async def finish_later() -> None:
        await asyncio.sleep(0.05)
        assert await store.complete("k", token, OUTCOME)

    finisher = asyncio.create_task(finish_later())
    record = await store.wait("k", 5.0)
    await finisher
    assert record is not None and record.state is RecordState.COMPLETED
    assert record.outcome == OUTCOME


async def test_wait_gives_up_at_its_timeout_or_when_released(store: AsyncStore) -> None:
    claim = await store.claim("k", FP_A, lease=5)
    assert claim.token is not None
    loop = asyncio.get_running_loop()
    started = loop.time()
    record = await store.wait("k", 0.1)
    assert record is not None and record.state is RecordState.IN_PROGRESS
    assert loop.time() - started < 2.0
    token = claim.token

    async def release_later() -> None:
        await asyncio.sleep(0.05)
        assert await store.release("k", token)

    releaser = asyncio.create_task(release_later())
    assert await store.wait("k", 5.0) is None
    await releaser


async def test_concurrent_claims_grant_exactly_one(store: AsyncStore) -> None:
    results = await asyncio.gather(*(store.claim("k", FP_A, lease=5) for _ in range(20)))
    assert sum(r.token is not None for r in results) == 1


@pytest.mark.parametrize("name", list(MAKERS))
def test_threads_claiming_one_key_get_one_token(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = _url(name, request)
    store = MAKERS[name](tmp_path, url, ShiftedClock(CLOCKS.get(name, time.monotonic)))
    results: list[ClaimResult] = []
    barrier = threading.Barrier(16)

    def claim() -> None:
        barrier.wait(timeout=5)
        results.append(store.claim("k", FP_A, lease=5))

    run_threads(claim, 16, timeout=10)
    store.close()
    assert len(results) == 16
    assert sum(r.token is not None for r in results) == 1


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    bad: list[tuple[Callable[[], Any], str]] = [
        (lambda: MemoryStore(ttl=0), "ttl must be a finite number of seconds > 0"),
        (lambda: MemoryStore(max_entries=0), "max_entries must be an integer >= 1"),
        (lambda: MemoryStore(max_bytes=10), "max_bytes must be at least"),
        (lambda: SQLiteStore(tmp_path / "x", busy_timeout=-1), "busy_timeout"),
        (lambda: SQLiteStore(tmp_path / "x", synchronous="SOMETIMES"), "synchronous must be"),
        (lambda: RedisStore("redis://x"), r"client must be a redis\.Redis"),  # type: ignore[arg-type]
    ]
    for make, message in bad:
        with pytest.raises(ValueError, match=message):
            make()
