"""The `nodes` table as fronts and nodes follow it: read once a second, aged locally between.

A front and a node re-read placements and ready instances every 0.25 s (a move or a new
holder must be seen soon), but a node's row changes only at its heartbeat, once a second
(node.BEAT_S). Reading every row four times a second from every front and node made the
CMDB's load grow with the square of the cluster (N readers x N rows x 4). Between two reads
the rows' `age_s` is advanced by the time elapsed here, so a node that stops beating is still
seen down NODE_LEASE_S after its last beat, not up to a read later; a live node's age stays
under NODE_LEASE_S (its last beat is at most BEAT_S old when read, NODES_REFRESH_S more here).
What reading less often costs: a cordon, a drain or a new node is seen within NODES_REFRESH_S
(1 s) instead of 0.25 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from ..cmdb.nodes import NodeRecord

NODES_REFRESH_S = 1.0  # the nodes' heartbeat period: rows change no faster


class NodesCache:
    """`read()` gives the nodes as `list_nodes()` would now, from a read at most `refresh_s` old."""

    def __init__(self, list_nodes: Callable[[], list[NodeRecord]], *, refresh_s: float = NODES_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic):
        self._list_nodes = list_nodes
        self.refresh_s = refresh_s
        self._clock = clock
        self._rows: list[NodeRecord] = []
        self._read_at: float | None = None

    def read(self) -> list[NodeRecord]:
        """The nodes, re-read from the CMDB when the last read is `refresh_s` old (or none was
        made, or it failed). Raises what list_nodes raises (CMDBError); the cache is then kept
        for the next call to try again."""
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.refresh_s:
            self._rows = self._list_nodes()
            self._read_at = now
            return self._rows
        elapsed = now - self._read_at
        return [msgspec.structs.replace(row, age_s=row.age_s + elapsed) for row in self._rows]
