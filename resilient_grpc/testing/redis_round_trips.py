"""Count the round trips a Redis server served, from ``INFO commandstats`` (tests and benchmarks)."""

from __future__ import annotations

from typing import Any

#: Commands that run only inside the store's Lua scripts, never sent by a client on their own,
#: and the INFO that takes the reading.
_NOT_ROUND_TRIPS = frozenset(
    {"cmdstat_get", "cmdstat_set", "cmdstat_pttl", "cmdstat_del", "cmdstat_info"}
)


class RoundTripCounter:
    """Counts client commands (EVALSHA, SCRIPT LOAD, HELLO...) between :meth:`reset` and :meth:`count`.

    Redis counts the commands a Lua script issues in the same statistics; those (GET, SET, PTTL,
    DEL) are left out, so use this only while nothing but :class:`RedisStore` talks to the server.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self._before = self._total()

    def _total(self) -> int:
        stats: dict[str, dict[str, Any]] = self.client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k not in _NOT_ROUND_TRIPS)

    def reset(self) -> None:
        """Start counting from now."""
        self._before = self._total()

    def count(self) -> int:
        """Round trips since the last :meth:`reset` (or construction)."""
        return self._total() - self._before
