"""The server-side dedup state machine: records, store transitions and the per-call flow (sans-IO).

A key lives in a store as one :class:`Entry`: ``IN_PROGRESS`` (claimed by one executor, holding a
random fencing token, until its lease lapses) or ``COMPLETED`` (the :class:`Outcome`: response
bytes or a status, until its TTL lapses). :func:`claim_entry`, :func:`complete_entry`,
:func:`renew_entry` and :func:`release_allowed` are the only transitions; the in-process stores
apply them under a lock or inside one SQLite transaction, the Redis store mirrors them in Lua. :class:`DedupFlow` is the
whole decision procedure of one call as a state machine of effects (held by one
:class:`resilient_grpc.server.FlowDriver` per call), so the sync and ``grpc.aio`` interceptors
only perform the effects (claim, run, complete, release, wait) and never decide. Lease renewal
decisions (:func:`renewed`) and per-method leases (:class:`LeaseTable`) live here too.

Nothing here imports grpc, sleeps or does I/O; clocks are passed in. The small records and
effects are plain (non-frozen) slotted dataclasses because frozen ones cost several times more
to build on this per-call path; treat them as immutable. :class:`Outcome` is frozen.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from resilient_grpc.core.codes import STATUS_CODE_NAMES
from resilient_grpc.core.keys import MAX_KEY_LENGTH, key_problem
from resilient_grpc.core.methods import method_patterns
from resilient_grpc.core.pushback import PUSHBACK_HEADER
from resilient_grpc.core.validation import finite_number

#: Trailer added to every replayed answer.
REPLAYED_HEADER = "idempotency-replayed"
_REPLAYED_TRAILER = (REPLAYED_HEADER, "true")

#: Handler outcomes that are a property of the request, so a repeat must get the same answer:
#: they are stored and replayed. Everything else (UNAVAILABLE, an unexpected exception = UNKNOWN,
#: INTERNAL, DEADLINE_EXCEEDED, CANCELLED, ABORTED, RESOURCE_EXHAUSTED, DATA_LOSS, and
#: PERMISSION_DENIED / UNAUTHENTICATED, which change when credentials or grants do) releases the
#: claim so a retry may execute again.
CACHEABLE_CODES: frozenset[str] = frozenset(
    {
        "OK",
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
    }
)

Metadata = tuple[tuple[str, "str | bytes"], ...]
Clock = Callable[[], float]


class RecordState(str, Enum):
    """Where a key stands."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


@dataclass(frozen=True, slots=True)
class Outcome:  # frozen: one stored outcome is shared by every replay
    """A handler's answer as it goes on the wire: status, trailers and serialized responses.

    ``responses`` holds one message for a unary response, every message for a stream, none for
    an error without messages. ``omitted_bytes`` > 0 marks an outcome whose responses were too
    large to store: only the fact that the call completed is kept. ``initial_metadata`` is what
    the handler sent with ``send_initial_metadata`` (replayed before the responses).
    """

    code: str = "OK"
    details: str = ""
    trailing_metadata: Metadata = ()
    responses: tuple[bytes, ...] = ()
    omitted_bytes: int = 0
    initial_metadata: Metadata = ()

    @property
    def size(self) -> int:
        """Bytes this outcome occupies when stored (responses, details and metadata)."""
        total = len(self.details) + sum(map(len, self.responses))
        for key, value in self.trailing_metadata:
            total += len(key) + len(value)
        for key, value in self.initial_metadata:
            total += len(key) + len(value)
        return total

    @property
    def cacheable(self) -> bool:
        """Whether this outcome is stored and replayed (see :data:`CACHEABLE_CODES`)."""
        return self.code in CACHEABLE_CODES


@dataclass(slots=True)
class Entry:
    """A stored record. Times are absolute on the owning store's clock.

    ``lease_until`` matters only while ``IN_PROGRESS``; ``expires_at`` is when the record may be
    dropped (the lease end for a claim, the TTL end for a completed outcome).
    """

    state: RecordState
    fingerprint: bytes
    token: int
    lease_until: float
    expires_at: float
    outcome: Outcome | None = None

    def live(self, now: float) -> bool:
        """Whether the record still binds the key at ``now`` (not expired, lease not lapsed)."""
        if self.expires_at <= now:
            return False
        return self.state is RecordState.COMPLETED or self.lease_until > now

    def view(self, now: float) -> Record:
        """What a caller sees: the record with its remaining lease in seconds."""
        left = self.lease_until - now if self.state is RecordState.IN_PROGRESS else 0.0
        return Record(self.state, self.fingerprint, self.outcome, max(left, 0.0))


@dataclass(slots=True)
class Record:
    """A live record as returned by a store: state, request fingerprint, outcome, lease left."""

    state: RecordState
    fingerprint: bytes
    outcome: Outcome | None = None
    lease_left: float = 0.0


@dataclass(slots=True)
class ClaimResult:
    """A store's answer to a claim: our fencing ``token`` if we own the key, else the live ``record``."""

    token: int | None
    record: Record | None = None


# ---------------------------------------------------------------------------- keys and hashes


def _field(value: str) -> bytes:
    data = value.encode("utf-8", "surrogatepass")
    return len(data).to_bytes(4, "big") + data


#: Encoded identity prefixes of store keys: a server sees few distinct identities, and encoding
#: them is most of the cost of a key. Bounded, so a flood of identities cannot grow it.
_prefixes: dict[str, bytes] = {}
#: Encoded method names, the prefix of every request fingerprint (bounded by the services).
_methods: dict[str, bytes] = {}
_PREFIX_LIMIT = 4096


def scoped_key(identity: str, key: str) -> str:
    """The store key of ``key`` sent by caller ``identity``: a SHA-256 hex digest.

    Length-prefixed fields, so no two (identity, key) pairs share an encoding; stores keep only
    this hash, never the raw key. The method is not part of it: it is bound by the request
    fingerprint (:func:`request_fingerprint`), so a key reused on another method finds the
    first method's record and is refused as a conflict instead of executing again.
    """
    prefix = _prefixes.get(identity)
    if prefix is None:
        prefix = _field(identity)
        if len(_prefixes) < _PREFIX_LIMIT:
            _prefixes[identity] = prefix
    return hashlib.sha256(prefix + _field(key)).hexdigest()


def fingerprint(request: bytes) -> bytes:
    """The fingerprint of some bytes: their SHA-256 digest (32 bytes)."""
    return hashlib.sha256(request).digest()


def canonical_bytes(request: object, raw: bytes) -> bytes:
    """The bytes that identify a request: a protobuf message's deterministic serialization (map
    entries sorted, fields in number order, however the sender ordered them), else ``raw``.

    Two equal protobuf requests serialized by different processes or languages can differ
    byte for byte (map order is unspecified); their deterministic re-serialization does not.
    Duck-typed (``SerializeToString(deterministic=True)``), so this module needs no protobuf.
    """
    serialize = getattr(request, "SerializeToString", None)
    if serialize is None:
        return raw
    try:
        data = serialize(deterministic=True)
    except TypeError:  # a SerializeToString that is not protobuf's
        return raw
    return data if isinstance(data, bytes) else raw


def request_fingerprint(method: str, request: object, raw: bytes) -> bytes:
    """The fingerprint of a call: SHA-256 of the full method name and the request's
    :func:`canonical_bytes` (32 bytes). A record binds its key to one method and one request."""
    prefix = _methods.get(method)
    if prefix is None:
        prefix = _field(method)
        if len(_methods) < _PREFIX_LIMIT:
            _methods[method] = prefix
    return hashlib.sha256(prefix + canonical_bytes(request, raw)).digest()


def admission_problem(key: str | None, *, required: bool, method: str, header: str) -> str | None:
    """Why a call must be refused with INVALID_ARGUMENT before anything runs, or ``None``."""
    if key is None:
        if required:
            return f"{method} requires an idempotency key in the {header!r} metadata header"
        return None
    if 0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable() and " " not in key:
        return None  # visible ASCII (what key_problem accepts), checked without a Python loop
    problem = key_problem(key)
    if problem is not None:
        return f"invalid {header!r} metadata: {problem}"
    return None


# ---------------------------------------------------------------------------- store transitions


def claim_entry(
    existing: Entry | None, fingerprint: bytes, token: int, *, now: float, lease: float
) -> Entry | None:
    """The entry to write if a claim at ``now`` succeeds, or ``None`` if ``existing`` still binds.

    A claim succeeds on a free key, an expired record or an IN_PROGRESS record whose lease
    lapsed (its executor is presumed dead; the new token fences it out).
    """
    if existing is not None and existing.live(now):
        return None
    until = now + lease
    return Entry(RecordState.IN_PROGRESS, fingerprint, token, until, until)


def _holds_live_claim(existing: Entry | None, token: int, now: float) -> bool:
    """Whether ``existing`` is ``token``'s own IN_PROGRESS claim, its lease not lapsed (fencing)."""
    return (
        existing is not None
        and existing.state is RecordState.IN_PROGRESS
        and existing.token == token
        and existing.lease_until > now
    )


def complete_entry(
    existing: Entry | None, token: int, outcome: Outcome, *, now: float, ttl: float
) -> Entry | None:
    """The COMPLETED entry to write, or ``None`` if ``token`` no longer owns a live claim.

    Fencing: only the holder of the current, unexpired claim may complete; a stale executor
    (lease lapsed, maybe taken over) is refused and cannot overwrite anything.
    """
    if not _holds_live_claim(existing, token, now):
        return None
    assert existing is not None
    return Entry(RecordState.COMPLETED, existing.fingerprint, token, now, now + ttl, outcome)


def renew_entry(existing: Entry | None, token: int, *, now: float, lease: float) -> Entry | None:
    """The claim to write when ``token`` renews its lease at ``now``, or ``None`` if it lost it.

    Fenced like :func:`complete_entry`: only the token's own IN_PROGRESS claim whose lease has
    not lapsed is extended (to ``now + lease``); a lapsed claim stays lapsed.
    """
    if not _holds_live_claim(existing, token, now):
        return None
    assert existing is not None
    until = now + lease
    return Entry(RecordState.IN_PROGRESS, existing.fingerprint, token, until, until)


def release_allowed(existing: Entry | None, token: int) -> bool:
    """Whether ``token`` may delete ``existing`` (its own IN_PROGRESS claim) after a retryable failure."""
    return (
        existing is not None
        and existing.state is RecordState.IN_PROGRESS
        and existing.token == token
    )


# ---------------------------------------------------------------------------- decisions


class Decision(str, Enum):
    """What a call does with the record it found."""

    EXECUTE = "execute"
    REPLAY = "replay"
    CONFLICT = "conflict"
    WAIT = "wait"
    REJECT = "reject"


def decide(claim: ClaimResult, fingerprint: bytes) -> Decision:
    """Classify a claim answer for a request with ``fingerprint``."""
    if claim.token is not None:
        return Decision.EXECUTE
    record = claim.record
    if record is None:
        # The store neither granted the claim nor showed a record: treat as a lost race.
        return Decision.WAIT
    if record.fingerprint != fingerprint:
        return Decision.CONFLICT
    if record.state is RecordState.IN_PROGRESS:
        return Decision.WAIT
    assert record.outcome is not None
    if record.outcome.omitted_bytes:
        return Decision.REJECT
    return Decision.REPLAY


# ---------------------------------------------------------------------------- the per-call flow


@dataclass(slots=True)
class Claim:
    """Effect: claim the key for ``lease`` s for a request with ``fingerprint``.

    Answer: :class:`ClaimResult`, :class:`StoreFull` or :class:`StoreDown`.
    """

    fingerprint: bytes
    lease: float


@dataclass(slots=True)
class Execute:
    """Effect: run the handler (answer: :class:`Execution`, or :class:`Abandoned` if the caller
    went away before it started). ``token`` is ``None`` when failing open."""

    token: int | None


@dataclass(slots=True)
class Complete:
    """Effect: store ``outcome`` under our claim (answer: ``bool`` accepted, or :class:`StoreDown`)."""

    token: int
    outcome: Outcome


@dataclass(slots=True)
class Release:
    """Effect: drop our claim so a retry may execute (answer: ``bool`` or :class:`StoreDown`)."""

    token: int


@dataclass(slots=True)
class Wait:
    """Effect: wait up to ``timeout`` s for the in-flight attempt.

    Answer: ``Record | None`` (what the key holds then), :class:`Crowded` or :class:`StoreDown`.
    """

    timeout: float


Effect = Claim | Execute | Complete | Release | Wait


@dataclass(slots=True)
class StoreDown:
    """Sent back instead of an effect's answer when the store could not be used.

    ``message`` says why, for the server log only: it may name files, hosts or driver errors,
    so it never goes into a status sent to a client. ``event`` is the dedup telemetry event
    counted when it refuses a call (e.g. a record the store could not decode gets its own).
    """

    message: str
    event: str = "store_error"


@dataclass(slots=True)
class CommitFailed(StoreDown):
    """Sent back instead of a completion's answer when the call's transaction (transactional
    mode) did not commit, or whether it did is unknown: the handler's writes were rolled back
    with the record, so its answer must not reach the client. The flow releases the key and
    answers UNAVAILABLE (safe to retry with the same key)."""

    event: str = "commit_failed"


@dataclass(slots=True)
class StoreFull(StoreDown):
    """The store is full of live claims and refused a claim; one may free up in ``retry_after`` s."""

    retry_after: float = 1.0
    event: str = "store_full"


@dataclass(slots=True)
class Crowded:
    """Answer to :class:`Wait`: too many duplicates of this key already wait in this process."""


@dataclass(slots=True)
class Abandoned:
    """Answer to :class:`Execute`: the caller went away before the handler started (it did not run)."""


@dataclass(slots=True)
class Execution:
    """What running the handler produced: its outcome, or ``None`` for an unexpected exception."""

    outcome: Outcome | None


class Action(str, Enum):
    """How the shell ends the call."""

    #: deliver what the handler produced (its response or its exception), unchanged
    EXECUTED = "executed"
    #: send :attr:`Verdict.outcome` (a stored outcome, or a refusal status)
    ANSWER = "answer"


@dataclass(slots=True)
class Verdict:
    """The end of the flow: what to send, the telemetry events to report, and ``detail`` for
    the server log (e.g. a store's own error message; never sent to the client)."""

    action: Action
    outcome: Outcome | None = None
    events: tuple[str, ...] = ()
    detail: str = ""


@dataclass(slots=True)
class FlowSettings:
    """The knobs of one interceptor that the flow needs (``lease``: the default lease)."""

    max_response_bytes: int
    fail_open: bool
    lease: float
    max_pushback: float = 1.0
    min_pushback: float = 0.01


def _pushback_ms(settings: FlowSettings, lease_left: float) -> str:
    """When to come back: the in-flight attempt's remaining lease, capped at ``max_pushback``.

    A live attempt usually finishes well before its lease ends, so the cap keeps a retry from
    idling; a dead one is taken over once its lease lapses, which the capped retries reach.
    """
    seconds = min(max(lease_left, settings.min_pushback), settings.max_pushback)
    return str(max(1, int(seconds * 1000)))


def _replay(outcome: Outcome) -> Outcome:
    return Outcome(
        outcome.code,
        outcome.details,
        (*outcome.trailing_metadata, _REPLAYED_TRAILER),
        outcome.responses,
        outcome.omitted_bytes,
        outcome.initial_metadata,
    )


def _stored_form(outcome: Outcome, limit: int) -> Outcome:
    if outcome.omitted_bytes:
        return outcome
    size = outcome.size
    if size <= limit:
        return outcome
    return Outcome(outcome.code, omitted_bytes=size)


class FlowState(Enum):
    """Where one call's flow stands: the effect whose answer it expects next."""

    CLAIMING = "claiming"
    EXECUTING = "executing"
    COMPLETING = "completing"
    RELEASING = "releasing"
    FAILING_OPEN = "failing_open"
    WAITING = "waiting"


_CLAIMING = FlowState.CLAIMING
_EXECUTING = FlowState.EXECUTING
_COMPLETING = FlowState.COMPLETING
_RELEASING = FlowState.RELEASING
_FAILING_OPEN = FlowState.FAILING_OPEN
_WAITING = FlowState.WAITING
_NO_EVENTS: tuple[str, ...] = ()

#: What the server log says when the store refuses a handler's outcome.
#: What a client is told when its call's transaction did not commit (no internal detail).
COMMIT_FAILED = (
    "the call's transaction did not commit (or its outcome is unknown); "
    "retry with the same idempotency key"
)
COMMIT_FAILED_OUTCOME = Outcome("UNAVAILABLE", COMMIT_FAILED)

COMPLETE_REFUSED = (
    "the store refused the handler's outcome: this call no longer held a live claim on its key "
    "(its lease lapsed, or the store lost the claim), so the outcome was not stored and a retry "
    "may execute again"
)


class DedupFlow:
    """The decision procedure of one call as a small state machine (sans-IO).

    :meth:`start` gives the first effect (a :class:`Claim`); :meth:`send` takes the answer to
    the last effect and gives the next effect, or the :class:`Verdict` that ends the call.
    ``wait_until`` (on ``clock``) is the last moment a concurrent duplicate may keep waiting for
    the in-flight attempt; the shell derives it from the caller's deadline. ``lease`` is this
    method's lease. Production holds one per call in :class:`resilient_grpc.server.FlowDriver`.
    A hand-written state machine rather than a generator: it runs once per call, and the common
    paths (claim, run, complete; claim, replay) allocate nothing beyond their effects.
    """

    __slots__ = (
        "_events",
        "_failed_commit",
        "_last_lease_left",
        "_token",
        "clock",
        "fingerprint",
        "lease",
        "settings",
        "state",
        "wait_until",
    )

    def __init__(
        self,
        fingerprint: bytes,
        settings: FlowSettings,
        *,
        clock: Clock,
        wait_until: float,
        lease: float | None = None,
    ) -> None:
        self.fingerprint = fingerprint
        self.settings = settings
        self.clock = clock
        self.wait_until = wait_until
        self.lease = settings.lease if lease is None else lease
        self.state = _CLAIMING
        self._events: tuple[str, ...] = _NO_EVENTS
        self._last_lease_left = self.lease
        self._token = 0
        #: why the call's transaction did not commit (for the log), once it failed
        self._failed_commit: str | None = None

    def start(self) -> Effect:
        """The first effect: claim the key."""
        return Claim(self.fingerprint, self.lease)

    def send(self, answer: object) -> Effect | Verdict:
        """The next effect after ``answer`` (to the last effect), or the final verdict."""
        state = self.state
        if state is _CLAIMING:
            return self._claimed(answer)
        if state is _EXECUTING:
            return self._executed(answer)
        if state is _COMPLETING or state is _RELEASING:
            return self._settled(answer)
        if state is _FAILING_OPEN:
            if isinstance(answer, Abandoned):
                return Verdict(Action.ANSWER, ABANDONED_OUTCOME, ("abandoned",))
            return Verdict(Action.EXECUTED, events=("fail_open",))
        return self._waited(answer)

    def _executed(self, answer: object) -> Effect:
        if isinstance(answer, Abandoned):  # a known "not executed": free the key for a retry
            self._events = (*self._events, "abandoned")
            self.state = _RELEASING
            return Release(self._token)
        assert isinstance(answer, Execution)
        outcome = answer.outcome
        if outcome is None or not outcome.cacheable:
            self.state = _RELEASING
            return Release(self._token)
        self.state = _COMPLETING
        return Complete(self._token, _stored_form(outcome, self.settings.max_response_bytes))

    def _settled(self, answer: object) -> Effect | Verdict:
        events = self._events
        if "abandoned" in events:
            return Verdict(Action.ANSWER, ABANDONED_OUTCOME, events)
        if self._failed_commit is not None:  # released after a failed commit
            return Verdict(Action.ANSWER, COMMIT_FAILED_OUTCOME, events, self._failed_commit)
        if isinstance(answer, CommitFailed) and self.state is _COMPLETING:
            # transactional mode: the handler's writes rolled back with its record, so its live
            # answer must not reach the client as a success; free the key for the retry
            self._events = (*events, answer.event)
            self._failed_commit = answer.message
            self.state = _RELEASING
            return Release(self._token)
        executed = (*events, "executed") if events else _EXECUTED
        if isinstance(answer, StoreDown):
            # the handler ran: its live result is still delivered, but nothing was stored and
            # the key stays claimed until its lease lapses
            return Verdict(Action.EXECUTED, None, (*executed, "outcome_not_stored"), answer.message)
        if answer is False and self.state is _COMPLETING:
            return Verdict(Action.EXECUTED, None, (*executed, "complete_refused"), COMPLETE_REFUSED)
        return Verdict(Action.EXECUTED, events=executed)

    def _claimed(self, answer: object) -> Effect | Verdict:
        if isinstance(answer, StoreFull):
            # an overload signal, not an outage: fail_open does not apply (running handlers
            # without dedup exactly when the store is saturated would multiply duplicates)
            return _store_full(self.settings, answer, self._events)
        if isinstance(answer, StoreDown):
            if self.settings.fail_open and not self._events:
                self.state = _FAILING_OPEN
                return Execute(None)
            return _store_down(answer, self._events)
        assert isinstance(answer, ClaimResult)
        token = answer.token
        if token is not None:
            self._token = token
            self.state = _EXECUTING
            return Execute(token)
        decision = decide(answer, self.fingerprint)
        record = answer.record
        if decision is not Decision.WAIT:
            return _answer(decision, record, self._events)
        # Another attempt holds the key: wait for it.
        if record is not None:
            self._last_lease_left = record.lease_left
        remaining = self.wait_until - self.clock()
        if remaining <= 0:
            return _still_running(self.settings, self._last_lease_left, self._events)
        if "waited" not in self._events:
            self._events = (*self._events, "waited")
        self.state = _WAITING
        return Wait(remaining)

    def _waited(self, seen: object) -> Effect | Verdict:
        if isinstance(seen, StoreDown):
            return _store_down(seen, self._events)
        if isinstance(seen, Crowded):
            return _still_running(self.settings, self._last_lease_left, (*self._events, "crowded"))
        if isinstance(seen, Record):
            if seen.state is RecordState.COMPLETED:
                decision = decide(ClaimResult(None, seen), self.fingerprint)
                return _answer(decision, seen, self._events)
            self._last_lease_left = seen.lease_left
            if self.wait_until - self.clock() <= 0:
                return _still_running(self.settings, self._last_lease_left, self._events)
        # Released, lapsed or still running: claim again.
        self.state = _CLAIMING
        return Claim(self.fingerprint, self.lease)


# ---------------------------------------------------------------------------- lease renewal

#: A running handler's claim is renewed every ``lease / RENEWALS_PER_LEASE`` seconds, so a
#: handler shorter than that never costs a store round trip, and two renewals may fail (a store
#: blip) before the lease lapses.
RENEWALS_PER_LEASE = 3


def renewal_interval(lease: float) -> float:
    """Seconds between two renewals of a claim of ``lease`` seconds (the first comes after one)."""
    return lease / RENEWALS_PER_LEASE


@dataclass(slots=True)
class Renewal:
    """What to do after a renewal's answer: renew again after ``delay`` s (``None``: stop), and
    the telemetry outcome to report (``event``, with ``detail`` for the server log)."""

    delay: float | None
    event: str | None = None
    detail: str = ""


#: What the server log says when the store refuses to renew a running handler's claim.
LEASE_LOST = (
    "the store refused to renew the lease of a running handler's claim (its lease had lapsed, or "
    "the store lost the claim): a duplicate may execute concurrently, and the outcome will not be "
    "stored"
)


def renewed(answer: object, lease: float) -> Renewal:
    """Decide after a renewal answered ``answer`` (``True``, ``False`` or :class:`StoreDown`).

    Renewed: again one interval later. Refused (the claim is lost): stop and say so. Store
    down: try again one interval later (the lease still covers two more attempts).
    """
    if answer is True:
        return Renewal(renewal_interval(lease))
    if isinstance(answer, StoreDown):
        return Renewal(renewal_interval(lease), "renew_failed", answer.message)
    return Renewal(None, "lease_lost", LEASE_LOST)


_EXECUTED = ("executed",)
_REPLAYED = ("replayed",)

#: Sent when the client is already gone; says what the server did.
ABANDONED_OUTCOME = Outcome(
    "CANCELLED", "the call was cancelled before its handler started; nothing was executed"
)

#: The only thing a client learns about a store failure (the cause goes to the server log).
STORE_UNAVAILABLE = "idempotency store unavailable"


def _store_down(down: StoreDown, events: tuple[str, ...]) -> Verdict:
    return Verdict(
        Action.ANSWER,
        Outcome("UNAVAILABLE", STORE_UNAVAILABLE),
        (*events, down.event),
        down.message,
    )


def _store_full(settings: FlowSettings, full: StoreFull, events: tuple[str, ...]) -> Verdict:
    pushback = _pushback_ms(settings, full.retry_after)
    return Verdict(
        Action.ANSWER,
        Outcome(
            "RESOURCE_EXHAUSTED",
            f"idempotency store is full of in-flight calls; retry after {pushback} ms",
            ((PUSHBACK_HEADER, pushback),),
        ),
        (*events, full.event),
        full.message,
    )


def _answer(decision: Decision, record: Record | None, events: tuple[str, ...]) -> Verdict:
    """The verdict for a record that settles the call: conflict, replay, or a too-large marker."""
    if decision is Decision.CONFLICT:
        return Verdict(Action.ANSWER, CONFLICT_OUTCOME, (*events, "conflict"))
    assert record is not None and record.outcome is not None
    if decision is Decision.REPLAY:
        replayed = (*events, "replayed") if events else _REPLAYED
        return Verdict(Action.ANSWER, _replay(record.outcome), replayed)
    assert decision is Decision.REJECT
    return Verdict(Action.ANSWER, _too_large(record.outcome), (*events, "replayed"))


def _still_running(settings: FlowSettings, lease_left: float, events: tuple[str, ...]) -> Verdict:
    pushback = _pushback_ms(settings, lease_left)
    return Verdict(
        Action.ANSWER,
        Outcome(
            "ABORTED",
            "another attempt with this idempotency key is still in progress; "
            f"retry after {pushback} ms",
            ((PUSHBACK_HEADER, pushback),),
        ),
        events or ("waited",),
    )


CONFLICT_OUTCOME = Outcome(
    "FAILED_PRECONDITION",
    "idempotency key reused with a different request: the key was first used on another method, "
    "or with a request whose content differs from this one",
)


def _too_large(outcome: Outcome) -> Outcome:
    return Outcome(
        "FAILED_PRECONDITION",
        "the call with this idempotency key already executed, but its response "
        f"({outcome.omitted_bytes} bytes) exceeded max_response_bytes and was not stored, "
        "so it cannot be replayed; it will not be executed again",
        ((REPLAYED_HEADER, "true"),),
    )


# ---------------------------------------------------------------------------- wire encoding

#: Format 2 adds the initial metadata after the responses; format 1 (no initial metadata) is
#: still read, so records written before an upgrade replay during a rolling deploy.
_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_CODES = sorted(STATUS_CODE_NAMES)
_CODE_INDEX = {name: index for index, name in enumerate(_CODES)}
_HEAD = struct.Struct(">BBQI")  # version, code index, omitted bytes, details length
_LEN = struct.Struct(">I")


def _encode_metadata(metadata: Metadata, parts: list[bytes]) -> None:
    parts.append(_LEN.pack(len(metadata)))
    for key, value in metadata:
        raw_key = key.encode("ascii")
        is_bytes = isinstance(value, bytes)
        raw_value = value if isinstance(value, bytes) else value.encode("utf-8")
        parts += [
            _LEN.pack(len(raw_key)),
            raw_key,
            b"\x01" if is_bytes else b"\x00",
            _LEN.pack(len(raw_value)),
            raw_value,
        ]


def _decode_metadata(data: bytes, offset: int) -> tuple[Metadata, int]:
    (count,) = _LEN.unpack_from(data, offset)
    offset += 4
    metadata: list[tuple[str, str | bytes]] = []
    for _ in range(count):
        (length,) = _LEN.unpack_from(data, offset)
        key = data[offset + 4 : offset + 4 + length].decode("ascii")
        offset += 4 + length
        is_bytes = data[offset] == 1
        (length,) = _LEN.unpack_from(data, offset + 1)
        raw = data[offset + 5 : offset + 5 + length]
        offset += 5 + length
        metadata.append((key, bytes(raw) if is_bytes else raw.decode("utf-8")))
    return tuple(metadata), offset


def encode_outcome(outcome: Outcome) -> bytes:
    """Serialize an outcome for a store that keeps bytes (SQLite, Redis), in format 2."""
    details = outcome.details.encode("utf-8")
    parts = [
        _HEAD.pack(_VERSION, _CODE_INDEX[outcome.code], outcome.omitted_bytes, len(details)),
        details,
    ]
    _encode_metadata(outcome.trailing_metadata, parts)
    parts.append(_LEN.pack(len(outcome.responses)))
    for response in outcome.responses:
        parts += [_LEN.pack(len(response)), response]
    _encode_metadata(outcome.initial_metadata, parts)
    return b"".join(parts)


def decode_outcome(data: bytes) -> Outcome:
    """Inverse of :func:`encode_outcome` (formats 1 and 2); ``ValueError`` on bytes it did not write."""
    try:
        version, code, omitted, details_length = _HEAD.unpack_from(data, 0)
        if version not in _READABLE_VERSIONS:
            raise ValueError(
                f"stored outcome has format version {version}, expected one of {_READABLE_VERSIONS}"
            )
        offset = _HEAD.size
        details = data[offset : offset + details_length].decode("utf-8")
        offset += details_length
        trailers, offset = _decode_metadata(data, offset)
        (count,) = _LEN.unpack_from(data, offset)
        offset += 4
        responses: list[bytes] = []
        for _ in range(count):
            (length,) = _LEN.unpack_from(data, offset)
            response = bytes(data[offset + 4 : offset + 4 + length])
            if len(response) != length:
                raise ValueError("stored outcome is truncated")
            responses.append(response)
            offset += 4 + length
        initial: Metadata = ()
        if version >= 2:
            initial, offset = _decode_metadata(data, offset)
        if offset != len(data):
            raise ValueError(f"stored outcome has {len(data) - offset} trailing bytes")
        return Outcome(_CODES[code], details, trailers, tuple(responses), omitted, initial)
    except (struct.error, IndexError, UnicodeDecodeError) as error:
        raise ValueError(f"stored outcome is corrupt: {error}") from error


# ---------------------------------------------------------------------------- leases per method

#: The lease of a method that ``lease=`` does not name (seconds).
DEFAULT_LEASE = 30.0


class LeaseTable:
    """How long a claim lasts when its executor dies, per method (the ``lease=`` argument).

    ``lease`` is seconds for every method, or a mapping from ``"/pkg.Service/Method"`` names and
    ``"/pkg.Service/*"`` patterns to seconds (an exact name beats its service's pattern; other
    methods get :data:`DEFAULT_LEASE`). Validated here, so a bad value fails at construction.
    """

    __slots__ = ("_by_method", "_cache", "default", "per_method")

    def __init__(self, lease: float | Mapping[str, float]) -> None:
        if isinstance(lease, Mapping):
            patterns = method_patterns(lease.keys(), field="lease")
            self._by_method = {
                pattern: float(
                    finite_number(
                        f"lease[{pattern!r}]", lease[pattern], above=0.0, unit=" of seconds"
                    )
                )
                for pattern in patterns
            }
            self.default = DEFAULT_LEASE
        else:
            self._by_method = {}
            self.default = float(finite_number("lease", lease, above=0.0, unit=" of seconds"))
        self._cache: dict[str, float] = {}
        #: whether any method has its own lease (else every call gets :attr:`default`)
        self.per_method = bool(self._by_method)

    def __call__(self, method: str) -> float:
        """The lease of ``method`` in seconds."""
        if not self._by_method:
            return self.default
        lease = self._cache.get(method)
        if lease is None:
            by_method = self._by_method
            service = method.rpartition("/")[0]
            lease = by_method.get(method, by_method.get(f"{service}/*", self.default))
            if len(self._cache) < 4096:
                self._cache[method] = lease
        return lease
