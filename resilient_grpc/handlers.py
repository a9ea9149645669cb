"""What the server interceptors share about gRPC method handlers: a per-method cache of the
handler an interceptor built around the service's own, so each call reuses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class WrappedHandlers:
    """The wrapped handler of each method, built once per handler object.

    A plain dict read (no lock): two threads that miss at once both build a wrapper, equal in
    behaviour, and the last one stays; the service's handler object changing (a server rebuilt
    with new servicers) rebuilds it.
    """

    __slots__ = ("_wrap", "_wrapped")

    def __init__(self, wrap: Callable[[str, Any], Any]) -> None:
        self._wrap = wrap
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any) -> Any:
        """The wrapper of ``handler`` for ``method`` (built by ``wrap(method, handler)`` once)."""
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(method, handler))
            self._wrapped[method] = cached
        return cached[1]
