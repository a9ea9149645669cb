"""MemoryStore: the embedded default, bounded in entries and bytes, with TTL; thread- and asyncio-safe."""

from __future__ import annotations

import asyncio
import heapq
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
    StoreFullError,
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

    Bounded by ``max_entries`` and ``max_bytes`` (accounted by :func:`accounted_size`, measured to
    cover the real Python objects). An in-progress record (a live claim) is never evicted: its
    duplicate would run concurrently. When a new record would exceed a bound, expired records and
    then the oldest completed records are evicted first (a completed key evicted before its TTL is
    no longer deduplicated, so size the bounds for your traffic times ``ttl``); a store full of
    live claims refuses a new claim with :class:`~resilient_grpc.stores.base.StoreFullError`,
    whose ``retry_after`` is when the soonest live claim's lease ends (with per-method leases a
    lapsed claim is dropped even behind a longer live one). All operations take one short lock
    and never do I/O, so the same store serves threads and the event loop (:meth:`as_async`).
    Waiters are woken when a key completes or is released, without polling.
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
        # Claims (IN_PROGRESS, ENTRY_OVERHEAD bytes each), never evicted while live, and
        # completed records in a queue, oldest write first, evicted oldest first. An OrderedDict,
        # not a plain dict: a full store evicts on every write, and finding the first live item
        # of a dict whose front has been popped scans every deleted slot (tens of µs a call at
        # 100k records); popitem(last=False) is O(1).
        self._claims: dict[str, Entry] = {}
        self._done: OrderedDict[str, tuple[Entry, int]] = OrderedDict()
        # (lease end, key, token) of every claim, soonest end first: with per-method leases the
        # oldest claim is not the first to lapse. Entries of claims since completed, released,
        # renewed or taken over stay until they reach the top (or a rebuild) and are skipped.
        self._leases: list[tuple[float, str, int]] = []
        self._bytes = 0
        self._waiters: dict[str, list[Callable[[], None]]] = {}
        #: completed or expired records dropped to make room before their TTL ended
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._claims) + len(self._done)

    @property
    def bytes_used(self) -> int:
        """Accounted bytes of all records (never above ``max_bytes``)."""
        return self._bytes

    def claim(self, key: str, fingerprint: bytes, *, lease: float) -> ClaimResult:
        token = new_token()
        now = self._clock()
        with self._lock:
            claims = self._claims
            existing = claims.get(key)
            if existing is None:
                found = self._done.get(key)
                if found is not None:
                    existing = found[0]
            entry = claim_entry(existing, fingerprint, token, now=now, lease=lease)
            if entry is None:
                assert existing is not None
                return ClaimResult(None, existing.view(now))
            if existing is not None:  # a lapsed claim or an expired record: drop it first
                self._drop(key)
            if (
                len(claims) + len(self._done) >= self.max_entries
                or self._bytes + ENTRY_OVERHEAD > self.max_bytes
            ):
                self._make_room(ENTRY_OVERHEAD, now)
            claims[key] = entry
            self._bytes += ENTRY_OVERHEAD
            self._track_lease(key, entry)
        return ClaimResult(token)

    def complete(self, key: str, token: int, outcome: Outcome, *, ttl: float | None = None) -> bool:
        """See :meth:`Store.complete`. An outcome that cannot fit even after evicting every
        completed record is stored as a marker without its payload (``omitted_bytes``, replayed
        as "too large to replay"): the key is never executed again."""
        now = self._clock()
        with self._lock:
            entry = complete_entry(
                self._claims.get(key),
                token,
                outcome,
                now=now,
                ttl=self.ttl if ttl is None else ttl,
            )
            if entry is None:
                return False
            size = accounted_size(entry)
            if self._bytes + size - ENTRY_OVERHEAD > self.max_bytes:
                entry, size = self._room_for_outcome(entry, size, now)
            del self._claims[key]
            self._done[key] = (entry, size)
            self._bytes += size - ENTRY_OVERHEAD
            if self._waiters:
                self._wake(key)
        return True

    def release(self, key: str, token: int) -> bool:
        with self._lock:
            if not release_allowed(self._claims.get(key), token):
                return False
            del self._claims[key]
            self._bytes -= ENTRY_OVERHEAD
            if self._waiters:
                self._wake(key)
        return True

    def renew(self, key: str, token: int, *, lease: float) -> bool:
        now = self._clock()
        with self._lock:
            claims = self._claims
            found = claims.get(key)
            if found is None:
                return False
            entry = renew_entry(found, token, now=now, lease=lease)
            if entry is None:
                return False
            claims[key] = entry  # same size
            self._track_lease(key, entry)
        return True

    def get(self, key: str) -> Record | None:
        now = self._clock()
        with self._lock:
            entry = self._claims.get(key)
            if entry is None:
                found = self._done.get(key)
                if found is None:
                    return None
                entry = found[0]
            if not entry.live(now):
                return None
            return entry.view(now)

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
            entry = self._claims.get(key)
            if entry is None:
                found = self._done.get(key)
                entry = found[0] if found is not None else None
            if entry is None or not entry.live(now):
                return None, 0.0
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

    def _track_lease(self, key: str, entry: Entry) -> None:
        """Index a new or renewed claim by its lease end; rebuild the index when skipped entries
        outnumber live ones (amortised O(log n) a write)."""
        leases = self._leases
        heapq.heappush(leases, (entry.lease_until, key, entry.token))
        if len(leases) > 2 * len(self._claims) + 64:
            leases[:] = [(e.lease_until, k, e.token) for k, e in self._claims.items()]
            heapq.heapify(leases)

    def _soonest_claim(self) -> tuple[str, Entry]:
        """The claim whose lease ends first (skipping index entries of claims that moved on)."""
        leases = self._leases
        claims = self._claims
        while True:
            until, key, token = leases[0]
            entry = claims.get(key)
            if entry is not None and entry.token == token and entry.lease_until == until:
                return key, entry
            heapq.heappop(leases)

    def _drop(self, key: str) -> None:
        """Forget ``key``'s record, whichever queue holds it."""
        if self._claims.pop(key, None) is not None:
            self._bytes -= ENTRY_OVERHEAD
        else:
            _, size = self._done.pop(key)
            self._bytes -= size

    def _room_for_outcome(self, entry: Entry, size: int, now: float) -> tuple[Entry, int]:
        """Make room for a completed ``entry`` replacing its claim, or for its marker form."""
        try:
            self._make_room(size - ENTRY_OVERHEAD, now, adds_entry=False)
            return entry, size
        except StoreFullError:
            outcome = entry.outcome
            assert outcome is not None
            if outcome.omitted_bytes:
                raise
        marker = Outcome(outcome.code, omitted_bytes=outcome.size)
        entry = Entry(entry.state, entry.fingerprint, entry.token, now, entry.expires_at, marker)
        size = accounted_size(entry)
        self._make_room(size - ENTRY_OVERHEAD, now, adds_entry=False)
        return entry, size

    def _make_room(self, size: int, now: float, *, adds_entry: bool = True) -> None:
        """Evict until ``size`` more bytes (and one more entry if ``adds_entry``) fit: completed
        records oldest first, then claims whose lease lapsed; raise :class:`StoreFullError` when
        only live claims are left (they are never evicted)."""
        done = self._done
        claims = self._claims
        extra = 1 if adds_entry else 0
        while (
            len(claims) + len(done) + extra > self.max_entries
            or self._bytes + size > self.max_bytes
        ):
            if done:
                _, (old_entry, old_size) = done.popitem(last=False)
                self._bytes -= old_size
                if old_entry.expires_at > now:
                    self.evictions += 1
                continue
            if claims:
                soonest, first = self._soonest_claim()
                if first.lease_until <= now:  # its executor is presumed dead: free to drop
                    del claims[soonest]
                    heapq.heappop(self._leases)
                    self._bytes -= ENTRY_OVERHEAD
                    if soonest in self._waiters:
                        self._wake(soonest)
                    continue
                raise StoreFullError(
                    f"MemoryStore is full of live claims ({len(claims)} in progress, "
                    f"{self._bytes} of max_bytes={self.max_bytes} accounted bytes, "
                    f"max_entries={self.max_entries})",
                    retry_after=max(first.lease_until - now, 0.001),
                )
            raise StoreFullError(
                f"a record of {size} accounted bytes cannot fit max_bytes={self.max_bytes}",
                retry_after=1.0,
            )


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
