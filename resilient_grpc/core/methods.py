"""Full gRPC method names and the ``"/pkg.Service/*"`` patterns used to select them."""

from __future__ import annotations

from collections.abc import Iterable


def method_patterns(methods: Iterable[str], *, field: str) -> frozenset[str]:
    """Validate a collection of ``"/pkg.Service/Method"`` or ``"/pkg.Service/*"`` entries.

    Raises ``ValueError`` naming ``field`` for a bare string or a malformed entry.
    """
    if isinstance(methods, (str, bytes)):
        raise ValueError(
            f"{field}: expected a collection of method names, got the string {methods!r}"
        )
    patterns = frozenset(methods)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern.startswith("/") or pattern.count("/") != 2:
            raise ValueError(
                f"{field}: each entry must look like '/package.Service/Method' or "
                f"'/package.Service/*', got {pattern!r}"
            )
    return patterns


def method_matches(patterns: frozenset[str], method: str) -> bool:
    """Whether ``method`` is listed in ``patterns`` by name or by its service's wildcard."""
    if method in patterns:
        return True
    service, _, _ = method.rpartition("/")
    return f"{service}/*" in patterns


def split_method(method: str) -> tuple[str, str]:
    """``"/pkg.Service/Method"`` -> ``("pkg.Service", "Method")`` (best effort for odd names)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name
