"""Idempotency keys: validation, generation, explicit keys and deterministic derivation.

A key belongs to one *logical* call and is reused by every attempt of it. Inside a server
handler that received key ``K``, outgoing calls get keys derived from ``(K, method, ordinal)``
so a re-executed handler sends the same downstream keys (exactly-once across a chain).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Iterator

from resilient_grpc.core.methods import method_matches, method_patterns

#: The metadata header that carries the key (gRPC metadata keys are lower case).
DEFAULT_HEADER = "idempotency-key"

#: Longest accepted key, in characters.
MAX_KEY_LENGTH = 255


class InvalidKeyError(ValueError):
    """An idempotency key that is empty, too long or not visible ASCII."""


def key_problem(key: str) -> str | None:
    """Say what is wrong with ``key`` in one sentence, or ``None`` if it is acceptable.

    Accepted keys are 1 to 255 characters of visible ASCII (``!`` to ``~``): what fits in an
    HTTP/2 header unchanged, and what Stripe-style keys (UUIDs, ULIDs, hex digests) are made of.
    """
    if not isinstance(key, str):
        return f"idempotency key must be a string, got {type(key).__name__}"
    if not key:
        return "idempotency key is empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"idempotency key is {len(key)} characters long; the maximum is {MAX_KEY_LENGTH}"
    for index, char in enumerate(key):
        if not "!" <= char <= "~":
            return (
                f"idempotency key has a character that is not visible ASCII "
                f"({char!r} at position {index})"
            )
    return None


def validate_key(key: str) -> str:
    """Return ``key`` unchanged, or raise :class:`InvalidKeyError` saying what is wrong."""
    problem = key_problem(key)
    if problem is not None:
        raise InvalidKeyError(problem)
    return key


#: The RFC 4122 variant nibble (``10xx``) keeping the two low random bits of a hex digit.
_VARIANT_NIBBLE = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_key() -> str:
    """A fresh random key for one logical call (UUID4, 36 characters).

    Formatted straight from 16 bytes of ``os.urandom`` (what ``uuid.uuid4`` uses, 122 random
    bits once the version and variant are set): about 3x cheaper than ``str(uuid.uuid4())``.
    """
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_NIBBLE[h[16]]}{h[17:20]}-{h[20:]}"


def derive_key(parent: str, method: str, ordinal: int) -> str:
    """Derive the key of the ``ordinal``-th call to ``method`` made while handling ``parent``.

    Deterministic (same inputs, same key) and collision-resistant across methods and ordinals
    (SHA-256 over length-prefixed fields, so no two field tuples share an encoding).
    """
    digest = hashlib.sha256()
    for field in (parent, method, str(ordinal)):
        data = field.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return "d1-" + digest.hexdigest()


class DerivationScope:
    """The key a server handler received, and per-method counters of the calls it made since.

    Thread-safe: a handler may fan out calls from several threads. The ordinal is counted per
    method, so calls to different methods never shift each other's keys; concurrent calls to
    the *same* method get ordinals in the order they start. Cheap to open: the counters are
    only touched when an outgoing call asks for a key (most handlers make none).
    """

    __slots__ = ("_counters", "parent_key")

    def __init__(self, parent_key: str) -> None:
        self.parent_key = validate_key(parent_key)
        self._counters: dict[str, int] = {}

    @classmethod
    def trusted(cls, parent_key: str) -> DerivationScope:
        """A scope for a key the caller already validated (the server interceptors' hot path)."""
        scope = cls.__new__(cls)
        scope.parent_key = parent_key
        scope._counters = {}
        return scope

    def next_key(self, method: str) -> str:
        """The derived key for the next call to ``method`` in this handler."""
        with _counters_lock:
            ordinal = self._counters.get(method, 0)
            self._counters[method] = ordinal + 1
        return derive_key(self.parent_key, method, ordinal)


#: Guards every scope's counters: held for a dict update only, so one lock for all scopes costs
#: nothing measurable and spares a lock allocation per handled call.
_counters_lock = threading.Lock()


_explicit_key: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "resilient_grpc_explicit_key", default=None
)
_derivation_scope: contextvars.ContextVar[DerivationScope | None] = contextvars.ContextVar(
    "resilient_grpc_derivation_scope", default=None
)


@contextlib.contextmanager
def idempotency_key(key: str) -> Iterator[str]:
    """Use ``key`` for the calls made inside this block (every attempt of each of them).

    Use it when the key comes from your own domain, e.g. an order id, so a retry made by a
    different process (or after a crash) is recognised as the same operation::

        with idempotency_key(f"charge-{order.id}"):
            stub.Charge(request)

    Raises :class:`InvalidKeyError` at once for a malformed key.
    """
    token = _explicit_key.set(validate_key(key))
    try:
        yield key
    finally:
        _explicit_key.reset(token)


def explicit_key() -> str | None:
    """The key set by an enclosing :func:`idempotency_key` block, if any."""
    return _explicit_key.get()


# lower case: used like the (generator-based) function it replaced, as a context manager or decorator
class derivation_scope(contextlib.ContextDecorator):
    """Derive the keys of outgoing calls from ``parent_key`` inside this block.

    The server interceptors open this around a handler that received a key; it is public so
    that a worker that is not a gRPC handler (a queue consumer, say) can do the same. ``with
    derivation_scope(key) as scope`` gives the :class:`DerivationScope`; a malformed key raises
    :class:`InvalidKeyError` on entering. A plain class rather than ``@contextmanager``: it is
    entered once per handled call, and a generator-based manager costs several times more.
    """

    __slots__ = ("_key", "_scope", "_token")

    def __init__(self, parent_key: str, *, _scope: DerivationScope | None = None) -> None:
        self._key = parent_key
        self._scope = _scope

    def _recreate_cm(self) -> derivation_scope:
        # used as a decorator: every call of the decorated function gets a fresh scope, as with
        # the generator-based context manager this class replaced
        return derivation_scope(self._key)

    @classmethod
    def of(cls, scope: DerivationScope) -> derivation_scope:
        """Open an already built ``scope`` (e.g. :meth:`DerivationScope.trusted`)."""
        return cls(scope.parent_key, _scope=scope)

    def __enter__(self) -> DerivationScope:
        scope = self._scope
        if scope is None:
            scope = self._scope = DerivationScope(self._key)
        self._token = _derivation_scope.set(scope)
        return scope

    def __exit__(self, *exc_info: object) -> None:
        _derivation_scope.reset(self._token)


def current_scope() -> DerivationScope | None:
    """The derivation scope of the handler running in this context, if any."""
    return _derivation_scope.get()


def key_for_call(method: str, metadata_key: str | None, *, generate: bool) -> str | None:
    """Choose the key of one logical call to ``method``.

    Order: a key already in the call's metadata, then an enclosing :func:`idempotency_key`,
    then a key derived from the handler's incoming key, then (if ``generate``) a new random
    key. Returns ``None`` when the call gets no key.
    """
    if metadata_key is not None:
        return validate_key(metadata_key)
    explicit = _explicit_key.get()
    if explicit is not None:
        return explicit
    if not generate:
        return None
    scope = _derivation_scope.get()
    if scope is not None:
        return scope.next_key(method)
    return new_key()


_HEADER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class IdempotencyKeys:
    """Which client calls carry an idempotency key, and in which metadata header.

    ``methods`` is ``None`` (default: every unary-request call gets a key), a collection of full
    method names or ``"/pkg.Service/*"`` patterns, or a predicate on the full method name.
    Keys are a random UUID4 per logical call unless the caller passes one in metadata, sets one
    with :func:`idempotency_key`, or runs inside a handler that received one (then derived).
    """

    def __init__(
        self,
        header: str = DEFAULT_HEADER,
        methods: Iterable[str] | Callable[[str], bool] | None = None,
    ) -> None:
        if (
            not isinstance(header, str)
            or not header
            or not set(header) <= _HEADER_CHARS
            or header.startswith("grpc-")
            or header.endswith("-bin")
        ):
            raise ValueError(
                "header must be a non-empty lower-case gRPC metadata key (a-z, 0-9, '-', '_', '.'), "
                f"not reserved ('grpc-' prefix) and not binary ('-bin' suffix); got {header!r}"
            )
        self.header = header
        self._predicate: Callable[[str], bool] | None
        self._patterns: frozenset[str] | None
        if methods is None:
            self._predicate, self._patterns = None, None
        elif callable(methods):
            self._predicate, self._patterns = methods, None
        else:
            patterns = method_patterns(methods, field="methods")
            self._predicate, self._patterns = None, patterns

    def __repr__(self) -> str:
        methods = (
            "all"
            if self._predicate is None and self._patterns is None
            else (sorted(self._patterns) if self._patterns is not None else self._predicate)
        )
        return f"IdempotencyKeys(header={self.header!r}, methods={methods!r})"

    def applies_to(self, method: str) -> bool:
        """Whether calls to ``method`` get a generated (or derived) key."""
        if self._predicate is not None:
            return bool(self._predicate(method))
        if self._patterns is None:
            return True
        return method_matches(self._patterns, method)
