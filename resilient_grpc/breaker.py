"""``CircuitBreaker``: stop calling a backend that keeps failing, probe it once in a while.

Built on ``pybreaker``: its storage (memory, or ``CircuitRedisStorage`` shared by many
processes), its closed/open/half-open states, its failure counter and its transitions are
used as they are. What this module adds:

* one pybreaker breaker per target (by default), made on first use;
* only unhealthy-backend status codes count as failures (``UNHEALTHY_CODES`` by default);
  any other answer, business errors included, proves the backend is up and counts as a success;
* in the closed state a failure is fed to pybreaker only while the failure *rate* over the last
  ``window`` seconds is at least ``failure_rate`` (:class:`~resilient_grpc.core.failure_window.
  FailureWindow`): one cut connection fails every call in flight on it at once, and a breaker
  counting only consecutive failures would open on a healthy backend;
* admission is split from the outcome, so the breaker's lock is never held across an RPC
  (``pybreaker.CircuitBreaker.call`` holds it for the whole call, which would serialize every
  call to a target): :meth:`TargetBreaker.admit` says whether an attempt may go out,
  :meth:`TargetBreaker.record` replays its outcome through pybreaker's own state machine;
* in half-open state exactly one probe is in flight per process; other calls fail fast;
* transitions are reported to :func:`resilient_grpc.telemetry.breaker_state_changed`.

With Redis storage every admission and outcome is a Redis round trip: the aio shell runs
them off the event loop (``TargetBreaker.blocking``). pybreaker stores the opening time in
whole seconds in Redis, so a shared breaker may probe up to a second before ``reset_timeout``.
If the storage fails (Redis down), calls go through unguarded (pybreaker's own fallback is the
closed state) and the outage is logged once on the ``resilient_grpc.breaker`` logger.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

import pybreaker

from resilient_grpc import telemetry
from resilient_grpc.core.codes import UNHEALTHY_CODES, code_names
from resilient_grpc.core.failure_window import FailureWindow
from resilient_grpc.core.validation import finite_number, whole_number

StorageFactory = Callable[[str], pybreaker.CircuitBreakerStorage]

_UTC = datetime.timezone.utc
_log = logging.getLogger(__name__)


class Admission(Enum):
    """What :meth:`TargetBreaker.admit` decided for one attempt (pass it back to ``record``)."""

    #: The breaker is open: fail fast, the attempt does not go out.
    REFUSED = "refused"
    #: The breaker is closed: the attempt goes out.
    ADMITTED = "admitted"
    #: The breaker is half-open and this attempt is its single probe.
    PROBE = "probe"
    #: The breaker is open and this attempt is one of its regular probes (``probe_every``).
    SAMPLE = "sample"


REFUSED = Admission.REFUSED
ADMITTED = Admission.ADMITTED
PROBE = Admission.PROBE
SAMPLE = Admission.SAMPLE


class _Unhealthy(Exception):
    """The outcome replayed into pybreaker for an attempt that failed with an unhealthy code."""


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _Unhealthy


class _TelemetryListener(pybreaker.CircuitBreakerListener):
    """Forwards pybreaker's state changes to the telemetry facade."""

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else pybreaker.STATE_CLOSED
        telemetry.breaker_state_changed(cb.name or "", old, new_state.name)


_LISTENER = _TelemetryListener()


class TargetBreaker:
    """The breaker of one target: a pybreaker breaker plus a per-process probe slot.

    The pybreaker breaker is made on first use, inside :meth:`admit` (so with Redis storage
    even its setup round trips run where the caller runs blocking breaker I/O).
    """

    __slots__ = (
        "__weakref__",
        "_breaker",
        "_fast_success",
        "_lock",
        "_make",
        "_memory",
        "_probe_every",
        "_probing",
        "_refusals",
        "_storage_down",
        "_window",
        "blocking",
        "name",
        "rejected_until",
    )

    def __init__(
        self,
        make: Callable[[], pybreaker.CircuitBreaker],
        *,
        name: str,
        blocking: bool,
        window: FailureWindow,
        fast_success: bool = True,
        probe_every: int | None = None,
    ) -> None:
        self._make = make
        self._probe_every = probe_every
        #: Calls refused since the last one let through as a probe (``probe_every``).
        self._refusals = 0
        self._window = window
        self._breaker: pybreaker.CircuitBreaker | None = None
        #: The in-process storage, read without the lock on the hot path (``None``: I/O storage).
        self._memory: pybreaker.CircuitMemoryStorage | None = None
        self._fast_success = fast_success
        self._lock = threading.Lock()
        self._probing = False
        self._storage_down = False
        #: True when the storage does I/O (Redis): aio code must not call it on the loop.
        self.blocking = blocking
        self.name = name
        #: When the last refused admission said the next probe may go (UTC; ``None``: a probe
        #: is in flight). Read by the caller to explain the refusal without more I/O.
        self.rejected_until: datetime.datetime | None = None

    @property
    def circuit(self) -> pybreaker.CircuitBreaker:
        """The underlying ``pybreaker.CircuitBreaker`` (state, counters, listeners)."""
        with self._lock:
            return self._get()

    def _get(self) -> pybreaker.CircuitBreaker:
        breaker = self._breaker
        if breaker is None:
            breaker = self._breaker = self._make()
            storage = breaker._state_storage
            if isinstance(storage, pybreaker.CircuitMemoryStorage):
                self._memory = storage
        return breaker

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"`` (notices changes made by other processes)."""
        with self._lock:
            return str(self._get().state.name)

    def admit(self) -> Admission:
        """May an attempt go out now? Anything but :attr:`Admission.REFUSED` lets it go.

        An open breaker whose ``reset_timeout`` has elapsed moves to half-open and admits this
        attempt as its single probe; the caller must then :meth:`record` (or :meth:`release`).
        """
        memory = self._memory
        if memory is not None and memory.state == pybreaker.STATE_CLOSED:
            return ADMITTED  # the common case, lock-free: one attribute read
        with self._lock:
            try:
                admission = self._admit_locked()
            except Exception as error:  # storage outage (Redis down): fail open, like pybreaker
                self._storage_failed(error)
                return ADMITTED
            self._storage_down = False
            return admission

    def _admit_locked(self) -> Admission:
        breaker = self._get()
        state = breaker.state.name  # reads the storage; notifies listeners of remote changes
        if state == pybreaker.STATE_CLOSED:
            return ADMITTED
        if self._probing:
            self.rejected_until = None
            return REFUSED
        if state == pybreaker.STATE_OPEN:
            opened_at = breaker._state_storage.opened_at
            if opened_at is not None:
                retry_at = opened_at + datetime.timedelta(seconds=breaker.reset_timeout)
                if datetime.datetime.now(_UTC) < retry_at:
                    self.rejected_until = retry_at
                    every = self._probe_every
                    if every is not None:
                        self._refusals += 1
                        if self._refusals >= every:  # one call in `every` probes the backend
                            self._refusals = 0
                            return SAMPLE
                    return REFUSED
            breaker.half_open()
        self._probing = True
        return PROBE

    def record(self, admission: Admission, failed: bool) -> bool:
        """Feed one attempt's outcome to pybreaker; return True if the breaker is open now.

        ``failed`` means the attempt ended with an unhealthy code. An outcome that arrives while
        the breaker is open (another call opened it meanwhile) is ignored, as pybreaker would.
        """
        memory = self._memory
        if (
            not failed
            and admission is ADMITTED
            and self._fast_success
            and memory is not None
            and memory.counter == 0
            and memory.state == pybreaker.STATE_CLOSED
        ):
            self._window.success()
            return False  # a success with nothing to reset and nobody to tell: lock-free
        with self._lock:
            if admission is PROBE:
                self._probing = False
            try:
                breaker = self._get()
                before = breaker.current_state
                if admission is SAMPLE and before == pybreaker.STATE_OPEN and not failed:
                    # A probe let through the open breaker was answered: the backend is back.
                    # Half-open, then the success below closes it (after success_threshold).
                    breaker.half_open()
                    before = breaker.current_state
                if before == pybreaker.STATE_OPEN:
                    return True
                if not failed:
                    self._window.success()
                elif not self._window.failure() and before == pybreaker.STATE_CLOSED:
                    # A failure amid mostly healthy traffic (say, the calls in flight on one
                    # cut connection): remembered in the window, not counted towards opening.
                    return False
                with contextlib.suppress(_Unhealthy, pybreaker.CircuitBreakerError):
                    breaker.call(_fail if failed else _succeed)
                after = breaker.current_state
                if after == pybreaker.STATE_CLOSED and before != pybreaker.STATE_CLOSED:
                    self._window.clear()  # recovered: the failures before are history
                return bool(after == pybreaker.STATE_OPEN)
            except Exception as error:  # storage outage: the outcome is lost, the call is not
                self._storage_failed(error)
                return False

    def _storage_failed(self, error: Exception) -> None:
        """Log a storage outage once (until the storage answers again)."""
        if not self._storage_down:
            self._storage_down = True
            _log.warning(
                "circuit breaker %s: state storage failed (%s: %s); calls go through "
                "unguarded until it answers again",
                self.name,
                type(error).__name__,
                error,
            )

    def release(self, admission: Admission) -> None:
        """Give the probe slot back without an outcome (the attempt was abandoned locally)."""
        if admission is PROBE:
            with self._lock:
                self._probing = False


class CircuitBreaker:
    """Fail fast while a backend is unhealthy, then let one probe call test it.

    After ``fail_max`` consecutive attempts failing with one of ``codes`` (default
    :data:`~resilient_grpc.core.codes.UNHEALTHY_CODES`: UNAVAILABLE, DEADLINE_EXCEEDED,
    RESOURCE_EXHAUSTED, INTERNAL), counted only while at least ``failure_rate`` of the attempts
    to the target in the last ``window`` seconds failed, the breaker of that target opens: calls raise
    :class:`~resilient_grpc.errors.BreakerOpenError` at once, without touching the network.
    After ``reset_timeout`` seconds one probe goes through; ``success_threshold`` successful
    probes close it, a failed probe opens it again. Any answer with another code (OK or a
    business error such as NOT_FOUND) counts as a success.

    While it is open, one call in ``probe_every`` (default 20: 5% of the traffic) is let
    through as a probe as well; when it succeeds the breaker closes at once. A breaker that only
    waits out ``reset_timeout`` keeps failing every call for up to that long after the backend
    is back (issue 11 measured it: self-inflicted downtime after every outage); with the probes
    the return of the backend is seen after about ``probe_every`` calls (0.2 s at 100 calls/s),
    and ``reset_timeout`` (default 5 s) only bounds it when traffic is low. The probes are calls
    the callers made anyway, never retried while the breaker is open: the backend gets at most
    1/``probe_every`` of the offered load during an outage. ``probe_every=None`` gives
    pybreaker's single timed probe. The count is kept per process.

    Why the rate: when one connection is cut, every call in flight on it fails within
    milliseconds, although the backend is fine (their retries succeed). With the defaults
    (``window=1.0`` s, ``failure_rate=0.5``) such a burst amid healthy traffic does not open the
    breaker, while a real outage (every attempt failing) opens it after ``fail_max`` failures
    when there was no traffic before, and about ``window * failure_rate`` seconds plus
    ``fail_max`` failures into the outage when there was (whatever the call rate).
    ``failure_rate=0`` gives pybreaker's plain consecutive-failure rule. The window is kept per
    process, also with shared storage.

    A DEADLINE_EXCEEDED caused by the caller's own deadline counts neither as a failure nor as
    a success: it says how patient that caller is, not how healthy the backend is, and one
    impatient caller must not open the breaker for everyone calling the target. An attempt cut
    by the policy's ``per_attempt_timeout`` (the configured expectation of the backend) and a
    DEADLINE_EXCEEDED returned by the server do count. A cancelled call counts neither way.

    ``per_target=True`` keeps one breaker per channel target (named ``f"{name}:{target}"``);
    ``False`` shares one breaker by every target. ``storage`` is where state lives: ``None``
    (process memory), a ``pybreaker`` storage instance (then one breaker for all targets, e.g.
    ``pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, redis.Redis(...), namespace=...)``
    to share it across processes), or a function ``target -> storage`` for per-target shared
    state (see :meth:`redis`). ``listeners`` are extra ``pybreaker.CircuitBreakerListener``
    objects; bad arguments raise ``ValueError`` naming the argument.
    """

    def __init__(
        self,
        fail_max: int = 5,
        reset_timeout: float = 5.0,
        *,
        probe_every: int | None = 20,
        success_threshold: int = 1,
        window: float = 1.0,
        failure_rate: float = 0.5,
        codes: Iterable[object] = UNHEALTHY_CODES,
        per_target: bool = True,
        storage: pybreaker.CircuitBreakerStorage | StorageFactory | None = None,
        name: str = "resilient_grpc",
        listeners: Iterable[pybreaker.CircuitBreakerListener] = (),
    ) -> None:
        whole_number("fail_max", fail_max, at_least=1)
        reset_timeout = finite_number("reset_timeout", reset_timeout, above=0.0, unit=" of seconds")
        whole_number("success_threshold", success_threshold, at_least=1)
        if probe_every is not None:
            whole_number("probe_every", probe_every, at_least=1)
        self.probe_every = probe_every
        FailureWindow(window, failure_rate)  # validates both, naming the argument
        self.window = float(window)
        self.failure_rate = float(failure_rate)
        self.codes: frozenset[str] = code_names(codes, field="codes")
        if "OK" in self.codes:
            raise ValueError("codes: OK is a success and cannot count as a failure")
        if not isinstance(per_target, bool):
            raise ValueError(f"per_target must be True or False, got {per_target!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if storage is not None and not (
            isinstance(storage, pybreaker.CircuitBreakerStorage) or callable(storage)
        ):
            raise ValueError(
                "storage must be None, a pybreaker.CircuitBreakerStorage or a function "
                f"target -> storage; got {storage!r}"
            )
        self.fail_max = fail_max
        self.reset_timeout = float(reset_timeout)
        self.success_threshold = success_threshold
        self.per_target = per_target and not isinstance(storage, pybreaker.CircuitBreakerStorage)
        self.name = name
        self._storage = storage
        self._user_listeners = tuple(listeners)
        self._listeners = (*self._user_listeners, _LISTENER)
        self._lock = threading.Lock()
        self._targets: dict[str, TargetBreaker] = {}

    @classmethod
    def redis(
        cls, client: Any, *, namespace: str = "resilient_grpc", **kwargs: Any
    ) -> CircuitBreaker:
        """A breaker whose per-target state lives in Redis (``client``: a sync ``redis.Redis``,
        or a ``redis.cluster.RedisCluster``).

        Every process that builds it with the same ``namespace`` shares the state of each target.
        """
        import redis.cluster  # the caller has a redis client: the extra is installed

        cluster = isinstance(client, redis.cluster.RedisCluster)

        def factory(target: str) -> pybreaker.CircuitBreakerStorage:
            return pybreaker.CircuitRedisStorage(
                pybreaker.STATE_CLOSED,
                client,
                namespace=f"{namespace}:{target}",
                cluster_mode=cluster,  # no WATCH/MULTI across the cluster's slots
            )

        return cls(storage=factory, name=namespace, **kwargs)

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(fail_max={self.fail_max!r}, reset_timeout={self.reset_timeout!r}, "
            f"probe_every={self.probe_every!r}, "
            f"window={self.window!r}, failure_rate={self.failure_rate!r}, "
            f"per_target={self.per_target!r}, codes={sorted(self.codes)!r})"
        )

    def counts(self, code: str) -> bool:
        """Whether an attempt ending with status ``code`` (a name) counts as a failure."""
        return code in self.codes

    def for_target(self, target: str | None) -> TargetBreaker:
        """The breaker of ``target`` (made on first use; shared by every call to it)."""
        key = (target or "default") if self.per_target else "*"
        found = self._targets.get(key)
        if found is not None:
            return found
        with self._lock:
            found = self._targets.get(key)
            if found is None:
                found = self._make(key)
                self._targets[key] = found
            return found

    def _make(self, key: str) -> TargetBreaker:
        name = self.name if key == "*" else f"{self.name}:{key}"
        storage = self._storage

        def make() -> pybreaker.CircuitBreaker:
            state_storage = storage
            if state_storage is not None and not isinstance(
                state_storage, pybreaker.CircuitBreakerStorage
            ):
                state_storage = state_storage(key)
            return pybreaker.CircuitBreaker(
                fail_max=self.fail_max,
                reset_timeout=self.reset_timeout,
                success_threshold=self.success_threshold,
                listeners=list(self._listeners),
                state_storage=state_storage,
                name=name,
            )

        # A storage function is assumed to do I/O (it exists to share state); an instance is
        # blocking unless it is pybreaker's memory storage.
        blocking = storage is not None and not isinstance(storage, pybreaker.CircuitMemoryStorage)
        target = TargetBreaker(
            make,
            name=name,
            blocking=blocking,
            window=FailureWindow(self.window, self.failure_rate),
            fast_success=not self._user_listeners,
            probe_every=self.probe_every,
        )
        if not blocking:
            target.circuit  # noqa: B018  (made now: in-process, and the hot path needs it)
        telemetry.register_breaker(target)  # reported in the breaker state gauge
        return target
