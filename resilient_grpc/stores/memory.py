"""MemoryStore: the embedded default, bounded in entries and bytes, with TTL; thread- and asyncio-safe."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from resilient_grpc.core.dedup import (
    ClaimResult,
    Clock,
    Entry,
    Outcome,
    Record,
    RecordState,
    claim_entry,
    complete_entry,
    release_allowed,
    renew_entry,
)
from resilient_grpc.core.validation import finite_number, whole_number
from resilient_grpc.stores.base import (
    DEFAULT_TTL,
    AsyncStore,
    DirectAsyncStore,
    Store,
    new_token,
)

#: Accounted bytes per record besides its outcome: the dict slot and link, the 64-character key,
#: the record object, fingerprint and token (about 410 measured with tracemalloc, rounded up).
ENTRY_OVERHEAD = 448
#: Accounted bytes of a stored outcome besides its payload: the object and its tuples (about 180).
OUTCOME_OVERHEAD = 192
#: Accounted bytes per response message or trailer besides its payload (object headers).
ITEM_OVERHEAD = 64


def accounted_size(entry: Entry) -> int:
    """The bytes a record is charged against ``max_bytes`` (at least what it really occupies)."""
    outcome = entry.outcome
    if outcome is None:
        return ENTRY_OVERHEAD
    items = len(outcome.responses) + len(outcome.trailing_metadata)
    return ENTRY_OVERHEAD + OUTCOME_OVERHEAD + ITEM_OVERHEAD * items + outcome.size


class MemoryStore(Store):
    """Records in a dict, in one process: the default store.

    Bounded: when a new record would exceed ``max_entries`` or ``max_bytes`` (accounted by
    :func:`accounted_size`, measured to cover the real Python objects), the oldest records are evicted first, so a flood
    of unique keys costs a fixed amount of memory (and forgets the oldest keys: a key evicted
    before its TTL is no longer deduplicated, so size the bounds for your traffic times ``ttl``). Expired records
    are dropped as they are met and evicted first. All operations take one short lock and never
    do I/O, so the same store serves threads and the event loop (:meth:`as_async`). Waiters are
    woken when a key completes or is released, without polling.
    """

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        max_entries: int = 100_000,
        max_bytes: int = 64 * 1024 * 1024,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        finite_number("ttl", ttl, above=0.0, unit=" of seconds")
        whole_number("max_entries", max_entries, at_least=1)
        whole_number("max_bytes", max_bytes, at_least=1)
        if max_bytes < ENTRY_OVERHEAD:
            raise ValueError(f"max_bytes must be at least {ENTRY_OVERHEAD}, got {max_bytes}")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        # oldest write first. An OrderedDict, not a plain dict: a full store evicts its oldest
        # record on every write, and finding the first live item of a dict whose front has been
        # popped scans every deleted slot (tens of µs a call at 100k records); popitem(last=False)
        # is O(1).
        self._entries: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        self._bytes = 0
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """Accounted bytes of all records (never above ``max_bytes``)."""
        return self._bytes

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            existing = found[0] if found is not None else None
            entry = claim_entry(existing, fingerprint, token, now=now, lease=lease)
            if entry is None:
                assert existing is not None
                return ClaimResult(None, existing.view(now))
            self._put(key, entry, now, ENTRY_OVERHEAD)
        return ClaimResult(token)

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            entry = complete_entry(
                found[0] if found is not None else None,
                token,
                outcome,
                now=now,
                ttl=self.ttl if ttl is None else ttl,
            )
            if entry is None:
                return False
            self._put(key, entry, now, accounted_size(entry))
            if self._waiters:
                self._wake(key)
        return True

    def release(self, key: str, token: int) -> bool:
        with self._lock:
            found = self._entries.get(key)
            if not release_allowed(found[0] if found is not None else None, token):
                return False
            self._drop(key)
            if self._waiters:
                self._wake(key)
        return True

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                return False
            entry = renew_entry(found[0], token, now=now, lease=lease)
            if entry is None:
                return False
            self._entries[key] = (entry, found[1])  # same size, same place in the order
        return True

    def get(self, key: str) -> Record | None:
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            if found is None or not found[0].live(now):
                return None
            return found[0].view(now)

    def wait(self, key: str, timeout: float) -> Record | None:
        deadline = self._clock() + timeout
        while True:
            woken = threading.Event()
            record, pause = self._wait_step(key, deadline, woken.set)
            if pause <= 0:
                return record
            woken.wait(pause)
            self._unsubscribe(key, woken.set)

    def as_async(self) -> AsyncStore:
        return _AsyncMemoryStore(self)

    # -- internals (called with the lock held unless said otherwise)

    def _wait_step(
        self, key: str, deadline: float, wake: Callable[[], None]
    ) -> tuple[Record | None, float]:
        """One round of a wait (takes the lock): ``(record, 0)`` to stop, or subscribe ``wake`` and pause."""
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            if found is None or not found[0].live(now):
                return None, 0.0
            entry = found[0]
            if entry.state is RecordState.COMPLETED or deadline <= now:
                return entry.view(now), 0.0
            self._waiters.setdefault(key, []).append(wake)
            return None, min(deadline, entry.lease_until) - now

    def _unsubscribe(self, key: str, wake: Callable[[], None]) -> None:
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is not None and wake in waiters:
                waiters.remove(wake)
                if not waiters:
                    del self._waiters[key]

    def _wake(self, key: str) -> None:
        for wake in self._waiters.pop(key, ()):
            wake()

    def _drop(self, key: str) -> None:
        _, size = self._entries.pop(key)
        self._bytes -= size

    def _put(self, key: str, entry: Entry, now: float, size: int) -> None:
        """Write ``entry`` (accounted ``size`` bytes) as the newest record, evicting the oldest to fit."""
        entries = self._entries
        previous = entries.get(key)
        count = len(entries)
        if previous is not None:  # rewritten in place and moved last (cheaper than pop + insert)
            self._bytes -= previous[1]
            count -= 1
        if count >= self.max_entries or self._bytes + size > self.max_bytes:
            if previous is not None:
                del entries[key]
                previous = None
            self._evict(size, now)
        entries[key] = (entry, size)
        if previous is not None:
            entries.move_to_end(key)
        self._bytes += size

    def _evict(self, size: int, now: float) -> None:
        """Drop the oldest records until one more record of ``size`` bytes fits the bounds."""
        entries = self._entries
        while entries and (len(entries) >= self.max_entries or self._bytes + size > self.max_bytes):
            oldest, (old_entry, old_size) = entries.popitem(last=False)
            self._bytes -= old_size
            if old_entry.live(now):
                self.evictions += 1
            if oldest in self._waiters:
                self._wake(oldest)


class _AsyncMemoryStore(DirectAsyncStore):
    """The asyncio view of a :class:`MemoryStore`: same records, waits on loop futures."""

    store: MemoryStore

    async def wait(self, key: str, timeout: float) -> Record | None:
        loop = asyncio.get_running_loop()
        deadline = self.store._clock() + timeout
        while True:
            woken: asyncio.Future[None] = loop.create_future()

            def wake(future: asyncio.Future[None] = woken) -> None:
                loop.call_soon_threadsafe(_resolve, future)

            record, pause = self.store._wait_step(key, deadline, wake)
            if pause <= 0:
                return record
            try:
                await asyncio.wait_for(woken, pause)
            except asyncio.TimeoutError:
                pass
            finally:
                self.store._unsubscribe(key, wake)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
