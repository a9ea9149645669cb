"""The store interface behind the dedup interceptors: claim with a fencing token, complete, release, get, wait.

:class:`Store` is the blocking interface (``grpc.server``), :class:`AsyncStore` the ``grpc.aio``
one; :meth:`Store.as_async` gives the async view of a store (by default its blocking methods run
in a worker thread, so the event loop never blocks). Keys are the hex digests made by
:func:`resilient_grpc.core.dedup.scoped_key`; stores never see a raw idempotency key.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator

from resilient_grpc.core.dedup import ClaimResult, Outcome, Record, RecordState

#: Default record lifetime: 24 h.
DEFAULT_TTL = 24 * 3600.0


class StoreUnavailableError(Exception):
    """The dedup store could not be reached or could not answer; the message says which and why.

    The message is for the server's log: the interceptors never send it to a client (it may name
    files, hosts or driver errors).
    """


class StoreFullError(StoreUnavailableError):
    """The store is full of records it must not drop (live claims) and refuses a new claim.

    An overload signal, not an outage: the interceptors answer RESOURCE_EXHAUSTED with a
    ``grpc-retry-pushback-ms`` of ``retry_after`` seconds (the soonest a claim may free up).
    """

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CommitFailedError(StoreUnavailableError):
    """Transactional mode: a call's transaction did not commit, or whether it did is unknown
    (the database went away, or the fenced completion found the claim taken over).

    Raised by ``complete``: the handler's writes went with the record, so the interceptor
    releases the key and answers UNAVAILABLE instead of the handler's answer (safe to retry
    with the same key). The message says why, for the server's log only.
    """


class UndecodableRecordError(StoreUnavailableError):
    """A stored record this code cannot decode: corrupt bytes, or a newer format written by
    another version during a rolling deploy.

    Treated like an unreachable store (UNAVAILABLE, or a run without dedup under ``fail_open``),
    never replayed and never overwritten: the record may be another version's valid outcome.
    The message names the store and the hashed key for the server's log, not for a client.
    """


_tokens = random.Random(secrets.randbits(128))


def new_token() -> int:
    """A fresh fencing token: 63 random bits (fits a signed 64-bit integer column).

    Tokens only need to be unique among the claims of one key, not secret: a generator seeded
    once from the OS is enough, and much cheaper than a system call per claim.
    """
    return _tokens.getrandbits(63) or 1


def poll_delays(first: float = 0.002, cap: float = 0.05) -> Iterator[float]:
    """Delays between polls of a store that cannot notify: 2 ms doubling up to 50 ms."""
    delay = first
    while True:
        yield delay
        delay = min(cap, delay * 2)


def settled(record: Record | None) -> bool:
    """Whether a waiter can stop: the key is free, or its outcome is stored."""
    return record is None or record.state is RecordState.COMPLETED


class Store(ABC):
    """A blocking dedup store. Every method raises :class:`StoreUnavailableError` when the store is down."""

    ttl: float = DEFAULT_TTL

    @abstractmethod
    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        """Atomically claim ``key`` for ``lease`` seconds, or return the live record that binds it."""

    @abstractmethod
    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        """Store ``outcome`` if ``token`` still owns a live claim (fenced); ``False`` if it does not."""

    @abstractmethod
    def release(self, key: str, token: int) -> bool:
        """Drop the claim held by ``token`` (retryable failure); ``False`` if it no longer holds it."""

    @abstractmethod
    def renew(self, key: str, token: int, *, lease: float) -> bool:
        """Extend the claim held by ``token`` to ``lease`` s from now (its handler still runs).

        Fenced like :meth:`complete`: only the token's own IN_PROGRESS claim whose lease has
        not lapsed is renewed; ``False`` if it no longer holds one.
        """

    @abstractmethod
    def get(self, key: str) -> Record | None:
        """The live record of ``key``, or ``None``."""

    def wait(self, key: str, timeout: float) -> Record | None:
        """Wait up to ``timeout`` s until ``key`` is completed or free; return its record then.

        This default polls :meth:`get`; stores that can notify do better.
        """
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        for delay in poll_delays():
            record = self.get(key)
            left = deadline - time.monotonic()
            if settled(record) or left <= 0:
                return record
            pause.wait(min(delay, left))
        raise AssertionError("unreachable")

    def as_async(self) -> AsyncStore:
        """The ``grpc.aio`` view of this store (default: blocking calls run in a worker thread)."""
        return ThreadedAsyncStore(self)

    def close(self) -> None:  # noqa: B027 (optional hook; most stores hold nothing)
        """Release connections and files (the store must not be used afterwards)."""


class AsyncStore(ABC):
    """The ``asyncio`` flavour of :class:`Store`: same methods, awaited, never blocking the loop."""

    ttl: float = DEFAULT_TTL

    @abstractmethod
    async def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        """See :meth:`Store.claim`."""

    @abstractmethod
    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        """See :meth:`Store.complete`."""

    @abstractmethod
    async def release(self, key: str, token: int) -> bool:
        """See :meth:`Store.release`."""

    @abstractmethod
    async def renew(self, key: str, token: int, *, lease: float) -> bool:
        """See :meth:`Store.renew`."""

    @abstractmethod
    async def get(self, key: str) -> Record | None:
        """See :meth:`Store.get`."""

    async def wait(self, key: str, timeout: float) -> Record | None:
        """See :meth:`Store.wait` (this default polls :meth:`get` with ``asyncio.sleep``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for delay in poll_delays():
            record = await self.get(key)
            left = deadline - loop.time()
            if settled(record) or left <= 0:
                return record
            await asyncio.sleep(min(delay, left))
        raise AssertionError("unreachable")

    async def aclose(self) -> None:  # noqa: B027 (optional hook)
        """Release connections (the store must not be used afterwards)."""


class ThreadedAsyncStore(AsyncStore):
    """An :class:`AsyncStore` that runs a blocking store's methods in worker threads."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ttl = store.ttl

    async def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        return await asyncio.to_thread(self.store.claim, key, fingerprint, lease=lease)

    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        return await asyncio.to_thread(self.store.complete, key, token, outcome, ttl=ttl)

    async def release(self, key: str, token: int) -> bool:
        return await asyncio.to_thread(self.store.release, key, token)

    async def renew(self, key: str, token: int, *, lease: float) -> bool:
        return await asyncio.to_thread(self.store.renew, key, token, lease=lease)

    async def get(self, key: str) -> Record | None:
        return await asyncio.to_thread(self.store.get, key)


class DirectAsyncStore(AsyncStore):
    """An :class:`AsyncStore` calling a store's methods directly, for stores that never block
    (no I/O, a short lock): :class:`~resilient_grpc.stores.memory.MemoryStore`. ``wait`` polls
    unless a subclass can be woken."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ttl = store.ttl

    async def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        return self.store.claim(key, fingerprint, lease=lease)

    async def complete(
        self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None
    ) -> bool:
        return self.store.complete(key, token, outcome, ttl=ttl)

    async def release(self, key: str, token: int) -> bool:
        return self.store.release(key, token)

    async def renew(self, key: str, token: int, *, lease: float) -> bool:
        return self.store.renew(key, token, lease=lease)

    async def get(self, key: str) -> Record | None:
        return self.store.get(key)
