"""RedisStore: records shared by many server replicas, one Redis round trip per claim, completion or replay.

One Redis string per scoped key, under ``<prefix>{<sha256 hex>}`` (the braces are a Redis
Cluster hash tag, so anything ever added for a record lands in the same slot; every script
touches that one key only, so it runs on a Redis Cluster as on a single Redis):

* a claim is ``P`` + fencing token (8 bytes) + request fingerprint (32 bytes), set with
  ``PX <lease>``: when the executor dies, Redis drops the claim at the end of the lease by itself;
* a completed record is ``C`` + token + fingerprint + the encoded
  :class:`~resilient_grpc.core.dedup.Outcome`, set with ``PX <ttl>``.

Claim, get, complete and release are each one Lua script (one round trip, atomic): claim sets the
key only if absent and otherwise returns the record and its remaining lease; complete and release
act only if the key still holds *our* claim, byte for byte (fencing: a stale executor whose lease
lapsed, or who was taken over, changes nothing). The raw idempotency key never reaches Redis.

Durable claims: ``replica_acks=n`` sends each claim and each completion together with a Redis
``WAIT n`` on the same connection (one pipelined round trip) and treats a write that fewer than
``n`` replicas acknowledged within ``replica_timeout`` as not made: an unacknowledged claim is
released and reported as :class:`~resilient_grpc.stores.base.StoreUnavailableError` (the call
fails closed), an unacknowledged completion is reported the same way. Replication is otherwise
asynchronous: without it a failover to a replica that missed a claim or an outcome loses it.

On first use the store reads the server's ``appendonly``, ``save`` and ``maxmemory-policy`` and
logs one WARNING naming each setting that lets Redis forget a claim or a record (see
:func:`unsafe_settings`), or that it could not check (``CONFIG`` disabled, as on most managed
Redis); ``check_config=False`` skips the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import urllib.parse
from collections.abc import Mapping
from typing import Any

try:
    import redis
    import redis.asyncio
    import redis.asyncio.cluster
    import redis.cluster
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisClusterException
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
from resilient_grpc.core.validation import finite_number, whole_number
from resilient_grpc.stores.base import (
    DEFAULT_TTL,
    AsyncStore,
    Store,
    StoreUnavailableError,
    UndecodableRecordError,
    new_token,
)

DEFAULT_PREFIX = "resilient-grpc:dedup:"
#: What a Redis or Redis Cluster client may raise when the store cannot answer.
_ERRORS = (redis.RedisError, RedisClusterException)
SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
#: The settings read on first use (one ``CONFIG GET`` each, pipelined: one round trip).
CHECKED_SETTINGS = ("appendonly", "save", "maxmemory-policy", "maxmemory")
_log = logging.getLogger(__name__)

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


def _claimed(token: int, record: Record | None) -> ClaimResult:
    return ClaimResult(token) if record is None else ClaimResult(None, record)


def _scripts(client: SyncClient | AsyncClient) -> dict[str, Any]:
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
    """Parse a ``{value, pttl}`` reply (``0``: no record); ``ValueError`` on a value we did not write."""
    if not reply:
        return None
    value, pttl = bytes(reply[0]), int(reply[1])
    kind = value[:1]
    fingerprint = value[9:41]
    if kind == b"P" and len(value) == 41:
        return Record(RecordState.IN_PROGRESS, fingerprint, None, max(pttl, 0) / 1000.0)
    if kind == b"C" and len(value) > 41:
        return Record(RecordState.COMPLETED, fingerprint, decode_outcome(value[41:]))
    raise ValueError(f"unknown record layout (first byte {kind!r}, {len(value)} bytes)")


def unsafe_settings(config: Mapping[str, str]) -> list[str]:
    """Which of a Redis server's settings (``CONFIG GET`` answers) let it forget dedup records.

    * ``appendonly no``: a restart loses every claim and record written since the last RDB
      snapshot (all of them if ``save`` is empty too): in-flight keys run again concurrently
      and completed keys execute again.
    * ``maxmemory-policy`` other than ``noeviction``: ``allkeys-*`` evicts any key, and
      ``volatile-*`` evicts keys with a TTL, which every dedup record has. With ``noeviction`` a
      full Redis refuses the claim instead (UNAVAILABLE: fail closed).
    """
    problems = []
    if config.get("appendonly", "no") != "yes":
        if config.get("save", "").strip():
            problems.append(
                f"appendonly no (only RDB snapshots, save {config['save']!r}: a restart loses "
                "the claims and records written since the last snapshot)"
            )
        else:
            problems.append(
                'appendonly no and save "" (no persistence: a restart loses every claim and record)'
            )
    policy = config.get("maxmemory-policy", "noeviction")
    if policy != "noeviction":
        limit = config.get("maxmemory", "0")
        problems.append(
            f"maxmemory-policy {policy} (evicts dedup records, which all carry a TTL, "
            f"when memory is full; maxmemory {limit}): use noeviction"
        )
    return problems


def _config_reply(replies: list[Any]) -> dict[str, str]:
    config: dict[str, str] = {}
    for reply in replies:
        for name, value in dict(reply).items():
            config[_text(name)] = _text(value)
    return config


def _node_configs(where: str, replies: list[Any]) -> dict[str, dict[str, str]]:
    """``CONFIG GET`` replies (one per setting) as ``{node: {setting: value}}``: a cluster client
    asked with ``target_nodes=ALL_NODES`` answers ``{node: {setting: value}}`` per command."""
    configs: dict[str, dict[str, str]] = {}
    for reply in replies:
        answer = dict(reply)
        if answer and all(isinstance(value, dict) for value in answer.values()):
            for node, config in answer.items():
                configs.setdefault(_text(node), {}).update(_config_reply([config]))
        else:
            configs.setdefault(where, {}).update(_config_reply([answer]))
    return configs


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Layout:
    """Key names, script arguments and reply parsing shared by the sync and async stores."""

    def __init__(
        self,
        prefix: str,
        ttl: float,
        where: str,
        *,
        check_config: bool,
        replica_acks: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, got {prefix!r}")
        finite_number("ttl", ttl, above=0.0, unit=" of seconds")
        whole_number("replica_acks", replica_acks, at_least=0)
        finite_number("replica_timeout", replica_timeout, above=0.0, unit=" of seconds")
        self.replica_acks = replica_acks
        #: WAIT's timeout in milliseconds
        self.wait_ms = _milliseconds(replica_timeout)
        if not isinstance(check_config, bool):
            raise ValueError(f"check_config must be True or False, got {check_config!r}")
        self.prefix = prefix
        self.ttl = float(ttl)
        self.where = where
        #: whether the server's settings still need checking (once per store, both clients)
        self.config_unchecked = check_config
        self._check_lock = threading.Lock()

    def begin_check(self) -> bool:
        """Whether this caller should check the server's settings now (only one caller does)."""
        with self._check_lock:
            if not self.config_unchecked:
                return False
            self.config_unchecked = False
            return True

    def checked(self, replies: list[Any] | None, error: Exception | None) -> None:
        """Log what the settings check found: each unsafe setting (per node of a cluster), or
        why it could not check."""
        if error is not None:
            if isinstance(
                error, (redis.ConnectionError, redis.TimeoutError, RedisClusterException)
            ):
                self.config_unchecked = True  # unreachable for now: check on a later call
                return
            _log.warning(
                "RedisStore could not check that Redis at %s keeps dedup records (CONFIG GET "
                "failed: %s: %s; managed Redis often disables CONFIG): make sure it persists "
                "writes (appendonly yes) and never evicts them (maxmemory-policy noeviction), "
                "or pass check_config=False once you have",
                self.where,
                type(error).__name__,
                error,
            )
            return
        assert replies is not None
        nodes: dict[str, list[str]] = {}  # the problems -> the nodes that have them
        for node, config in sorted(_node_configs(self.where, replies).items()):
            problems = "; ".join(unsafe_settings(config))
            if problems:
                nodes.setdefault(problems, []).append(node)
        if len(nodes) == 1 and next(iter(nodes.values())) == [self.where]:
            text = next(iter(nodes))
        else:
            text = " | ".join(
                f"{', '.join(names)}: {problems}" for problems, names in nodes.items()
            )
        if nodes:
            _log.warning(
                "Redis at %s can forget dedup records, so a key may execute twice: %s. "
                "See the README, 'What Redis must guarantee'",
                self.where,
                text,
            )

    def record(self, key: str, reply: Any) -> Record | None:
        """The record in a script's reply; :class:`UndecodableRecordError` if we cannot read it."""
        try:
            return _record(reply)
        except (ValueError, TypeError, IndexError) as error:
            raise UndecodableRecordError(
                f"Redis store at {self.where}: the record {self.name(key)} cannot be decoded "
                f"(corrupt, or written by a newer version): {error}"
            ) from error

    def name(self, key: str) -> str:
        return f"{self.prefix}{{{key}}}"

    def complete_args(self, token: int, outcome: Outcome, ttl: float | None) -> list[Any]:
        # The fingerprint is not known here: the script compares the claim's prefix bytes.
        return [_token(token), encode_outcome(outcome), _milliseconds(ttl or self.ttl)]

    def durable(self, script: str) -> bool:
        """Whether ``script``'s write must be acknowledged by replicas (claims and completions)."""
        return self.replica_acks > 0 and script in _DURABLE

    def unacknowledged(self, what: str, acked: int) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"Redis store at {self.where}: the {what} was acknowledged by {acked} of the "
            f"{self.replica_acks} replica(s) replica_acks asks for within "
            f"{self.wait_ms} ms, so a failover could lose it"
        )

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
#: The scripts whose writes ``replica_acks`` waits for.
_DURABLE = frozenset({"claim", "complete"})
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


def _durable_reply(replies: list[Any]) -> tuple[Any, int]:
    """``(script reply, replicas that acknowledged)`` from a pipelined ``EVALSHA`` + ``WAIT``."""
    reply, acked = replies
    if isinstance(reply, Exception):
        raise reply
    if isinstance(acked, Exception):
        raise acked
    return reply, int(acked)


def _wrote(script: str, reply: Any) -> bool:
    """Whether a claim or completion reply says the script wrote (a claim that found a record
    and a refused completion write nothing, so there is nothing to wait for)."""
    return reply == 0 if script == "claim" else bool(reply)


#: Connection settings a per-master client copies from a cluster client's node.
_NODE_OPTIONS = frozenset(
    {"socket_timeout", "socket_connect_timeout", "username", "password", "ssl", "db"}
)


def _refresh_topology(client: redis.cluster.RedisCluster) -> None:
    """After a failed durable write on a cluster: re-read the slot map (a failover or a slot
    move), best effort, so the next call goes to the right master."""
    with contextlib.suppress(*_ERRORS):
        client.nodes_manager.initialize()


def _where(client: Any) -> str:
    if isinstance(client, (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)):
        nodes = client.nodes_manager.startup_nodes.values()
        return "cluster " + ",".join(f"{node.host}:{node.port}" for node in nodes)
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {})
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


class RedisStore(Store):
    """Dedup records in Redis, shared by every replica (see the module docstring for the layout).

    ``client`` is a ``redis.Redis`` (for ``grpc.server``) or a ``redis.asyncio.Redis`` (for
    ``grpc.aio``), or their Redis Cluster twins ``redis.cluster.RedisCluster`` and
    ``redis.asyncio.cluster.RedisCluster``; :meth:`from_url` makes a sync and an asyncio client,
    so one store serves either interceptor. Any Redis error (refused connection, timeout, ``READONLY``...) raises
    :class:`~resilient_grpc.stores.base.StoreUnavailableError` naming the server; a value this
    code cannot decode raises its subclass
    :class:`~resilient_grpc.stores.base.UndecodableRecordError`. ``check_config``: read the
    server's persistence and eviction settings on first use and log a WARNING naming each unsafe
    one (:func:`unsafe_settings`).
    """

    def __init__(
        self,
        client: SyncClient | AsyncClient,
        *,
        async_client: AsyncClient | None = None,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        check_config: bool = True,
        replica_acks: int = 0,
        replica_timeout: float = 1.0,
    ) -> None:
        sync_client: SyncClient | None = None
        if isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)):
            async_client = client
        elif isinstance(client, (redis.Redis, redis.cluster.RedisCluster)):
            sync_client = client
        else:
            raise ValueError(
                "client must be a redis.Redis, redis.asyncio.Redis, redis.cluster.RedisCluster "
                f"or redis.asyncio.cluster.RedisCluster, got {type(client).__name__}"
            )
        self._client = sync_client
        self._async_client = async_client
        self.layout = _Layout(
            prefix,
            ttl,
            _where(client),
            check_config=check_config,
            replica_acks=replica_acks,
            replica_timeout=replica_timeout,
        )
        self.ttl = self.layout.ttl
        self._scripts = _scripts(sync_client) if sync_client is not None else {}

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_TTL,
        check_config: bool = True,
        cluster: bool = False,
        replica_acks: int = 0,
        replica_timeout: float = 1.0,
        socket_timeout: float = 2.0,
        socket_connect_timeout: float = 1.0,
        **client_options: Any,
    ) -> RedisStore:
        """A store on ``url`` (``redis://host:port/db``) with a sync and an asyncio client.

        Clients retry a failed command once on a fresh connection (a restarted Redis) and
        otherwise fail fast, so a dead Redis is reported within the timeouts. ``cluster=True``:
        ``url`` names one node of a Redis Cluster (``redis://host:port``), and the clients are
        ``redis.cluster.RedisCluster`` and ``redis.asyncio.cluster.RedisCluster``, which find
        the other nodes, follow slot moves and failovers, and retry as redis-py does.
        """
        options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_connect_timeout,
            **client_options,
        }
        sync_client: SyncClient
        async_client: AsyncClient
        if cluster:
            try:
                sync_client = redis.cluster.RedisCluster.from_url(url, **options)
            except _ERRORS as error:
                where = urllib.parse.urlsplit(url)  # never the password
                raise StoreUnavailableError(
                    f"Redis Cluster at {where.hostname}:{where.port} failed: "
                    f"{type(error).__name__}: {error}"
                ) from error
            async_client = redis.asyncio.cluster.RedisCluster.from_url(url, **options)
        else:
            sync_client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 1), **options)
            async_client = redis.asyncio.Redis.from_url(
                url, retry=redis.asyncio.retry.Retry(NoBackoff(), 1), **options
            )
        return cls(
            sync_client,
            async_client=async_client,
            prefix=prefix,
            ttl=ttl,
            check_config=check_config,
            replica_acks=replica_acks,
            replica_timeout=replica_timeout,
        )

    def _call(self, script: str, key: str, args: list[Any]) -> Any:
        if self._client is None:
            raise TypeError(
                "this RedisStore has only a redis.asyncio client: use it with "
                "resilient_grpc.aio.DedupInterceptor, or build it with RedisStore.from_url"
            )
        if self.layout.config_unchecked and self.layout.begin_check():
            self._check_config(self._client)
        try:
            if self.layout.durable(script):
                return self._durable(self._client, script, key, args)
            return self._scripts[script](keys=[self.layout.name(key)], args=args)
        except _ERRORS as error:
            if isinstance(self._client, redis.cluster.RedisCluster):
                _refresh_topology(self._client)
            raise self.layout.unavailable(error) from error

    def _durable(self, client: SyncClient, script: str, key: str, args: list[Any]) -> Any:
        """Run a writing script and ``WAIT`` on the same connection (the master of the key's
        slot on a cluster): one round trip; undo or refuse a write too few replicas have."""
        name = self.layout.name(key)
        target: redis.Redis | None = client  # type: ignore[assignment]
        if isinstance(client, redis.cluster.RedisCluster):
            node: Any = client.get_node_from_key(name)  # type: ignore[no-untyped-call]
            target = node.redis_connection if node is not None else None
        if target is None:
            raise RedisClusterException(f"no master known for the slot of {name}")
        code = self._scripts[script]
        for attempt in range(2):
            pipeline = target.pipeline(transaction=False)
            pipeline.evalsha(code.sha, 1, name, *args)
            pipeline.wait(self.layout.replica_acks, self.layout.wait_ms)
            replies = pipeline.execute(raise_on_error=False)
            if attempt == 0 and isinstance(replies[0], redis.exceptions.NoScriptError):
                target.script_load(code.script)
                continue
            reply, acked = _durable_reply(replies)
            if acked >= self.layout.replica_acks or not _wrote(script, reply):
                return reply
            if script == "claim":  # not durable: give the key back, then refuse the call
                self._scripts["release"](keys=[name], args=[args[0][1:9]], client=target)
            raise self.layout.unacknowledged(script.replace("complete", "completion"), acked)
        raise AssertionError("unreachable")

    def _check_config(self, client: SyncClient) -> None:
        try:
            if isinstance(client, redis.cluster.RedisCluster):
                every = redis.cluster.RedisCluster.ALL_NODES
                replies = [client.config_get(name, target_nodes=every) for name in CHECKED_SETTINGS]
            else:
                pipeline = client.pipeline(transaction=False)
                for name in CHECKED_SETTINGS:
                    pipeline.config_get(name)
                replies = pipeline.execute()
        except _ERRORS as error:
            self.layout.checked(None, error)
        else:
            self.layout.checked(replies, None)

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        reply = self._call("claim", key, _claim_args(fingerprint, token, lease))
        return _claimed(token, self.layout.record(key, reply))

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        return bool(self._call("complete", key, self.layout.complete_args(token, outcome, ttl)))

    def release(self, key: str, token: int) -> bool:
        return bool(self._call("release", key, [_token(token)]))

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        return bool(self._call("renew", key, [_token(token), _milliseconds(lease)]))

    def get(self, key: str) -> Record | None:
        return self.layout.record(key, self._call("get", key, []))

    def as_async(self) -> AsyncStore:
        if self._async_client is None:
            raise TypeError(
                "this RedisStore has only a sync redis client: pass a redis.asyncio client as "
                "async_client, or build it with RedisStore.from_url, to use it with grpc.aio"
            )
        return _AsyncRedisStore(self._async_client, self.layout)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class _AsyncRedisStore(AsyncStore):
    """The ``redis.asyncio`` side of :class:`RedisStore`: same layout and scripts, awaited."""

    def __init__(self, client: AsyncClient, layout: _Layout) -> None:
        self.layout = layout
        self.ttl = layout.ttl
        self._client = client
        self._scripts = _scripts(client)
        # redis.asyncio.cluster.RedisCluster learns the topology on first use, and concurrent
        # first commands break it (AttributeError inside redis-py): one coroutine does it first
        self._ready = not isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._ready_lock: asyncio.Lock | None = None
        self._nodes: dict[str, redis.asyncio.Redis] = {}

    async def _call(self, script: str, key: str, args: list[Any]) -> Any:
        if not self._ready:
            await self._initialize()
        if self.layout.config_unchecked and self.layout.begin_check():
            await self._check_config()
        try:
            if self.layout.durable(script):
                return await self._durable(script, key, args)
            return await self._scripts[script](keys=[self.layout.name(key)], args=args)
        except _ERRORS as error:
            raise self.layout.unavailable(error) from error

    async def _durable(self, script: str, key: str, args: list[Any]) -> Any:
        """See :meth:`RedisStore._durable`."""
        name = self.layout.name(key)
        target = self._node_client(name)
        code = self._scripts[script]
        for attempt in range(2):
            pipeline = target.pipeline(transaction=False)
            pipeline.evalsha(code.sha, 1, name, *args)
            pipeline.wait(self.layout.replica_acks, self.layout.wait_ms)
            replies = await pipeline.execute(raise_on_error=False)
            if attempt == 0 and isinstance(replies[0], redis.exceptions.NoScriptError):
                await target.script_load(code.script)
                continue
            reply, acked = _durable_reply(replies)
            if acked >= self.layout.replica_acks or not _wrote(script, reply):
                return reply
            if script == "claim":
                await self._scripts["release"](keys=[name], args=[args[0][1:9]], client=target)
            raise self.layout.unacknowledged(script.replace("complete", "completion"), acked)
        raise AssertionError("unreachable")

    def _node_client(self, name: str) -> redis.asyncio.Redis:
        """The client that talks to the master of ``name``'s slot (the client itself unless
        on a cluster, where a plain client per master is kept: ``WAIT`` has no key to route)."""
        client = self._client
        if not isinstance(client, redis.asyncio.cluster.RedisCluster):
            return client
        node = client.get_node_from_key(name)
        if node is None:
            raise RedisClusterException(f"no master known for the slot of {name}")
        found = self._nodes.get(node.name)
        if found is None:
            options = {k: v for k, v in node.connection_kwargs.items() if k in _NODE_OPTIONS}
            found = self._nodes[node.name] = redis.asyncio.Redis(
                host=node.host, port=int(node.port), **options
            )
        return found

    async def _initialize(self) -> None:
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:
            if self._ready:
                return
            client = self._client
            assert isinstance(client, redis.asyncio.cluster.RedisCluster)
            try:
                await client.initialize()
            except _ERRORS as error:
                raise self.layout.unavailable(error) from error
            self._ready = True

    async def _check_config(self) -> None:
        client = self._client
        try:
            if isinstance(client, redis.asyncio.cluster.RedisCluster):
                every = redis.asyncio.cluster.RedisCluster.ALL_NODES
                replies = [
                    await client.config_get(name, target_nodes=every) for name in CHECKED_SETTINGS
                ]
            else:
                pipeline = client.pipeline(transaction=False)
                for name in CHECKED_SETTINGS:
                    pipeline.config_get(name)
                replies = await pipeline.execute()
        except _ERRORS as error:
            self.layout.checked(None, error)
        else:
            self.layout.checked(replies, None)

    async def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        reply = await self._call("claim", key, _claim_args(fingerprint, token, lease))
        return _claimed(token, self.layout.record(key, reply))

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
        return self.layout.record(key, await self._call("get", key, []))

    async def aclose(self) -> None:
        for node in self._nodes.values():
            await node.aclose()
        await self._client.aclose()
