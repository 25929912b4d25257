"""Segmented numpy operations: rows grouped by connection, computed without a Python loop.

The tracker sorts a batch's rows by stream; each stream's rows are a *segment*. These are the
cumulative sums, running maxima, shifts and per-key minima/maxima it computes over them.
"""

from __future__ import annotations

import numpy as np

from vsockmon.conntrack.model import NONE


def seg_cumsum(x: np.ndarray, first: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarting at each segment (``first`` = start positions)."""
    cs = np.cumsum(x)
    base = cs[first] - x[first]
    return cs - base[seg]


def seg_cummax(x: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Running maximum restarting at each segment; ``seg`` is sorted, values exact int64."""
    if not len(x):
        return x
    lo = int(x.min())
    span = int(x.max()) - lo + 1
    nseg = int(seg[-1]) + 1
    if span * nseg < 1 << 62:
        lift = seg * span
        return np.maximum.accumulate(x - lo + lift) - lift + lo
    out = np.empty_like(x)  # absurd values (corrupt counters): one segment at a time
    bounds = np.flatnonzero(np.diff(seg)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(x)], strict=True):
        out[a:b] = np.maximum.accumulate(x[a:b])
    return out


def seg_shift(x: np.ndarray, first_mask: np.ndarray, carried: np.ndarray) -> np.ndarray:
    """The previous row's value within the segment; ``carried`` at segment starts."""
    prev = np.empty_like(x)
    prev[1:] = x[:-1]
    prev[first_mask] = carried[first_mask]
    return prev


def first_per(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Minimum of ``values`` per key in ``range(size)`` (NONE where a key has none)."""
    out = np.full(size, NONE, dtype=np.int64)
    np.minimum.at(out, keys, values)
    return out


def last_per(keys: np.ndarray, values: np.ndarray, size: int, init: int = 0) -> np.ndarray:
    """Maximum of ``values`` per key in ``range(size)`` (``init`` where a key has none)."""
    out = np.full(size, init, dtype=np.int64)
    np.maximum.at(out, keys, values)
    return out
