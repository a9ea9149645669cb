"""Idempotency keys: validation, explicit keys, and deterministic collision-free derivation."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resilient_grpc import InvalidKeyError, idempotency_key
from resilient_grpc.core.keys import (
    IdempotencyKeys,
    current_scope,
    derivation_scope,
    derive_key,
    explicit_key,
    key_for_call,
    key_problem,
    new_key,
    validate_key,
)
from tests.helpers import run_threads

visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=255)
methods = st.from_regex(r"\A/[a-z]{1,8}\.[A-Z][a-z]{0,8}/[A-Z][a-z]{0,8}\Z")


@given(visible)
def test_visible_ascii_keys_up_to_255_are_accepted(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("", "empty"),
        ("k" * 256, "256 characters long; the maximum is 255"),
        ("has space", "not visible ASCII (' ' at position 3)"),
        ("caf\u00e9", "not visible ASCII ('\u00e9' at position 3)"),
        ("tab\tkey", "position 3"),
    ],
)
def test_malformed_keys_are_refused_with_a_precise_message(key: str, message: str) -> None:
    assert message in (key_problem(key) or "")
    with pytest.raises(InvalidKeyError, match="idempotency key"):
        validate_key(key)
    with pytest.raises(InvalidKeyError), idempotency_key(key):
        pass


@given(visible, methods, st.integers(0, 10_000))
def test_derivation_is_deterministic_and_valid(parent: str, method: str, ordinal: int) -> None:
    key = derive_key(parent, method, ordinal)
    assert key == derive_key(parent, method, ordinal)
    assert key_problem(key) is None


@given(
    st.lists(st.tuples(visible, methods, st.integers(0, 50)), min_size=2, max_size=40, unique=True)
)
def test_derivation_is_collision_free(inputs: list[tuple[str, str, int]]) -> None:
    keys = {derive_key(*triple) for triple in inputs}
    assert len(keys) == len(inputs)


def test_field_boundaries_do_not_collide() -> None:
    assert derive_key("a/b", "/c", 1) != derive_key("a", "/b/c", 1)
    assert derive_key("k", "/s.S/M", 11) != derive_key("k", "/s.S/M1", 1)


def test_resolution_order_metadata_then_explicit_then_derived_then_random() -> None:
    method = "/ledger.v1.Ledger/Transfer"
    assert key_for_call(method, "from-metadata", generate=True) == "from-metadata"
    with idempotency_key("explicit"):
        assert explicit_key() == "explicit"
        assert key_for_call(method, None, generate=True) == "explicit"
        assert key_for_call(method, "meta", generate=True) == "meta"
    assert explicit_key() is None
    with derivation_scope("incoming") as scope:
        assert current_scope() is scope
        first = key_for_call(method, None, generate=True)
        second = key_for_call(method, None, generate=True)
        other = key_for_call("/ledger.v1.Ledger/GetBalance", None, generate=True)
    assert first == derive_key("incoming", method, 0)
    assert second == derive_key("incoming", method, 1)
    assert other == derive_key("incoming", "/ledger.v1.Ledger/GetBalance", 0)
    assert current_scope() is None
    assert key_for_call(method, None, generate=False) is None
    assert key_problem(key_for_call(method, None, generate=True) or "") is None


def test_reexecuted_handler_derives_the_same_keys() -> None:
    def handler() -> list[str]:
        with derivation_scope("K"):
            return [key_for_call("/a.B/C", None, generate=True) or "" for _ in range(3)]

    assert handler() == handler()


def test_metadata_key_is_validated() -> None:
    with pytest.raises(InvalidKeyError, match="empty"):
        key_for_call("/a.B/C", "", generate=True)


def test_explicit_key_is_per_thread_context() -> None:
    seen: list[str | None] = []
    with idempotency_key("main-only"):
        thread = threading.Thread(target=lambda: seen.append(explicit_key()))
        thread.start()
        thread.join(timeout=5)
    assert seen == [None]


def test_scope_counters_are_thread_safe() -> None:
    with derivation_scope("K") as scope:
        keys: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(100):
                key = scope.next_key("/a.B/C")
                with lock:
                    keys.append(key)

        run_threads(worker, 4, timeout=10)
    assert sorted(keys) == sorted(derive_key("K", "/a.B/C", n) for n in range(400))


def test_new_keys_are_unique_uuid4() -> None:
    keys = {new_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert all(len(k) == 36 and k[14] == "4" for k in keys)


def test_idempotency_keys_selection() -> None:
    assert IdempotencyKeys().applies_to("/any.S/M")
    only = IdempotencyKeys(methods=["/ledger.v1.Ledger/Transfer"])
    assert only.applies_to("/ledger.v1.Ledger/Transfer")
    assert not only.applies_to("/ledger.v1.Ledger/GetBalance")
    service = IdempotencyKeys(methods={"/ledger.v1.Ledger/*"})
    assert service.applies_to("/ledger.v1.Ledger/GetBalance")
    predicate = IdempotencyKeys(methods=lambda m: m.endswith("Transfer"))
    assert predicate.applies_to("/x.Y/Transfer")
    assert not predicate.applies_to("/x.Y/Get")
