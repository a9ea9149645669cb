"""RedisStore specifics: key layout (hash tag, no raw key), round trips per operation, client kinds,
a precise StoreUnavailableError when Redis is not there, one WARNING naming each unsafe persistence
or eviction setting of a real redis-server, and undecodable values reported as store errors."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from resilient_grpc.core.dedup import Outcome, fingerprint, scoped_key
from resilient_grpc.stores import RedisStore, StoreUnavailableError, UndecodableRecordError
from resilient_grpc.stores.redis import DEFAULT_PREFIX
from resilient_grpc.testing.redis_round_trips import RoundTripCounter
from resilient_grpc.testing.servers import RedisServer, ServerUnavailableError, free_port
from tests.private_servers import unavailable

FP = fingerprint(b"request")


def test_keys_are_hash_tagged_digests(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    key = scoped_key("tenant-1", "raw-key-123")
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
    with pytest.raises(TypeError, match=r"only a sync redis client"):
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


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[dict[str, str | tuple[str, ...]]], str]]:
    """Start a redis-server of our own with the given settings; its URL."""
    servers: list[RedisServer] = []

    def start(settings: dict[str, str | tuple[str, ...]]) -> str:
        server = _private(settings, tmp_path / f"redis-{len(servers)}")
        servers.append(server)
        server.start()
        return server.url

    yield start
    for server in servers:
        server.stop()


def _private(settings: dict[str, str | tuple[str, ...]], directory: Path) -> RedisServer:
    """A private redis-server with ``settings`` (not started), or a skip without the binary."""
    try:
        return RedisServer(settings, directory=directory)
    except ServerUnavailableError as error:
        unavailable("Redis", str(error))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "resilient_grpc.stores.redis" and record.levelno == logging.WARNING
    ]


async def _use(store: RedisStore) -> None:
    """First use through both clients, several calls each."""
    for index in range(3):
        store.claim(f"sync-{index}", FP, lease=5)
    view = store.as_async()
    await asyncio.gather(*(view.claim(f"aio-{index}", FP, lease=5) for index in range(3)))
    await view.get("aio-0")
    await view.aclose()
    store.close()


@pytest.mark.parametrize(
    "settings, named, not_named",
    [
        (
            {"appendonly": "no", "save": ""},
            ['appendonly no and save ""'],
            ["maxmemory-policy"],
        ),
        (
            {"appendonly": "no", "save": "3600 1", "maxmemory-policy": "volatile-lru"},
            ["appendonly no (only RDB snapshots", "maxmemory-policy volatile-lru"],
            [],
        ),
        (
            {"appendonly": "yes", "maxmemory": "100mb", "maxmemory-policy": "allkeys-lru"},
            ["maxmemory-policy allkeys-lru", "maxmemory 104857600"],
            ["appendonly"],
        ),
        (
            {"appendonly": "yes", "maxmemory-policy": "volatile-ttl"},
            ["maxmemory-policy volatile-ttl"],
            ["appendonly"],
        ),
    ],
    ids=["no-persistence", "snapshots-volatile-lru", "allkeys-lru", "volatile-ttl"],
)
async def test_one_warning_names_each_unsafe_setting(
    private_redis: Callable[[dict[str, str | tuple[str, ...]]], str],
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, str | tuple[str, ...]],
    named: list[str],
    not_named: list[str],
) -> None:
    url = private_redis(settings)
    caplog.set_level(logging.WARNING, logger="resilient_grpc.stores.redis")
    await _use(RedisStore.from_url(url))
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "127.0.0.1" in warnings[0] and "execute twice" in warnings[0]
    for text in named:
        assert text in warnings[0]
    for text in not_named:
        assert text not in warnings[0]


async def test_a_safe_redis_logs_nothing(
    private_redis: Callable[[dict[str, str | tuple[str, ...]]], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = private_redis({"appendonly": "yes", "maxmemory-policy": "noeviction"})
    caplog.set_level(logging.DEBUG, logger="resilient_grpc.stores.redis")
    await _use(RedisStore.from_url(url))
    assert _warnings(caplog) == []


async def test_a_redis_without_config_logs_once_that_it_could_not_check(
    private_redis: Callable[[dict[str, str | tuple[str, ...]]], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = private_redis({"rename-command": ("CONFIG", "")})  # as managed Redis does
    caplog.set_level(logging.WARNING, logger="resilient_grpc.stores.redis")
    await _use(RedisStore.from_url(url))
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "could not check" in warnings[0] and "check_config=False" in warnings[0]
    caplog.clear()
    await _use(RedisStore.from_url(url, check_config=False))
    assert _warnings(caplog) == []


def test_an_unreachable_redis_is_checked_once_it_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="resilient_grpc.stores.redis")
    server = _private({"appendonly": "no"}, tmp_path)  # not started yet
    store = RedisStore.from_url(server.url, socket_connect_timeout=0.5)
    with pytest.raises(StoreUnavailableError):
        store.claim("k", FP, lease=5)
    assert _warnings(caplog) == []  # a connection error says nothing about the settings
    server.start()
    try:
        assert store.claim("k", FP, lease=5).token is not None
        assert store.claim("k2", FP, lease=5).token is not None
        assert len(_warnings(caplog)) == 1
    finally:
        store.close()
        server.stop()


@pytest.mark.parametrize(
    "value",
    [
        b"Zunknown layout",
        b"P" + b"\x00" * 8 + b"short",
        b"C" + b"\x00" * 8 + b"f" * 32 + b"\x07 a format version from the future",
        b"C" + b"\x00" * 8 + b"f" * 32 + b"\x01\x00",  # truncated
    ],
    ids=["kind", "short-claim", "newer-version", "truncated"],
)
async def test_an_undecodable_value_is_a_store_error_not_a_crash(
    redis_url: str, value: bytes
) -> None:
    store = RedisStore.from_url(redis_url, check_config=False)
    key = scoped_key("tenant-1", "k")
    client = redis.Redis.from_url(redis_url)
    client.set(store.layout.name(key), value, px=60_000)
    view = store.as_async()
    for call in (
        lambda: store.claim(key, FP, lease=5),
        lambda: store.get(key),
    ):
        with pytest.raises(UndecodableRecordError, match="cannot be decoded") as error:
            call()
        assert isinstance(error.value, StoreUnavailableError)
    with pytest.raises(UndecodableRecordError, match="cannot be decoded"):
        await view.claim(key, FP, lease=5)
    with pytest.raises(UndecodableRecordError, match="cannot be decoded"):
        await view.get(key)
    assert client.get(store.layout.name(key)) == value  # never overwritten
    await view.aclose()
    client.close()
    store.close()
