"""Transactional mode: the handler's writes and the call's dedup record commit in one transaction.

The interceptors open :class:`call_scope` around a handler that won a claim; it binds the active
call (its store, store key and fencing token) to the handler's context. Inside,
:func:`transaction` asks the store for the database transaction of that call (opened on first
use, the same one on every later use) and gives the handler its connection. The store keeps the
transaction open after the handler returns: its ``complete`` writes the outcome in it and
commits (a fenced write: nothing commits if another executor took the key over), its ``release``
rolls everything back, key included. A crash before the commit leaves neither the record nor the
handler's writes; after it, both.

If the commit fails (database gone, key taken over, a deferred constraint), the handler's answer
must not reach the client as a success: the store's ``complete`` raises
:class:`~resilient_grpc.stores.base.CommitFailedError`, and the dedup flow releases the key and
answers UNAVAILABLE, so the client retries with the same key and gets a replay or a first
execution. A transaction that cannot even begin aborts the call from inside the handler
(:func:`abort_call`). Stores that can do this implement :class:`TransactionalStore` (sync) or
:class:`AsyncTransactionalStore` (``grpc.aio``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, runtime_checkable

import grpc

from resilient_grpc.core.dedup import COMMIT_FAILED

__all__ = [
    "AsyncTransactionalStore",
    "TransactionUnavailableError",
    "TransactionalStore",
    "call_scope",
    "transaction",
]


class TransactionUnavailableError(RuntimeError):
    """``transaction(context)`` was called where no transaction can be given (a programming error)."""


@runtime_checkable
class TransactionalStore(Protocol):
    """A blocking store that can hold a call's dedup record in the handler's transaction."""

    def begin_transaction(self, key: str, token: int, context: Any) -> Any:
        """The connection of the open transaction of the call (``key``, ``token``); opened on first use."""


@runtime_checkable
class AsyncTransactionalStore(Protocol):
    """The ``grpc.aio`` flavour of :class:`TransactionalStore`."""

    async def begin_transaction(self, key: str, token: int, context: Any) -> Any:
        """See :meth:`TransactionalStore.begin_transaction`."""


@dataclass(slots=True)
class ActiveCall:
    """The deduplicated call whose handler runs in this context."""

    store: object
    store_key: str
    token: int | None


_active: ContextVar[ActiveCall | None] = ContextVar("resilient_grpc_active_call", default=None)


class call_scope:
    """Bind the active call around its handler, inside ``inner`` (the derivation scope).

    A plain class (not ``@contextmanager``): it is entered once per handled call.
    """

    __slots__ = ("_call", "_inner", "_reset")

    def __init__(
        self,
        store: object,
        store_key: str,
        token: int | None,
        inner: contextlib.AbstractContextManager[Any],
    ) -> None:
        self._call = ActiveCall(store, store_key, token)
        self._inner = inner

    def __enter__(self) -> Any:
        entered = self._inner.__enter__()
        self._reset = _active.set(self._call)
        return entered

    def __exit__(self, *exc_info: Any) -> None:
        _active.reset(self._reset)
        self._inner.__exit__(*exc_info)


def active_call(context: Any) -> ActiveCall:
    """The call bound to this handler, or a clear error saying why there is none."""
    call = _active.get()
    if call is None:
        raise TransactionUnavailableError(
            "transaction(context) works only inside a handler whose call DedupInterceptor "
            "deduplicates: the call must carry an idempotency key (list the method in "
            "require_key_methods to insist on one)"
        )
    if call.token is None:
        raise TransactionUnavailableError(
            "this call runs without deduplication (the store was down and fail_open=True), "
            "so it has no transaction"
        )
    return call


def _cannot(store: object) -> NoReturn:
    inner = getattr(store, "store", None)
    if inner is not None and hasattr(inner, "begin_transaction"):
        raise TransactionUnavailableError(
            f"this grpc.aio server wraps {type(inner).__name__} in {type(store).__name__}: give "
            f"the interceptor the {type(inner).__name__} itself (or its as_async()) for "
            "transactional mode"
        )
    raise TransactionUnavailableError(
        f"{type(store).__name__} cannot hold a call's record in the handler's transaction: "
        "transaction(context) needs PostgresStore or SQLiteStore"
    )


@contextlib.contextmanager
def transaction(context: Any) -> Iterator[Any]:
    """Inside a ``grpc.server`` handler: the connection of the transaction that also commits
    this call's dedup record (a psycopg ``Connection`` for PostgresStore, an ``sqlite3``
    connection for SQLiteStore).

    Write the handler's effects through it and do not commit: the interceptor commits the
    record and the writes together when the handler returns with a stored outcome (OK or a
    business error), and rolls both back on UNAVAILABLE, ABORTED or an exception. Entering it
    again in the same call gives the same connection. Raises
    :class:`TransactionUnavailableError` for a store that cannot (MemoryStore, RedisStore) or a
    call that is not deduplicated.
    """
    from resilient_grpc.stores.base import Store  # not at import: the stores import this module

    call = active_call(context)
    if not isinstance(call.store, Store) or not isinstance(call.store, TransactionalStore):
        _cannot(call.store)
    assert call.token is not None
    yield call.store.begin_transaction(call.store_key, call.token, context)


@contextlib.asynccontextmanager
async def async_transaction(context: Any) -> AsyncIterator[Any]:
    """``resilient_grpc.aio.transaction``: :func:`transaction` for ``grpc.aio`` handlers (an
    ``async with``; a psycopg ``AsyncConnection`` for PostgresStore, an
    :class:`~resilient_grpc.stores.sqlite.AsyncSQLiteConnection` for SQLiteStore)."""
    from resilient_grpc.stores.base import AsyncStore

    call = active_call(context)
    store = call.store
    if not isinstance(store, AsyncStore) or not isinstance(store, AsyncTransactionalStore):
        _cannot(store)
    assert call.token is not None
    yield await store.begin_transaction(call.store_key, call.token, context)


def abort_call(context: Any) -> NoReturn:
    """Abort, from inside its handler, a sync call whose transaction cannot begin (UNAVAILABLE:
    safe to retry; nothing was written)."""
    context.abort(grpc.StatusCode.UNAVAILABLE, COMMIT_FAILED)
    raise AssertionError("context.abort returned")  # pragma: no cover


async def abort_call_async(context: Any) -> NoReturn:
    """:func:`abort_call` for a ``grpc.aio`` call."""
    await context.abort(grpc.StatusCode.UNAVAILABLE, COMMIT_FAILED)
    raise AssertionError("context.abort returned")  # pragma: no cover
