"""The sans-IO dedup core: keys, fingerprints, encoding, fenced transitions, the per-call flow, and a
hypothesis state machine over claim / complete / fail / expire / replay interleavings."""

from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from resilient_grpc.core.codes import STATUS_CODE_NAMES
from resilient_grpc.core.dedup import (
    REPLAYED_HEADER,
    Abandoned,
    Action,
    Claim,
    ClaimResult,
    CommitFailed,
    Complete,
    Crowded,
    Decision,
    DedupFlow,
    Execute,
    Execution,
    FlowSettings,
    Outcome,
    Record,
    RecordState,
    Release,
    Renewal,
    StoreDown,
    StoreFull,
    Verdict,
    Wait,
    admission_problem,
    decide,
    decode_outcome,
    encode_outcome,
    fingerprint,
    renewal_interval,
    renewed,
    scoped_key,
)
from resilient_grpc.stores import MemoryStore, SQLiteStore, Store

SETTINGS = FlowSettings(max_response_bytes=1000, fail_open=False, lease=5.0)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_scoped_key_separates_identity_and_key_and_hides_the_raw_key() -> None:
    base = scoped_key("alice", "k1")
    assert len(base) == 64 and "k1" not in base
    assert base == scoped_key("alice", "k1")
    assert len({base, scoped_key("alice", "k2"), scoped_key("bob", "k1")}) == 3
    # length-prefixed: moving characters between fields changes the key
    assert scoped_key("ab", "c") != scoped_key("a", "bc")


def test_fingerprint_is_sha256_of_the_bytes() -> None:
    assert fingerprint(b"abc") == fingerprint(b"abc")
    assert fingerprint(b"abc") != fingerprint(b"abd")
    assert len(fingerprint(b"")) == 32


@pytest.mark.parametrize(
    ("key", "required", "expected"),
    [
        (None, False, None),
        (None, True, "/s.S/M requires an idempotency key in the 'idempotency-key' metadata header"),
        ("", False, "invalid 'idempotency-key' metadata: idempotency key is empty"),
        (
            "x" * 256,
            False,
            "invalid 'idempotency-key' metadata: idempotency key is 256 characters long; the maximum is 255",
        ),
        (
            "é",
            False,
            "invalid 'idempotency-key' metadata: idempotency key has a character that is not "
            "visible ASCII ('é' at position 0)",
        ),
        ("x" * 255, True, None),
    ],
)
def test_admission(key: str | None, required: bool, expected: str | None) -> None:
    assert (
        admission_problem(key, required=required, method="/s.S/M", header="idempotency-key")
        == expected
    )


@st.composite
def outcomes(draw: st.DrawFn) -> Outcome:
    return Outcome(
        draw(st.sampled_from(["OK", "NOT_FOUND", "INVALID_ARGUMENT", "ALREADY_EXISTS"])),
        draw(st.text(max_size=30)),
        tuple(
            draw(
                st.lists(
                    st.tuples(
                        st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
                        st.one_of(st.text(max_size=10), st.binary(max_size=10)),
                    ),
                    max_size=3,
                )
            )
        ),
        tuple(draw(st.lists(st.binary(max_size=40), max_size=4))),
        draw(st.integers(min_value=0, max_value=2**40)),
    )


@given(outcomes())
@settings(max_examples=200, deadline=None)
def test_outcome_encoding_round_trips(outcome: Outcome) -> None:
    assert decode_outcome(encode_outcome(outcome)) == outcome


def test_decoding_foreign_bytes_is_a_precise_value_error() -> None:
    with pytest.raises(ValueError, match="format version 9"):
        decode_outcome(b"\x09" + b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt"):
        decode_outcome(b"\x01\x00")
    with pytest.raises(ValueError, match="trailing bytes"):
        decode_outcome(encode_outcome(Outcome()) + b"x")


def test_decide_covers_every_decision() -> None:
    fp, other = fingerprint(b"a"), fingerprint(b"b")
    done = Record(RecordState.COMPLETED, fp, Outcome("OK", responses=(b"r",)))
    assert decide(ClaimResult(7), fp) is Decision.EXECUTE
    assert decide(ClaimResult(None, done), fp) is Decision.REPLAY
    assert decide(ClaimResult(None, done), other) is Decision.CONFLICT
    running = Record(RecordState.IN_PROGRESS, fp, None, 1.0)
    assert decide(ClaimResult(None, running), fp) is Decision.WAIT
    assert decide(ClaimResult(None, running), other) is Decision.CONFLICT
    huge = Record(RecordState.COMPLETED, fp, Outcome("OK", omitted_bytes=10**6))
    assert decide(ClaimResult(None, huge), fp) is Decision.REJECT


def dedup_flow(fp, settings, *, clock, wait_until):  # type: ignore[no-untyped-def]
    """A :class:`DedupFlow` driven as a generator (effects out, answers in) for scripted tests."""
    flow = DedupFlow(fp, settings, clock=clock, wait_until=wait_until)
    step = flow.start()
    while not isinstance(step, Verdict):
        step = flow.send((yield step))
    return step


def _run(flow, answers):  # type: ignore[no-untyped-def]
    """Drive a flow with scripted answers; return (effects seen, verdict)."""
    effects = [next(flow)]
    try:
        for answer in answers:
            effects.append(flow.send(answer))
    except StopIteration as stop:
        return effects, stop.value
    raise AssertionError(f"flow did not finish; effects so far: {effects}")


def test_flow_executes_and_stores_a_cacheable_outcome() -> None:
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    outcome = Outcome("NOT_FOUND", "no such account")
    effects, verdict = _run(flow, [ClaimResult(5), Execution(outcome), True])
    assert effects == [Claim(b"f" * 32, 5.0), Execute(5), Complete(5, outcome)]
    assert verdict.action is Action.EXECUTED and verdict.events == ("executed",)


@pytest.mark.parametrize("code", ["UNAVAILABLE", "UNKNOWN", "INTERNAL", "PERMISSION_DENIED"])
def test_flow_releases_after_a_retryable_failure(code: str) -> None:
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    effects, verdict = _run(flow, [ClaimResult(5), Execution(Outcome(code)), True])
    assert effects[-1] == Release(5)
    assert verdict.action is Action.EXECUTED


def test_flow_releases_after_an_unexpected_exception() -> None:
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    effects, _ = _run(flow, [ClaimResult(5), Execution(None), True])
    assert effects[-1] == Release(5)


def test_flow_stores_only_a_marker_for_an_oversized_outcome() -> None:
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    effects, _ = _run(flow, [ClaimResult(5), Execution(Outcome(responses=(b"x" * 2000,))), True])
    assert effects[-1] == Complete(5, Outcome("OK", omitted_bytes=2000))


def test_flow_replays_with_the_replayed_trailer() -> None:
    clock = FakeClock()
    fp = b"f" * 32
    stored = Outcome("OK", "", (("x-a", "1"),), (b"resp",))
    flow = dedup_flow(fp, SETTINGS, clock=clock, wait_until=clock.now + 1)
    _, verdict = _run(flow, [ClaimResult(None, Record(RecordState.COMPLETED, fp, stored))])
    assert verdict.action is Action.ANSWER and verdict.events == ("replayed",)
    assert verdict.outcome == Outcome(
        "OK", "", (("x-a", "1"), (REPLAYED_HEADER, "true")), (b"resp",)
    )


def test_flow_waits_then_replays_or_aborts_with_pushback() -> None:
    clock = FakeClock()
    fp = b"f" * 32
    running = Record(RecordState.IN_PROGRESS, fp, None, 2.5)
    done = Record(RecordState.COMPLETED, fp, Outcome(responses=(b"r",)))
    flow = dedup_flow(fp, SETTINGS, clock=clock, wait_until=clock.now + 1)
    effects, verdict = _run(flow, [ClaimResult(None, running), done])
    assert effects == [Claim(fp, 5.0), Wait(1.0)]
    assert verdict.events == ("waited", "replayed")

    for max_pushback, expected in ((5.0, "1500"), (1.0, "1000")):
        settings = FlowSettings(1000, False, 5.0, max_pushback=max_pushback)
        flow = dedup_flow(fp, settings, clock=clock, wait_until=clock.now + 1)
        next(flow)
        assert flow.send(ClaimResult(None, running)) == Wait(1.0)
        clock.now += 1.0
        with pytest.raises(StopIteration) as stop:
            flow.send(Record(RecordState.IN_PROGRESS, fp, None, 1.5))
        verdict = stop.value.value
        assert verdict.outcome.code == "ABORTED"
        # the lease the in-flight attempt has left, as last seen, capped at max_pushback
        assert verdict.outcome.trailing_metadata == (("grpc-retry-pushback-ms", expected),)
        assert "still in progress" in verdict.outcome.details


def test_flow_claims_again_when_the_in_flight_attempt_released() -> None:
    clock = FakeClock()
    fp = b"f" * 32
    running = Record(RecordState.IN_PROGRESS, fp, None, 2.5)
    flow = dedup_flow(fp, SETTINGS, clock=clock, wait_until=clock.now + 1)
    effects, verdict = _run(
        flow, [ClaimResult(None, running), None, ClaimResult(9), Execution(Outcome()), True]
    )
    assert effects == [
        Claim(fp, 5.0),
        Wait(1.0),
        Claim(fp, 5.0),
        Execute(9),
        Complete(9, Outcome()),
    ]
    assert verdict.events == ("waited", "executed")


def test_flow_store_down_fails_closed_or_open() -> None:
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    _, verdict = _run(flow, [StoreDown("redis at 127.0.0.1:1 refused")])
    assert verdict.outcome.code == "UNAVAILABLE"
    # the client learns only that the store is unavailable; the cause is for the server log
    assert verdict.outcome.details == "idempotency store unavailable"
    assert verdict.detail == "redis at 127.0.0.1:1 refused"
    assert verdict.events == ("store_error",)

    open_settings = FlowSettings(max_response_bytes=1000, fail_open=True, lease=5.0)
    flow = dedup_flow(b"f" * 32, open_settings, clock=clock, wait_until=clock.now + 1)
    effects, verdict = _run(flow, [StoreDown("down"), Execution(Outcome())])
    assert effects[-1] == Execute(None)
    assert verdict.action is Action.EXECUTED and verdict.events == ("fail_open",)


def test_flow_failed_commit_releases_the_key_and_answers_unavailable() -> None:
    """Transactional mode: the handler's writes rolled back with its record, so the client must
    not get its answer; the key is released so the retry executes at once."""
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    effects, verdict = _run(
        flow, [ClaimResult(7), Execution(Outcome()), CommitFailed("connection lost"), True]
    )
    assert effects[-2:] == [Complete(7, Outcome()), Release(7)]
    assert verdict.action is Action.ANSWER and verdict.outcome.code == "UNAVAILABLE"
    assert "did not commit" in verdict.outcome.details
    assert verdict.detail == "connection lost"  # for the server log, not the client
    assert verdict.events == ("commit_failed",)


def test_flow_conflict() -> None:
    clock = FakeClock()
    other = Record(RecordState.COMPLETED, b"o" * 32, Outcome())
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    _, verdict = _run(flow, [ClaimResult(None, other)])
    assert verdict.outcome.code == "FAILED_PRECONDITION"
    assert verdict.outcome.details.startswith("idempotency key reused with a different request")
    assert verdict.events == ("conflict",)


def test_flow_full_store_is_resource_exhausted_even_failing_open() -> None:
    clock = FakeClock()
    for fail_open in (False, True):
        settings = FlowSettings(max_response_bytes=1000, fail_open=fail_open, lease=5.0)
        flow = dedup_flow(b"f" * 32, settings, clock=clock, wait_until=clock.now + 1)
        _, verdict = _run(flow, [StoreFull("full: 100000 claims", retry_after=0.25)])
        assert verdict.action is Action.ANSWER and verdict.events == ("store_full",)
        assert verdict.outcome.code == "RESOURCE_EXHAUSTED"
        assert verdict.outcome.trailing_metadata == (("grpc-retry-pushback-ms", "250"),)
        assert "100000" not in verdict.outcome.details and "100000" in verdict.detail


def test_flow_crowded_waiter_is_aborted_at_once_with_pushback() -> None:
    clock = FakeClock()
    fp = b"f" * 32
    running = Record(RecordState.IN_PROGRESS, fp, None, 0.4)
    flow = dedup_flow(fp, SETTINGS, clock=clock, wait_until=clock.now + 1)
    _, verdict = _run(flow, [ClaimResult(None, running), Crowded()])
    assert verdict.outcome.code == "ABORTED" and verdict.events == ("waited", "crowded")
    assert verdict.outcome.trailing_metadata == (("grpc-retry-pushback-ms", "400"),)


def test_flow_abandoned_before_the_handler_releases_the_claim() -> None:
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    effects, verdict = _run(flow, [ClaimResult(5), Abandoned(), True])
    assert effects[-1] == Release(5)  # a known "not executed": the key is free for a retry
    assert verdict.events == ("abandoned",) and verdict.outcome.code == "CANCELLED"


def test_flow_store_trouble_after_the_handler_ran_is_reported_not_refused() -> None:
    clock = FakeClock()
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    _, verdict = _run(flow, [ClaimResult(5), Execution(Outcome()), False])
    assert verdict.action is Action.EXECUTED  # the live answer is still sent
    assert verdict.events == ("executed", "complete_refused") and "refused" in verdict.detail
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    _, verdict = _run(flow, [ClaimResult(5), Execution(Outcome()), StoreDown("disk I/O error")])
    assert verdict.action is Action.EXECUTED
    assert verdict.events == ("executed", "outcome_not_stored")
    assert verdict.detail == "disk I/O error"
    flow = dedup_flow(b"f" * 32, SETTINGS, clock=clock, wait_until=clock.now + 1)
    _, verdict = _run(flow, [ClaimResult(5), Execution(None), False])  # release refused: fine
    assert verdict.events == ("executed",)


def test_renewal_decisions() -> None:
    assert renewal_interval(3.0) == 1.0
    assert renewed(True, 3.0) == Renewal(1.0)
    assert renewed(StoreDown("down"), 3.0) == Renewal(1.0, "renew_failed", "down")
    lost = renewed(False, 3.0)
    assert lost.delay is None and lost.event == "lease_lost"


def test_initial_metadata_round_trips_and_format_1_still_decodes() -> None:
    outcome = Outcome("OK", "", (("t", "1"),), (b"r",), 0, (("x-region", "eu"), ("b-bin", b"\0")))
    assert decode_outcome(encode_outcome(outcome)) == outcome
    # a record written by the previous release (format 1: no initial metadata) still replays
    ok = sorted(STATUS_CODE_NAMES).index("OK")
    version_1 = struct.pack(">BBQI", 1, ok, 0, 0) + struct.pack(">III", 0, 1, 1) + b"r"
    assert decode_outcome(version_1) == Outcome("OK", "", (), (b"r",))


# ---------------------------------------------------------------------------- state machine

KEYS = ["k0", "k1"]
REQUESTS = [b"req-a", b"req-b"]
LEASE = 5.0
TTL = 50.0


@dataclass
class Executor:
    key: str
    request: bytes
    token: int
    lease_until: float
    finished: bool = False


class DedupMachine(RuleBasedStateMachine):
    """Interleave claims, completions, failures, clock jumps and replays against a real store.

    Checked: a key is never executed by two executors whose leases overlap (renewals included);
    a replay always carries the response made for the same request bytes; a stale executor's
    completion or renewal is refused and changes nothing.
    """

    executors = Bundle("executors")

    def make_store(self, clock: FakeClock) -> Store:
        return MemoryStore(ttl=TTL, clock=clock)

    @initialize()
    def setup(self) -> None:
        self.clock = FakeClock()
        self.store = self.make_store(self.clock)
        self.running: list[Executor] = []
        # key -> (request, expires_at) of the completed outcome
        self.completed: dict[str, tuple[bytes, float]] = {}

    def teardown(self) -> None:
        self.store.close()

    def _live_holder(self, key: str) -> Executor | None:
        for executor in self.running:
            if (
                executor.key == key
                and not executor.finished
                and executor.lease_until > self.clock.now
            ):
                return executor
        return None

    @rule(target=executors, key=st.sampled_from(KEYS), request=st.sampled_from(REQUESTS))
    def claim(self, key: str, request: bytes) -> Executor | None:
        result = self.store.claim(key, fingerprint(request), lease=LEASE)
        decision = decide(result, fingerprint(request))
        holder = self._live_holder(key)
        done = self.completed.get(key)
        done_live = done is not None and done[1] > self.clock.now
        if result.token is not None:
            assert holder is None, "a second executor claimed a key inside a live lease"
            assert not done_live, "a completed key was executed again"
            self.completed.pop(key, None)
            executor = Executor(key, request, result.token, self.clock.now + LEASE)
            self.running.append(executor)
            return executor
        assert holder is not None or done_live, "claim refused although the key is free"
        if decision is Decision.REPLAY:
            assert done_live and done is not None and done[0] == request
            assert result.record is not None and result.record.outcome is not None
            assert result.record.outcome.responses == (b"response-to-" + request,)
        elif decision is Decision.CONFLICT:
            owner = holder.request if holder is not None else done[0]  # type: ignore[index]
            assert owner != request
        else:
            assert decision is Decision.WAIT and holder is not None and holder.request == request
        return None

    @rule(executor=consumes(executors))
    def complete(self, executor: Executor | None) -> None:
        if executor is None or executor.finished:
            return
        before = self.store.get(executor.key)
        outcome = Outcome("OK", responses=(b"response-to-" + executor.request,))
        owned = self._owns(executor)
        accepted = self.store.complete(executor.key, executor.token, outcome)
        executor.finished = True
        if owned:
            assert accepted
            self.completed[executor.key] = (executor.request, self.clock.now + TTL)
        else:
            assert not accepted, "a stale executor overwrote the record"
            assert self.store.get(executor.key) == before

    @rule(executor=consumes(executors))
    def fail(self, executor: Executor | None) -> None:
        if executor is None or executor.finished:
            return
        before = self.store.get(executor.key)
        owned = self._owns(executor)
        released = self.store.release(executor.key, executor.token)
        executor.finished = True
        if owned:
            assert released
        elif not released:
            assert self.store.get(executor.key) == before

    @rule(executor=executors)
    def renew(self, executor: Executor | None) -> None:
        """A running executor's heartbeat: extends only its own live claim (fenced)."""
        if executor is None:
            return
        before = self.store.get(executor.key)
        owned = not executor.finished and self._owns(executor)
        renewed = self.store.renew(executor.key, executor.token, lease=LEASE)
        if owned:
            assert renewed
            executor.lease_until = self.clock.now + LEASE
        else:
            assert not renewed, "a stale or finished executor renewed a claim"
            assert self.store.get(executor.key) == before

    def _owns(self, executor: Executor) -> bool:
        return self._live_holder(executor.key) is executor

    @rule(seconds=st.sampled_from([0.5, 2.0, LEASE, TTL]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @precondition(lambda self: any(not e.finished for e in self.running))
    @invariant()
    def at_most_one_live_holder_per_key(self) -> None:
        for key in KEYS:
            holders = [
                e
                for e in self.running
                if e.key == key and not e.finished and e.lease_until > self.clock.now
            ]
            assert len(holders) <= 1


class SQLiteDedupMachine(DedupMachine):
    def make_store(self, clock: FakeClock) -> Store:
        self.directory = tempfile.TemporaryDirectory()
        return SQLiteStore(Path(self.directory.name) / "dedup.sqlite3", ttl=TTL, clock=clock)

    def teardown(self) -> None:
        super().teardown()
        self.directory.cleanup()


TestMemoryDedupMachine = DedupMachine.TestCase
TestMemoryDedupMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestSQLiteDedupMachine = SQLiteDedupMachine.TestCase
TestSQLiteDedupMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
