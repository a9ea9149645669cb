"""The server-side dedup state machine: records, store transitions and the per-call flow (sans-IO).

A key lives in a store as one :class:`Entry`: ``IN_PROGRESS`` (claimed by one executor, holding a
random fencing token, until its lease lapses) or ``COMPLETED`` (the :class:`Outcome`: response
bytes or a status, until its TTL lapses). :func:`claim_entry`, :func:`complete_entry` and
:func:`release_allowed` are the only transitions; the in-process stores apply them under a lock
or inside one SQLite transaction, the Redis store mirrors them in Lua. :func:`dedup_flow` is the
whole decision procedure of one call as a generator of effects, so the sync and ``grpc.aio``
interceptors only perform the effects (claim, run, complete, release, wait) and never decide.

Nothing here imports grpc, sleeps or does I/O; clocks are passed in. The small records and
effects are plain (non-frozen) slotted dataclasses because frozen ones cost several times more
to build on this per-call path; treat them as immutable. :class:`Outcome` is frozen.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass
from enum import Enum

from resilient_grpc.core.codes import STATUS_CODE_NAMES
from resilient_grpc.core.keys import MAX_KEY_LENGTH, key_problem
from resilient_grpc.core.pushback import PUSHBACK_HEADER

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
    large to store: only the fact that the call completed is kept.
    """

    code: str = "OK"
    details: str = ""
    trailing_metadata: Metadata = ()
    responses: tuple[bytes, ...] = ()
    omitted_bytes: int = 0

    @property
    def size(self) -> int:
        """Bytes this outcome occupies when stored (responses, details and trailers)."""
        total = len(self.details) + sum(map(len, self.responses))
        for key, value in self.trailing_metadata:
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


def complete_entry(
    existing: Entry | None, token: int, outcome: Outcome, *, now: float, ttl: float
) -> Entry | None:
    """The COMPLETED entry to write, or ``None`` if ``token`` no longer owns a live claim.

    Fencing: only the holder of the current, unexpired claim may complete; a stale executor
    (lease lapsed, maybe taken over) is refused and cannot overwrite anything.
    """
    if (
        existing is None
        or existing.state is not RecordState.IN_PROGRESS
        or existing.token != token
        or existing.lease_until <= now
    ):
        return None
    return Entry(RecordState.COMPLETED, existing.fingerprint, token, now, now + ttl, outcome)


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
    """Effect: claim the key for a request with ``fingerprint`` (answer: :class:`ClaimResult` or :class:`StoreDown`)."""

    fingerprint: bytes


@dataclass(slots=True)
class Execute:
    """Effect: run the handler (answer: :class:`Execution`). ``token`` is ``None`` when failing open."""

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
    """Effect: wait up to ``timeout`` s for the in-flight attempt (answer: ``Record | None`` or :class:`StoreDown`)."""

    timeout: float


Effect = Claim | Execute | Complete | Release | Wait


@dataclass(slots=True)
class StoreDown:
    """Sent back instead of an effect's answer when the store could not be reached."""

    message: str


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
    """The end of the flow: what to send and the telemetry outcomes to report."""

    action: Action
    outcome: Outcome | None = None
    events: tuple[str, ...] = ()


@dataclass(slots=True)
class FlowSettings:
    """The knobs of one interceptor that the flow needs."""

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
    )


def _stored_form(outcome: Outcome, limit: int) -> Outcome:
    if outcome.omitted_bytes:
        return outcome
    size = outcome.size
    if size <= limit:
        return outcome
    return Outcome(outcome.code, omitted_bytes=size)


_CLAIMING, _EXECUTING, _SETTLING, _FAILING_OPEN, _WAITING = range(5)
_NO_EVENTS: tuple[str, ...] = ()


class DedupFlow:
    """The decision procedure of one call as a small state machine (sans-IO).

    :meth:`start` gives the first effect (a :class:`Claim`); :meth:`send` takes the answer to
    the last effect and gives the next effect, or the :class:`Verdict` that ends the call.
    ``wait_until`` (on ``clock``) is the last moment a concurrent duplicate may keep waiting for
    the in-flight attempt; the shell derives it from the caller's deadline. A hand-written
    state machine rather than a generator: it runs once per call, and the common paths (claim,
    run, complete; claim, replay) allocate nothing beyond their effects.
    """

    __slots__ = (
        "_events",
        "_last_lease_left",
        "_state",
        "_token",
        "clock",
        "fingerprint",
        "settings",
        "wait_until",
    )

    def __init__(
        self, fingerprint: bytes, settings: FlowSettings, *, clock: Clock, wait_until: float
    ) -> None:
        self.fingerprint = fingerprint
        self.settings = settings
        self.clock = clock
        self.wait_until = wait_until
        self._state = _CLAIMING
        self._events: tuple[str, ...] = _NO_EVENTS
        self._last_lease_left = settings.lease
        self._token = 0

    def start(self) -> Effect:
        """The first effect: claim the key."""
        return Claim(self.fingerprint)

    def send(self, answer: object) -> Effect | Verdict:
        """The next effect after ``answer`` (to the last effect), or the final verdict."""
        state = self._state
        if state == _CLAIMING:
            return self._claimed(answer)
        if state == _EXECUTING:
            assert isinstance(answer, Execution)
            outcome = answer.outcome
            self._state = _SETTLING
            if outcome is None or not outcome.cacheable:
                return Release(self._token)
            return Complete(self._token, _stored_form(outcome, self.settings.max_response_bytes))
        if state == _SETTLING:
            if isinstance(answer, StoreDown):
                return Verdict(Action.EXECUTED, events=(*self._events, "executed", "store_error"))
            if self._events:
                return Verdict(Action.EXECUTED, events=(*self._events, "executed"))
            return Verdict(Action.EXECUTED, events=_EXECUTED)
        if state == _FAILING_OPEN:
            assert isinstance(answer, Execution)
            return Verdict(Action.EXECUTED, events=("fail_open",))
        return self._waited(answer)

    def _claimed(self, answer: object) -> Effect | Verdict:
        if isinstance(answer, StoreDown):
            if self.settings.fail_open and not self._events:
                self._state = _FAILING_OPEN
                return Execute(None)
            return _store_down(answer, self._events)
        assert isinstance(answer, ClaimResult)
        token = answer.token
        if token is not None:
            self._token = token
            self._state = _EXECUTING
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
        self._state = _WAITING
        return Wait(remaining)

    def _waited(self, seen: object) -> Effect | Verdict:
        if isinstance(seen, StoreDown):
            return _store_down(seen, self._events)
        if isinstance(seen, Record):
            if seen.state is RecordState.COMPLETED:
                decision = decide(ClaimResult(None, seen), self.fingerprint)
                return _answer(decision, seen, self._events)
            self._last_lease_left = seen.lease_left
            if self.wait_until - self.clock() <= 0:
                return _still_running(self.settings, self._last_lease_left, self._events)
        # Released, lapsed or still running: claim again.
        self._state = _CLAIMING
        return Claim(self.fingerprint)


_EXECUTED = ("executed",)
_REPLAYED = ("replayed",)


def _store_down(down: StoreDown, events: tuple[str, ...]) -> Verdict:
    return Verdict(
        Action.ANSWER,
        Outcome("UNAVAILABLE", f"idempotency store unavailable: {down.message}"),
        (*events, "store_error"),
    )


def dedup_flow(
    request_fingerprint: bytes,
    settings: FlowSettings,
    *,
    clock: Clock,
    wait_until: float,
) -> Generator[Effect, object, Verdict]:
    """:class:`DedupFlow` as a generator: yields effects, receives their answers, returns the verdict."""
    flow = DedupFlow(request_fingerprint, settings, clock=clock, wait_until=wait_until)
    step: Effect | Verdict = flow.start()
    while not isinstance(step, Verdict):
        step = flow.send((yield step))
    return step


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

_VERSION = 1
_CODES = sorted(STATUS_CODE_NAMES)
_CODE_INDEX = {name: index for index, name in enumerate(_CODES)}
_HEAD = struct.Struct(">BBQI")  # version, code index, omitted bytes, details length
_LEN = struct.Struct(">I")


def encode_outcome(outcome: Outcome) -> bytes:
    """Serialize an outcome for a store that keeps bytes (SQLite, Redis)."""
    details = outcome.details.encode("utf-8")
    parts = [
        _HEAD.pack(_VERSION, _CODE_INDEX[outcome.code], outcome.omitted_bytes, len(details)),
        details,
        _LEN.pack(len(outcome.trailing_metadata)),
    ]
    for key, value in outcome.trailing_metadata:
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
    parts.append(_LEN.pack(len(outcome.responses)))
    for response in outcome.responses:
        parts += [_LEN.pack(len(response)), response]
    return b"".join(parts)


def decode_outcome(data: bytes) -> Outcome:
    """Inverse of :func:`encode_outcome`; raises ``ValueError`` on bytes it did not write."""
    try:
        version, code, omitted, details_length = _HEAD.unpack_from(data, 0)
        if version != _VERSION:
            raise ValueError(f"stored outcome has format version {version}, expected {_VERSION}")
        offset = _HEAD.size
        details = data[offset : offset + details_length].decode("utf-8")
        offset += details_length
        (count,) = _LEN.unpack_from(data, offset)
        offset += 4
        trailers: list[tuple[str, str | bytes]] = []
        for _ in range(count):
            (length,) = _LEN.unpack_from(data, offset)
            key = data[offset + 4 : offset + 4 + length].decode("ascii")
            offset += 4 + length
            is_bytes = data[offset] == 1
            (length,) = _LEN.unpack_from(data, offset + 1)
            raw = data[offset + 5 : offset + 5 + length]
            offset += 5 + length
            trailers.append((key, bytes(raw) if is_bytes else raw.decode("utf-8")))
        (count,) = _LEN.unpack_from(data, offset)
        offset += 4
        responses: list[bytes] = []
        for _ in range(count):
            (length,) = _LEN.unpack_from(data, offset)
            responses.append(bytes(data[offset + 4 : offset + 4 + length]))
            offset += 4 + length
        if offset != len(data):
            raise ValueError(f"stored outcome has {len(data) - offset} trailing bytes")
        return Outcome(_CODES[code], details, tuple(trailers), tuple(responses), omitted)
    except (struct.error, IndexError, UnicodeDecodeError) as error:
        raise ValueError(f"stored outcome is corrupt: {error}") from error
