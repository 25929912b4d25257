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

from collections.abc import Iterator

import numpy as np

_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F),
        np.uint64(0x165667B19E3779F9))


def key_hash(typ: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A u64 hash of packed connection keys (type, lower end, higher end): equal keys hash
    equal; a match is confirmed on the key itself."""
    with np.errstate(over="ignore"):
        h = typ.astype(np.uint64) * _MIX[0]
        h ^= lo.astype(np.uint64) * _MIX[1]
        h ^= (hi.astype(np.uint64) * _MIX[2]) >> np.uint64(7)
    return h


class Packed:
    """An integer or boolean column stored in the fewest bytes its values allow."""

    __slots__ = ("base", "dtype", "offsets", "shape")

    def __init__(self, col: np.ndarray) -> None:
        self.dtype = col.dtype
        self.shape = col.shape
        flat = col.reshape(-1).view(np.uint8) if col.dtype == bool else col.reshape(-1)
        flat = flat.astype(np.uint64)  # modular: any int64 range fits
        lo = int(flat.min()) if len(flat) else 0
        span = int(flat.max()) - lo if len(flat) else 0
        self.base = np.uint64(lo)
        self.offsets: np.ndarray | None = None
        if span:
            narrow = next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                          if span <= np.iinfo(t).max)
            self.offsets = (flat - self.base).astype(narrow).reshape(col.shape)

    @property
    def nbytes(self) -> int:
        return 0 if self.offsets is None else self.offsets.nbytes

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b`` in the column's own type."""
        shape = (b - a, *self.shape[1:])
        if self.offsets is None:
            wide = np.full(shape, self.base, dtype=np.uint64)
        else:
            wide = self.offsets[a:b].astype(np.uint64) + self.base
        if self.dtype == bool:
            return wide.astype(bool)
        return wide.astype(self.dtype, casting="unsafe")


class Chunk:
    """Spilled streams (ascending) with their control events (by stream, then frame)."""

    def __init__(self, cols: dict[str, np.ndarray], events: dict[str, np.ndarray],
                 key: np.ndarray) -> None:
        self.stream = cols["stream"].copy()
        self.cols = {k: Packed(c) for k, c in cols.items()}
        self.ev_sid = events["sid"].copy()
        self.events = {k: Packed(c) for k, c in events.items()}
        order = np.argsort(key, kind="stable")
        self.key = key[order]
        self.key_row = order.astype(np.uint32 if len(order) < 1 << 32 else np.uint64)
        self.taken: set[int] = set()
        """Rows taken back by the tracker (a late frame joined them)."""

    @property
    def nbytes(self) -> int:
        return (self.stream.nbytes + self.ev_sid.nbytes + self.key.nbytes + self.key_row.nbytes
                + sum(p.nbytes for p in (*self.cols.values(), *self.events.values())))

    def rows(self, a: int, b: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The columns and events of rows ``a:b``, less the rows taken back."""
        cols = {k: p.rows(a, b) for k, p in self.cols.items()}
        ea = int(np.searchsorted(self.ev_sid, self.stream[a], side="left"))
        eb = int(np.searchsorted(self.ev_sid, self.stream[b - 1], side="right"))
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
            a, b = np.searchsorted(chunk.stream, [lo, hi]).tolist()
            if b > a:
                yield chunk.rows(a, b)
