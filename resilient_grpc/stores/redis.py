"""RedisStore: records shared by many server replicas, one Redis round trip per claim, completion or replay.

One Redis string per scoped key, under ``<prefix>{<sha256 hex>}`` (the braces are a Redis
Cluster hash tag, so anything ever added for a record lands in the same slot):

* a claim is ``P`` + fencing token (8 bytes) + request fingerprint (32 bytes), set with
  ``PX <lease>``: when the executor dies, Redis drops the claim at the end of the lease by itself;
* a completed record is ``C`` + token + fingerprint + the encoded
  :class:`~resilient_grpc.core.dedup.Outcome`, set with ``PX <ttl>``.

Claim, get, complete and release are each one Lua script (one round trip, atomic): claim sets the
key only if absent and otherwise returns the record and its remaining lease; complete and release
act only if the key still holds *our* claim, byte for byte (fencing: a stale executor whose lease
lapsed, or who was taken over, changes nothing). The raw idempotency key never reaches Redis.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import redis
    import redis.asyncio
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "RedisStore needs the redis client: pip install 'resilient-grpc[redis]'"
    ) from error

from resilient_grpc.core.dedup import (
    ClaimResult,
    Outcome,
    Record,
    RecordState,
    decode_outcome,
    encode_outcome,
)
from resilient_grpc.core.validation import finite_number
from resilient_grpc.stores.base import (
    DEFAULT_TTL,
    AsyncStore,
    Store,
    StoreUnavailableError,
    new_token,
)

DEFAULT_PREFIX = "resilient-grpc:dedup:"

_CLAIM = """
local record = redis.call('GET', KEYS[1])
if record then return {record, redis.call('PTTL', KEYS[1])} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 0
"""
_GET = """
local record = redis.call('GET', KEYS[1])
if record then return {record, redis.call('PTTL', KEYS[1])} end
return 0
"""


def _token(token: int) -> bytes:
    return token.to_bytes(8, "big")


def _claim_args(fingerprint: bytes, token: int, lease: float) -> list[Any]:
    return [b"P" + _token(token) + fingerprint, _milliseconds(lease)]


def _claimed(token: int, reply: Any) -> ClaimResult:
    record = _record(reply)
    return ClaimResult(token) if record is None else ClaimResult(None, record)


def _scripts(client: redis.Redis | redis.asyncio.Redis) -> dict[str, Any]:
    return {
        "claim": client.register_script(_CLAIM),
        "get": client.register_script(_GET),
        "complete": client.register_script(_COMPLETE),
        "release": client.register_script(_RELEASE),
        "renew": client.register_script(_RENEW),
    }


def _milliseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _record(reply: Any) -> Record | None:
    """Parse a ``{value, pttl}`` reply (``0``: no record)."""
    if not reply:
        return None
    value, pttl = bytes(reply[0]), int(reply[1])
    fingerprint = value[9:41]
    if value[:1] == b"P":
        return Record(RecordState.IN_PROGRESS, fingerprint, None, max(pttl, 0) / 1000.0)
    return Record(RecordState.COMPLETED, fingerprint, decode_outcome(value[41:]))


class _Layout:
    """Key names, script arguments and reply parsing shared by the sync and async stores."""

    def __init__(self, prefix: str, ttl: float, where: str) -> None:
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, got {prefix!r}")
        finite_number("ttl", ttl, above=0.0, unit=" of seconds")
        self.prefix = prefix
        self.ttl = float(ttl)
        self.where = where

    def name(self, key: str) -> str:
        return f"{self.prefix}{{{key}}}"

    def complete_args(self, token: int, outcome: Outcome, ttl: float | None) -> list[Any]:
        # The fingerprint is not known here: the script compares the claim's prefix bytes.
        return [_token(token), encode_outcome(outcome), _milliseconds(ttl or self.ttl)]

    def unavailable(self, error: Exception) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"Redis store at {self.where} failed: {type(error).__name__}: {error}"
        )


# The completion script needs the claim's exact bytes; it rebuilds them from token + stored
# fingerprint, so the caller only passes its token (see _Layout.complete_args).
_COMPLETE = """
local record = redis.call('GET', KEYS[1])
if record and string.sub(record, 1, 9) == 'P' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'C' .. string.sub(record, 2, 41) .. ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""
_RELEASE = """
local record = redis.call('GET', KEYS[1])
if record and string.sub(record, 1, 9) == 'P' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

# Renewal: extend our own claim's expiry (fenced like release: only our claim, byte for byte; a
# lapsed claim is gone from Redis, so it cannot be renewed).
_RENEW = """
local record = redis.call('GET', KEYS[1])
if record and string.sub(record, 1, 9) == 'P' .. ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


def _where(client: Any) -> str:
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


class RedisStore(Store):
    """Dedup records in Redis, shared by every replica (see the module docstring for the layout).

    ``client`` is a ``redis.Redis`` (for ``grpc.server``) or a ``redis.asyncio.Redis`` (for
    ``grpc.aio``); :meth:`from_url` makes both, so one store serves either interceptor. Any Redis
    error (refused connection, timeout, ``READONLY``...) raises
    :class:`~resilient_grpc.stores.base.StoreUnavailableError` naming the server.
    """

    def __init__(
        self,
        client: redis.Redis | redis.asyncio.Redis,
        *,
        async_client: redis.asyncio.Redis | None = None,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
    ) -> None:
        sync_client: redis.Redis | None = None
        if isinstance(client, redis.asyncio.Redis):
            async_client = client
        elif isinstance(client, redis.Redis):
            sync_client = client
        else:
            raise ValueError(
                f"client must be a redis.Redis or redis.asyncio.Redis, got {type(client).__name__}"
            )
        self._client = sync_client
        self._async_client = async_client
        self.layout = _Layout(prefix, ttl, _where(client))
        self.ttl = self.layout.ttl
        self._scripts = _scripts(sync_client) if sync_client is not None else {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
        **client_options: Any,
    ) -> RedisStore:
        """A store on ``url`` (``redis://host:port/db``) with a sync and an asyncio client.

        Clients retry a failed command once on a fresh connection (a restarted Redis) and
        otherwise fail fast, so a dead Redis is reported within the timeouts.
        """
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **client_options,
        }
        sync_client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options)
        async_client = redis.asyncio.Redis.from_url(
            url, retry=redis.asyncio.retry.Retry(NoBackoff(), 1), **options
        )
        return cls(sync_client, async_client=async_client, prefix=prefix, ttl=ttl)

    def _call(self, script: str, key: str, args: list[Any]) -> Any:
        if self._client is None:
            raise TypeError(
                "this RedisStore has only a redis.asyncio client: use it with "
                "resilient_grpc.aio.DedupInterceptor, or build it with RedisStore.from_url"
            )
        try:
            return self._scripts[script](keys=[self.layout.name(key)], args=args)
        except redis.RedisError as error:
            raise self.layout.unavailable(error) from error

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        return _claimed(token, self._call("claim", key, _claim_args(fingerprint, token, lease)))

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        return bool(self._call("complete", key, self.layout.complete_args(token, outcome, ttl)))

    def release(self, key: str, token: int) -> bool:
        return bool(self._call("release", key, [_token(token)]))

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        return bool(self._call("renew", key, [_token(token), _milliseconds(lease)]))

    def get(self, key: str) -> Record | None:
        return _record(self._call("get", key, []))

    def as_async(self) -> AsyncStore:
        if self._async_client is None:
            raise TypeError(
                "this RedisStore has only a sync redis.Redis client: pass a redis.asyncio.Redis "
                "client, or build it with RedisStore.from_url, to use it with grpc.aio"
            )
        return _AsyncRedisStore(self._async_client, self.layout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class _AsyncRedisStore(AsyncStore):
    """The ``redis.asyncio`` side of :class:`RedisStore`: same layout and scripts, awaited."""

    def __init__(self, client: redis.asyncio.Redis, layout: _Layout) -> None:
        self.layout = layout
        self.ttl = layout.ttl
        self._client = client
        self._scripts = _scripts(client)

    async def _call(self, script: str, key: str, args: list[Any]) -> Any:
        try:
            return await self._scripts[script](keys=[self.layout.name(key)], args=args)
        except redis.RedisError as error:
            raise self.layout.unavailable(error) from error

    async def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        reply = await self._call("claim", key, _claim_args(fingerprint, token, lease))
        return _claimed(token, reply)

    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        args = self.layout.complete_args(token, outcome, ttl)
        return bool(await self._call("complete", key, args))

    async def release(self, key: str, token: int) -> bool:
        return bool(await self._call("release", key, [_token(token)]))

    async def renew(self, key: str, token: int, *, lease: float) -> bool:
        return bool(await self._call("renew", key, [_token(token), _milliseconds(lease)]))

    async def get(self, key: str) -> Record | None:
        return _record(await self._call("get", key, []))

    async def aclose(self) -> None:
        await self._client.aclose()
