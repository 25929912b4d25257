"""The connections the rules read: a compact index of every one, Connection objects on demand.

A capture may hold a million connections (a connect() storm: an agent dialling a port
nobody listens on), and a :class:`~vsockmon.conntrack.model.Connection` with its two sides
and its events costs kilobytes, so the rules must never hold them all. They find their
candidates in the :class:`Index` (a few numpy columns per connection: addresses, close,
frames, times), then :meth:`Connections.pick` makes the objects of those few, a range of
streams at a time, and lets each range go. No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np

from vsockmon.conntrack.tracker import CLIENT, CLOSES, NONE, SERVER, Close, Connection, ConnTable

TableAt = Callable[[int, int], ConnTable]
"""The table of the streams numbered ``lo`` to ``hi - 1`` (a tracker's ``table``)."""

CHUNK = 20000
"""Streams per table made from a tracker: the most Connection objects alive at once."""

_CODE = {k: i for i, k in enumerate(CLOSES)}
_DTYPES: dict[str, type] = {
    "type": np.uint16, "client_cid": np.uint64, "client_port": np.uint32,
    "server_cid": np.uint64, "server_port": np.uint32, "close": np.uint8, "start_seen": bool}
"""The index's narrow columns (the tracker's own types; a close is one of a few); the
others are int64 frames, times and stream numbers."""


@dataclass
class Index:
    """One row per connection, in stream order: what the rules select on. ``close`` is an
    index into :data:`~vsockmon.conntrack.tracker.CLOSES`; a frame or delay that is missing
    is :data:`~vsockmon.conntrack.model.NONE`."""

    stream: np.ndarray
    type: np.ndarray
    client_cid: np.ndarray
    client_port: np.ndarray
    server_cid: np.ndarray
    server_port: np.ndarray
    close: np.ndarray
    start_seen: np.ndarray
    request_frame: np.ndarray
    response_frame: np.ndarray
    close_frame: np.ndarray
    first_frame: np.ndarray
    last_frame: np.ndarray
    first_ts: np.ndarray
    last_ts: np.ndarray
    handshake: np.ndarray

    @classmethod
    def of_table(cls, t: ConnTable) -> Index:
        cid, port = t.column("cid"), t.column("port")
        return cls(t.column("stream"), t.column("type"), cid[:, CLIENT], port[:, CLIENT],
                   cid[:, SERVER], port[:, SERVER],
                   *(t.column(k) for k in ("close", "start_seen", "request_frame",
                                           "response_frame", "close_frame", "first_frame",
                                           "last_frame", "first_ts", "last_ts", "handshake")))

    @classmethod
    def of_connections(cls, conns: Sequence[Connection]) -> Index:
        def col(get: Callable[[Connection], int | None], dtype: type = np.int64) -> np.ndarray:
            values = [get(c) for c in conns]
            return np.array([NONE if v is None else v for v in values], dtype=dtype)

        return cls(col(lambda c: c.stream), col(lambda c: c.type),
                   col(lambda c: c.client.cid, np.uint64), col(lambda c: c.client.port),
                   col(lambda c: c.server.cid, np.uint64), col(lambda c: c.server.port),
                   col(lambda c: _CODE[c.close]), col(lambda c: c.start_seen, bool),
                   col(lambda c: c.request_frame), col(lambda c: c.response_frame),
                   col(lambda c: c.close_frame), col(lambda c: c.first_frame),
                   col(lambda c: c.last_frame), col(lambda c: c.first_ts_ns),
                   col(lambda c: c.last_ts_ns), col(lambda c: c.handshake_ns))

    @classmethod
    def empty(cls, n: int) -> Index:
        """Room for ``n`` connections, to :meth:`fill` a table at a time: the columns are
        never held twice (parts and their join), so their size is the peak."""
        return cls(*(np.zeros(n, dtype=_DTYPES.get(f.name, np.int64)) for f in fields(cls)))

    def fill(self, at: int, part: Index) -> int:
        """Copy ``part`` into the rows from ``at`` on; returns the row after it."""
        end = at + len(part.stream)
        for f in fields(self):
            getattr(self, f.name)[at:end] = getattr(part, f.name)
        return end

    def head(self, n: int) -> Index:
        """The first ``n`` rows (views: no copy)."""
        return Index(*(getattr(self, f.name)[:n] for f in fields(self)))

    def closed(self, *kinds: Close) -> np.ndarray:
        """Which connections ended in one of ``kinds``."""
        return np.isin(self.close, [_CODE[k] for k in kinds])

    def among(self, streams: Iterable[int]) -> np.ndarray:
        """Which connections are of ``streams`` (a set the rules keep)."""
        return np.isin(self.stream, np.fromiter(streams, dtype=np.int64))

    def close_of(self, row: int) -> Close:
        return CLOSES[int(self.close[row])]

    def previous_same_pair(self) -> np.ndarray:
        """Per connection, the row of the latest earlier one on the same address pair
        (socket type and both ends, whichever dialled), or -1: the connection whose ports a
        new one reuses."""
        if not hasattr(self, "_previous"):
            client_first = ((self.client_cid < self.server_cid)
                            | ((self.client_cid == self.server_cid)
                               & (self.client_port <= self.server_port)))
            lo_cid = np.where(client_first, self.client_cid, self.server_cid)
            lo_port = np.where(client_first, self.client_port, self.server_port)
            hi_cid = np.where(client_first, self.server_cid, self.client_cid)
            hi_port = np.where(client_first, self.server_port, self.client_port)
            keys = (self.type, lo_cid, lo_port, hi_cid, hi_port)
            order = np.lexsort(keys[::-1])  # stable: each pair's rows in stream order
            same = np.zeros(len(order), dtype=bool)
            same[1:] = True
            for k in keys:
                same[1:] &= k[order][1:] == k[order][:-1]
            previous = np.full(len(order), -1, dtype=np.int64)
            previous[order[1:][same[1:]]] = order[:-1][same[1:]]
            self._previous = previous
        return self._previous

    def groups(self, rows: np.ndarray, keys: Sequence[np.ndarray], least: int = 1
               ) -> list[np.ndarray]:
        """``rows`` grouped by their values of the columns ``keys``: each group's rows in
        stream order, the groups in the order of their first row, groups smaller than
        ``least`` left out (a million groups of one make no array each)."""
        if not len(rows):
            return []
        picked = _packed(k[rows] for k in keys)  # each picked column let go once packed
        order = np.lexsort(picked[::-1])
        change = np.zeros(len(rows), dtype=bool)
        change[0] = True
        for k in picked:
            sk = k[order]
            change[1:] |= sk[1:] != sk[:-1]
        starts = np.flatnonzero(change)
        ends = np.r_[starts[1:], len(rows)]
        big = np.flatnonzero(ends - starts >= least)
        sorted_rows = rows[order]
        out = [sorted_rows[a:b] for a, b in zip(starts[big].tolist(), ends[big].tolist(),
                                                strict=True)]
        out.sort(key=lambda g: int(g[0]))
        return out


def _packed(keys: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Unsigned key columns packed into as few uint64 words as their largest values allow
    (a storm's four target columns are one): rows equal in every key are equal words, and
    the others differ. Grouping a million rows then sorts one word, not four columns."""
    words: list[np.ndarray] = []
    used = 64
    for k in keys:
        bits = max(int(k.max()).bit_length(), 1) if len(k) else 1
        if k.dtype.kind != "u" or used + bits > 64:
            words.append(k.astype(np.uint64, copy=False) if k.dtype.kind == "u" else k)
            used = bits if k.dtype.kind == "u" else 64
            continue
        words[-1] <<= np.uint64(bits)
        words[-1] |= k.astype(np.uint64, copy=False)
        used += bits
    return words


def present(col: np.ndarray) -> np.ndarray:
    """Which values of a frame or delay column are not missing."""
    return col != NONE


class Connections:
    """The connections in stream order: :attr:`index` for selecting, :meth:`pick` (or
    ``conns[stream]``) for the Connection objects of those selected. Offline a stream's
    number is its position; a live view forgets closed streams, so the numbers have gaps."""

    def __init__(self, index: Index, make: Callable[[np.ndarray], Iterator[Connection]]
                 ) -> None:
        self.index = index
        self._make = make

    @classmethod
    def of(cls, conns: Iterable[Connection] | ConnTable) -> Connections:
        """Connections already made (a list, a live view) or one table."""
        if isinstance(conns, ConnTable):
            table = conns
            return cls(Index.of_table(table), lambda rows: (table[i] for i in rows.tolist()))
        held = list(conns)
        return cls(Index.of_connections(held), lambda rows: (held[i] for i in rows.tolist()))

    @classmethod
    def of_tracker(cls, table_at: TableAt, streams: int) -> Connections:
        """The ``streams`` connections of a tracker, read a range of :data:`CHUNK` streams
        at a time: the index holds a few numbers per connection, never the objects."""
        index, rows = Index.empty(streams), 0
        for lo in range(0, streams, CHUNK):
            rows = index.fill(rows, Index.of_table(table_at(lo, lo + CHUNK)))
        index = index.head(rows)  # fewer than ``streams`` when some were forgotten
        ranges = _Ranges(table_at)
        return cls(index, lambda rows: ranges.make(index.stream[rows]))

    def pick(self, rows: np.ndarray) -> Iterator[Connection]:
        """The Connection objects of the index rows ``rows`` (ascending)."""
        return self._make(np.asarray(rows, dtype=np.int64))

    def at(self, row: int) -> Connection:
        """The Connection object of one index row."""
        return next(self.pick(np.array([row])))

    def row(self, stream: int) -> int:
        """The index row of ``stream`` (KeyError: no such stream)."""
        i = int(np.searchsorted(self.index.stream, stream))
        if i >= len(self.index.stream) or self.index.stream[i] != stream:
            raise KeyError(f"no stream {stream}")
        return i

    def __getitem__(self, stream: int) -> Connection:
        return self.at(self.row(stream))

    def __contains__(self, stream: int) -> bool:
        try:
            self.row(stream)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[Connection]:
        return self.pick(np.arange(len(self)))

    def __len__(self) -> int:
        return len(self.index.stream)


class _Ranges:
    """Connection objects made from a tracker's tables, one range of streams at a time
    (the last range's columns kept: rules ask for neighbours). Only the rows asked for
    become Python values: a rule picking two connections of a range pays for two."""

    def __init__(self, table_at: TableAt) -> None:
        self._table_at = table_at
        self._lo = -1
        self._table: ConnTable | None = None

    def make(self, streams: np.ndarray) -> Iterator[Connection]:
        """The connections of ``streams`` (ascending, all held by the tracker)."""
        if not len(streams):
            return
        starts = streams - streams % CHUNK
        for part in np.split(streams, np.flatnonzero(np.diff(starts)) + 1):
            lo = int(part[0]) - int(part[0]) % CHUNK
            if lo != self._lo or self._table is None:
                self._table = None  # let the last range go before the next is made
                self._table, self._lo = self._table_at(lo, lo + CHUNK), lo
            rows = np.searchsorted(self._table.column("stream"), part)
            picked = self._table if len(rows) == len(self._table) else self._table.take(rows)
            yield from picked
