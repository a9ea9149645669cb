"""Argument checks shared by every constructor: bad values fail at once, naming the field."""

from __future__ import annotations

import math


def finite_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    at_least: float | None = None,
    at_most: float | None = None,
    unit: str = "",
) -> float:
    """Return ``value`` as a float, or raise ``ValueError`` naming ``name``.

    ``value`` must be a finite int or float (not a bool), ``> above``, ``>= at_least`` and
    ``<= at_most`` where given. ``unit`` (e.g. ``" seconds"``) is only used in the message.
    """
    bounds = []
    if above is not None:
        bounds.append(f"> {above:g}")
    if at_least is not None:
        bounds.append(f">= {at_least:g}")
    if at_most is not None:
        bounds.append(f"<= {at_most:g}")
    wanted = f"a finite number{unit}" + (f" {' and '.join(bounds)}" if bounds else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    number = float(value)
    if (
        not math.isfinite(number)
        or (above is not None and number <= above)
        or (at_least is not None and number < at_least)
        or (at_most is not None and number > at_most)
    ):
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return number


def whole_number(name: str, value: object, *, at_least: int) -> int:
    """Return ``value`` if it is an int (not a bool) ``>= at_least``; else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < at_least:
        raise ValueError(f"{name} must be an integer >= {at_least}, got {value!r}")
    return value
