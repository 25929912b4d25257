"""Closed connections out of the tracker's working set: compact columns, found again by key.

A connection that closed (an RST, or both directions shut down) rarely changes again, yet a
capture of a million short connections would keep a million rows of int64 state and their
control events. :class:`Spill` takes such rows out of the
:class:`~vsockmon.conntrack.table.StreamTable` in chunks and keeps each column as
:class:`Packed`: one value when the chunk's rows agree, else the offsets from the chunk's
least value in the narrowest unsigned type that holds them. A storm of refused connects
costs tens of bytes per connection there instead of about a kilobyte, and no Python object.

"Rarely" is not "never": a late frame of a spilled connection (a second RST, a stray
CREDIT_UPDATE) must still join it, as the stream numbering says. Each chunk indexes its
rows by a hash of their connection key, so the tracker finds such a row and takes it back
(:meth:`Spill.take`) before it tracks the frame. No I/O here.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F),
        np.uint64(0x165667B19E3779F9))


def key_hash(typ: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A u64 hash of packed connection keys (type, lower end, higher end): equal keys hash
    equal; a match is confirmed on the key itself, rarely (64 bits: a new connection's key
    almost never meets a spilled one's hash by chance)."""
    with np.errstate(over="ignore"):
        h = typ.astype(np.uint64) * _MIX[0]
        h ^= lo.astype(np.uint64) * _MIX[1]
        h ^= (hi.astype(np.uint64) * _MIX[2]) >> np.uint64(7)
    return h


_MAX_OFFSET = (1 << 32) - 1
_DEFLATE_MIN = 4096
"""Offsets of at least this many bytes are worth trying to deflate."""


def _offsets(streams: np.ndarray, first: int) -> np.ndarray:
    """Stream numbers (ascending, from ``first``) as u32 offsets: a chunk spans fewer than
    4G streams."""
    return (streams - first).astype(np.uint32)


_NONE = np.uint64(np.iinfo(np.int64).max)
"""The tracker's "no value" (:data:`~vsockmon.conntrack.model.NONE`) as u64."""


def _span(flat: np.ndarray) -> tuple[np.uint64, int]:
    """The base and span of u64 values read as unsigned or as signed (-1 sits next to 0),
    whichever is narrower (the offsets are modular)."""
    lo, hi = int(flat.min()), int(flat.max())
    signed = flat.view(np.int64)
    slo, shi = int(signed.min()), int(signed.max())
    if shi - slo < hi - lo:
        return np.int64(slo).astype(np.uint64), shi - slo
    return np.uint64(lo), hi - lo


def _narrow(span: int) -> type[np.unsignedinteger]:
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                if span <= np.iinfo(t).max)


class _Flat:
    """A 1-D integer or boolean column stored in the fewest bytes its values allow: one value
    when all agree; else offsets from the least value, or from the previous row (columns
    that grow with the stream number: frames, times, ports), whichever is narrower; with
    the tracker's NONE as a reserved offset when it stands among small values."""

    __slots__ = ("_first", "_packed", "base", "delta", "dtype", "none", "shape")

    def __init__(self, col: np.ndarray) -> None:
        self.dtype = col.dtype
        self.shape = col.shape
        flat = (col.view(np.uint8) if col.dtype == bool else col).astype(np.uint64)
        self._packed: np.ndarray | tuple[bytes, np.dtype] | None = None
        self.delta = self.none = False
        self.base = flat[0] if len(flat) else np.uint64(0)
        if not len(flat) or (flat == self.base).all():
            return
        self.base, span = _span(flat)
        with np.errstate(over="ignore"):
            steps = flat[1:] - flat[:-1]
        step_base, step_span = _span(steps)
        if _narrow(step_span)().nbytes < _narrow(span)().nbytes:
            self.delta = True
            self.base = step_base
            codes = np.empty(len(flat), dtype=_narrow(step_span))
            codes[0] = 0
            codes[1:] = steps - step_base
            self._store(codes)
            self._first = flat[0]
            return
        none = flat == _NONE
        if none.any():
            base, rest = _span(flat[~none])
            if _narrow(rest + 1)().nbytes < _narrow(span)().nbytes:
                narrow = _narrow(rest + 1)
                self.base, self.none = base, True
                self._store(np.where(none, np.iinfo(narrow).max, flat - base).astype(narrow))
                return
        self._store((flat - self.base).astype(_narrow(span)))

    def _store(self, codes: np.ndarray) -> None:
        """Keep the offsets, deflated when that halves them at least (a storm's rows are
        alike: its offsets repeat)."""
        self._packed = codes
        if codes.nbytes >= _DEFLATE_MIN:
            deflated = zlib.compress(codes.data, 1)
            if len(deflated) <= codes.nbytes // 2:
                self._packed = (deflated, codes.dtype)

    @property
    def offsets(self) -> np.ndarray | None:
        """The offsets (inflated if need be), or None when every row holds :attr:`base`."""
        if isinstance(self._packed, tuple):
            data, dtype = self._packed
            return np.frombuffer(zlib.decompress(data), dtype=dtype)
        return self._packed

    @property
    def nbytes(self) -> int:
        if isinstance(self._packed, tuple):
            return len(self._packed[0])
        return 0 if self._packed is None else self._packed.nbytes

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` in the column's own type."""
        offsets = self.offsets
        if offsets is None:
            wide = np.full(b - a, self.base, dtype=np.uint64)
        elif self.delta:
            with np.errstate(over="ignore"):
                steps = offsets[1:b].astype(np.uint64) + self.base
                wide = np.cumsum(np.r_[self._first, steps], dtype=np.uint64)[a:b]
        else:
            codes = offsets[a:b]
            wide = codes.astype(np.uint64) + self.base
            if self.none:
                wide[codes == np.iinfo(codes.dtype).max] = _NONE
        if self.dtype == bool:
            return wide.astype(bool)
        return wide.astype(self.dtype, casting="unsafe")


class Packed:
    """A column of the tracker's table (one value per stream, per stream and side, …)
    packed as :class:`_Flat` columns, one per value of a row: a client's port and a
    server's change differently."""

    __slots__ = ("dtype", "parts", "shape")

    def __init__(self, col: np.ndarray) -> None:
        self.shape = col.shape
        self.dtype = col.dtype
        flat = col.reshape(len(col), -1)
        self.parts = [_Flat(np.ascontiguousarray(flat[:, j])) for j in range(flat.shape[1])]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` in the column's own type and shape."""
        if len(self.shape) == 1:
            return self.parts[0].rows(a, b)
        return np.stack([p.rows(a, b) for p in self.parts], axis=1).reshape(
            b - a, *self.shape[1:])


class Chunk:
    """Spilled streams (ascending) with their control events (by stream, then frame)."""

    def __init__(self, cols: dict[str, np.ndarray], events: dict[str, np.ndarray],
                 key: np.ndarray) -> None:
        self.first, self.last = int(cols["stream"][0]), int(cols["stream"][-1])
        self.cols = {k: Packed(c) for k, c in cols.items()}
        self._ev_sid = _Flat(_offsets(events["sid"], self.first))
        self.events = {k: Packed(c) for k, c in events.items()}
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.key_row = order.astype(_narrow(len(order)))
        self.taken: set[int] = set()
        """Rows taken back by the tracker (a late frame joined them)."""

    @property
    def stream(self) -> np.ndarray:
        """The stream numbers less :attr:`first` (to search)."""
        return _offsets(self.cols["stream"].rows(0, len(self.key)), self.first)

    @property
    def ev_sid(self) -> np.ndarray:
        """The events' stream numbers less :attr:`first`."""
        return self._ev_sid.rows(0, self._ev_sid.shape[0])

    @property
    def nbytes(self) -> int:
        return (self._ev_sid.nbytes + self.key.nbytes + self.key_row.nbytes
                + sum(p.nbytes for p in (*self.cols.values(), *self.events.values())))

    def rows(self, a: int, b: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The columns and events of rows ``a:b``, less the rows taken back."""
        cols = {k: p.rows(a, b) for k, p in self.cols.items()}
        lo, hi = (np.uint32(cols["stream"][i] - self.first) for i in (0, -1))
        ev_sid = self.ev_sid
        ea = int(np.searchsorted(ev_sid, lo, side="left"))
        eb = int(np.searchsorted(ev_sid, hi, side="right"))
        events = {k: p.rows(ea, eb) for k, p in self.events.items()}
        if self.taken:
            gone = np.fromiter(self.taken, dtype=np.int64)
            keep = ~np.isin(np.arange(a, b), gone)
            cols = {k: c[keep] for k, c in cols.items()}
            kept = cols["stream"]
            events = {k: c[np.isin(events["sid"], kept)] for k, c in events.items()}
        return cols, events


class Spill:
    """The spilled streams of one tracker: chunks of :class:`Packed` columns."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.streams = 0
        """Streams spilled and not taken back."""

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.chunks)

    def add(self, cols: dict[str, np.ndarray], events: dict[str, np.ndarray],
            key: np.ndarray) -> None:
        """Spill rows (``cols``, ascending by stream), their events and key hashes."""
        if len(cols["stream"]):
            self.chunks.append(Chunk(cols, events, key))
            self.streams += len(cols["stream"])

    @property
    def indexes(self) -> tuple[np.ndarray, ...]:
        """Each chunk's key hashes, ascending: what the key map searches to tell a late frame
        of a spilled stream from a new connection's first one (taken rows included: the
        tracker confirms a match with :meth:`find`)."""
        return tuple(c.key for c in self.chunks)

    def find(self, key: np.ndarray) -> list[list[tuple[int, int]]]:
        """For each hash of ``key``: the (chunk, row) of the spilled rows with that hash."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(len(key))]
        for ci, chunk in enumerate(self.chunks):
            a = np.searchsorted(chunk.key, key, side="left")
            b = np.searchsorted(chunk.key, key, side="right")
            for q in np.flatnonzero(b > a).tolist():
                for r in chunk.key_row[a[q]:b[q]].tolist():
                    if r not in chunk.taken:
                        out[q].append((ci, r))
        return out

    def row(self, ci: int, r: int, name: str) -> np.ndarray:
        """One column's value of one spilled row (to confirm a hash match)."""
        return self.chunks[ci].cols[name].rows(r, r + 1)[0]

    def take(self, picks: list[tuple[int, int]]
             ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
        """Take rows back out of the spill: their columns and events, one dict per row."""
        cols, events = [], []
        for ci, r in picks:
            chunk = self.chunks[ci]
            c, e = chunk.rows(r, r + 1)
            chunk.taken.add(r)
            self.streams -= 1
            cols.append(c)
            events.append(e)
        return cols, events

    def ranges(self, lo: int, hi: int
               ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """Every chunk's rows (and events) whose stream is in ``[lo, hi)``."""
        for chunk in self.chunks:
            if chunk.last < lo or chunk.first >= hi:
                continue
            span = [min(max(x - chunk.first, 0), _MAX_OFFSET) for x in (lo, hi)]
            a, b = np.searchsorted(chunk.stream, np.array(span, dtype=chunk.stream.dtype)
                                   ).tolist()
            if b > a:
                yield chunk.rows(a, b)
