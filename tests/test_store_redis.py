"""RedisStore specifics: key layout (hash tag, no raw key), round trips per operation, client kinds,
and a precise StoreUnavailableError when Redis is not there."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio

from resilient_grpc.core.dedup import Outcome, fingerprint, scoped_key
from resilient_grpc.stores import RedisStore, StoreUnavailableError
from resilient_grpc.stores.redis import DEFAULT_PREFIX
from resilient_grpc.testing.redis_round_trips import RoundTripCounter
from tests.redis_server import free_port

FP = fingerprint(b"request")


def test_keys_are_hash_tagged_digests(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    key = scoped_key("/ledger.v1.Ledger/Transfer", "tenant-1", "raw-key-123")
    claim = store.claim(key, FP, lease=5)
    assert claim.token is not None
    assert store.complete(key, claim.token, Outcome(responses=(b"ok",)))
    client = redis.Redis.from_url(redis_url)
    names = [name.decode() for name in client.scan_iter("*")]
    assert names == [f"{DEFAULT_PREFIX}{{{key}}}"]
    stored = client.get(names[0])
    assert stored is not None and b"raw-key-123" not in stored
    assert 0 < client.pttl(names[0]) <= 24 * 3600 * 1000
    client.close()
    store.close()


def test_round_trips_two_for_a_first_execution_one_for_a_replay(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    warm = store.claim("warm-up", FP, lease=5)  # loads the scripts, opens the connection
    assert warm.token is not None
    store.complete("warm-up", warm.token, Outcome())
    counter = RoundTripCounter(client)
    claim = store.claim("k", FP, lease=5)
    assert claim.token is not None
    assert store.complete("k", claim.token, Outcome(responses=(b"ok",)))
    first_execution = counter.count()
    counter.reset()
    replay = store.claim("k", FP, lease=5)
    replay_round_trips = counter.count()
    assert replay.record is not None and replay.record.outcome == Outcome(responses=(b"ok",))
    assert (first_execution, replay_round_trips) == (2, 1)
    client.close()
    store.close()


def test_store_down_raises_a_precise_error() -> None:
    port = free_port()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    with pytest.raises(StoreUnavailableError) as error:
        store.claim("k", FP, lease=5)
    message = str(error.value)
    assert message.startswith(f"Redis store at 127.0.0.1:{port}/0 failed: ConnectionError:")
    assert "refused" in message.lower() or "connect" in message.lower()
    store.close()


async def test_store_down_raises_a_precise_error_async() -> None:
    port = free_port()
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", socket_connect_timeout=0.5)
    view = store.as_async()
    with pytest.raises(StoreUnavailableError, match=rf"^Redis store at 127.0.0.1:{port}/0 failed"):
        await view.get("k")
    await view.aclose()
    store.close()


async def test_client_kinds(redis_url: str) -> None:
    sync_only = RedisStore(redis.Redis.from_url(redis_url))
    with pytest.raises(TypeError, match=r"only a sync redis\.Redis client"):
        sync_only.as_async()
    sync_only.close()
    async_client = redis.asyncio.Redis.from_url(redis_url)
    async_only = RedisStore(async_client)
    with pytest.raises(TypeError, match=r"only a redis\.asyncio client"):
        async_only.claim("k", FP, lease=5)
    view = async_only.as_async()
    assert (await view.claim("k", FP, lease=5)).token is not None
    await view.aclose()


def test_a_missing_redis_client_names_the_extra() -> None:
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['redis'] = None\n"
        "try:\n"
        "    from resilient_grpc import RedisStore\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pip install 'resilient-grpc[redis]'" in out.stdout
