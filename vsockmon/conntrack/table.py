"""The tracker's per-stream state: growable numpy columns, one row per stream.

Memory is O(streams): a struct of arrays whose rows double in capacity as streams appear.
Every column is declared here with its shape, type and initial value; only
:class:`~vsockmon.conntrack.tracker.ConnTracker` writes them.
"""

# ruff: noqa: RUF009 - _col returns a dataclasses.field (a fresh array per table)

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from vsockmon.conntrack.model import NONE, VIOLATIONS


def _col(per_side: bool, dtype: str, init: int, kinds: int = 0) -> Any:
    """A column: one value per stream, or per (stream, side), or per (stream, side, kind)."""
    shape = (0, 2, kinds) if kinds else (0, 2) if per_side else (0,)
    return field(default_factory=lambda: np.full(shape, init, dtype=dtype),
                 metadata={"shape": shape[1:], "dtype": dtype, "init": init})


@dataclass
class StreamTable:
    """Per-stream state as growable numpy columns (struct of arrays)."""

    stream: np.ndarray = _col(False, "i8", 0)
    """The stream number of each row: ascending (new streams are appended, forgetting
    keeps the order), equal to the row until streams are forgotten."""
    type: np.ndarray = _col(False, "u2", 0)
    client_is_lower: np.ndarray = _col(False, "?", False)
    start_seen: np.ndarray = _col(False, "?", False)
    cid: np.ndarray = _col(True, "u8", 0)
    port: np.ndarray = _col(True, "u4", 0)
    first_frame: np.ndarray = _col(False, "i8", 0)
    last_frame: np.ndarray = _col(False, "i8", 0)
    first_ts: np.ndarray = _col(False, "i8", 0)
    last_ts: np.ndarray = _col(False, "i8", 0)
    response_frame: np.ndarray = _col(False, "i8", NONE)
    closed: np.ndarray = _col(False, "u1", 0)
    """Bits 0 and 1: the client→server and server→client directions shut down; bit 2: an
    RST seen. What makes a stream worth spilling (:mod:`~vsockmon.conntrack.spill`)."""
    packets: np.ndarray = _col(True, "i8", 0)
    rw_packets: np.ndarray = _col(True, "i8", 0)
    tx_bytes: np.ndarray = _col(True, "i8", 0)
    eom_packets: np.ndarray = _col(True, "i8", 0)
    eor_packets: np.ndarray = _col(True, "i8", 0)
    credit_updates: np.ndarray = _col(True, "i8", 0)
    credit_requests: np.ndarray = _col(True, "i8", 0)
    first_rw_frame: np.ndarray = _col(True, "i8", NONE)
    last_rw_frame: np.ndarray = _col(True, "i8", 0)
    shutdown_send_frame: np.ndarray = _col(True, "i8", NONE)
    # credit advertised by each side (as receiver)
    credit_known: np.ndarray = _col(True, "?", False)
    fwd_raw: np.ndarray = _col(True, "i8", 0)
    fwd_unw: np.ndarray = _col(True, "i8", 0)
    fwd_max: np.ndarray = _col(True, "i8", 0)
    buf_alloc: np.ndarray = _col(True, "i8", 0)
    # credit of each side as sender
    outstanding_floor: np.ndarray = _col(True, "i8", NONE)
    max_in_flight: np.ndarray = _col(True, "i8", -1)
    min_credit: np.ndarray = _col(True, "i8", NONE)
    stalled: np.ndarray = _col(True, "?", False)
    stall_ts: np.ndarray = _col(True, "i8", 0)
    stall_frame: np.ndarray = _col(True, "i8", 0)
    stalls: np.ndarray = _col(True, "i8", 0)
    stall_total: np.ndarray = _col(True, "i8", 0)
    stall_max: np.ndarray = _col(True, "i8", -1)
    stall_first: np.ndarray = _col(True, "i8", NONE)
    stall_longest: np.ndarray = _col(True, "i8", 0)
    # per (stream, side, violation kind): count, first and last frame
    violation_count: np.ndarray = _col(True, "i8", 0, len(VIOLATIONS))
    violation_first: np.ndarray = _col(True, "i8", NONE, len(VIOLATIONS))
    violation_last: np.ndarray = _col(True, "i8", 0, len(VIOLATIONS))
    size: int = 0
    """Streams in use (rows beyond it are capacity)."""

    def grow(self, size: int) -> None:
        """Make room for ``size`` streams; new rows hold each column's initial value."""
        capacity = len(self.type)
        if size > capacity:
            cap = max(size, 2 * capacity, 1024)
            for f in fields(self):
                if "dtype" in f.metadata:
                    old = getattr(self, f.name)
                    new = np.full((cap, *f.metadata["shape"]), f.metadata["init"],
                                  dtype=f.metadata["dtype"])
                    new[: len(old)] = old
                    setattr(self, f.name, new)
        self.size = size

    def insert(self, rows: dict[str, np.ndarray]) -> None:
        """Add rows (every column, e.g. streams taken back from a spill) where their stream
        numbers put them: the table stays in stream order."""
        cols = self.columns()
        merged = {k: np.concatenate([c, rows[k]]) for k, c in cols.items()}
        self._fill(merged, np.argsort(merged["stream"], kind="stable"))

    def keep(self, rows: np.ndarray) -> None:
        """Keep only the streams where the boolean ``rows`` (one per stream in use) is set,
        in order, with capacity to match."""
        self._fill(self.columns(), np.flatnonzero(rows))

    def _fill(self, cols: dict[str, np.ndarray], rows: np.ndarray) -> None:
        """Make the table ``cols`` at ``rows``, with twice their number of capacity."""
        size = len(rows)
        cap = max(2 * size, 1024)
        for f in fields(self):
            if "dtype" in f.metadata:
                new = np.full((cap, *f.metadata["shape"]), f.metadata["init"],
                              dtype=f.metadata["dtype"])
                new[:size] = cols[f.name][rows]
                setattr(self, f.name, new)
        self.size = size

    def columns(self) -> dict[str, np.ndarray]:
        """Every column, cut to the streams in use, by name."""
        return {f.name: getattr(self, f.name)[: self.size] for f in fields(self)
                if "dtype" in f.metadata}
