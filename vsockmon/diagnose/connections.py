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

import numpy as np

from vsockmon.conntrack.spill import Packed
from vsockmon.conntrack.tracker import CLIENT, CLOSES, NONE, SERVER, Close, Connection, ConnTable

TableAt = Callable[[int, int], ConnTable]
"""The table of the streams numbered ``lo`` to ``hi - 1`` (a tracker's ``table``)."""

CHUNK = 20000
"""Streams per table made from a tracker: the most Connection objects alive at once."""

JOINED_BYTES = 16 << 20
"""Bytes of joined columns a packed index holds: rules read a few columns many times (a
finding's stream numbers, the columns they select on) and each join is a pass over the
parts, so the columns read last stay joined — all of them for a capture of a hundred
thousand connections, one or two of a storm's million."""

_CODE = {k: i for i, k in enumerate(CLOSES)}
FIELDS = ("stream", "type", "client_cid", "client_port", "server_cid", "server_port",
          "close", "start_seen", "request_frame", "response_frame", "close_frame",
          "first_frame", "last_frame", "first_ts", "last_ts", "handshake")
"""The index's columns, in the order :meth:`Index.of_table` reads them."""


class _Column:
    """One column of an :class:`Index`, read as a numpy array."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, ix: Index, owner: type) -> np.ndarray:
        return ix.column(self.name)


Part = dict[str, "np.ndarray | Packed"]


class Index:
    """One row per connection, in stream order: what the rules select on. ``close`` is an
    index into :data:`~vsockmon.conntrack.tracker.CLOSES`; a frame or delay that is missing
    is :data:`~vsockmon.conntrack.model.NONE`.

    A tracker's index is kept as :class:`~vsockmon.conntrack.spill.Packed` parts (the
    spill's compact columns): a storm's rows, all alike, pack to under a byte each instead
    of 100, so diagnose's memory does not grow by a wide row per connection ever seen. A
    column is joined from its parts when a rule reads it; the last read stay joined, up to
    :data:`JOINED_BYTES`.
    """

    stream = _Column()
    type = _Column()
    client_cid = _Column()
    client_port = _Column()
    server_cid = _Column()
    server_port = _Column()
    close = _Column()
    start_seen = _Column()
    request_frame = _Column()
    response_frame = _Column()
    close_frame = _Column()
    first_frame = _Column()
    last_frame = _Column()
    first_ts = _Column()
    last_ts = _Column()
    handshake = _Column()

    def __init__(self, **columns: np.ndarray) -> None:
        """An index of the given columns (one array each, all of :data:`FIELDS`), as they
        are: no copy."""
        if sorted(columns) != sorted(FIELDS):
            raise TypeError(f"an index has the columns {', '.join(FIELDS)}")
        self._parts: list[Part] = [dict(columns)]
        self._n = len(columns["stream"])
        self._starts = np.array([0, self._n], dtype=np.int64)
        """The first row of each part, then the number of rows."""
        self._firsts = np.asarray(columns["stream"][:1], dtype=np.int64)
        """The first stream of each part."""
        self._joined: dict[str, np.ndarray] = {}
        self._previous: np.ndarray | None = None

    @classmethod
    def packed(cls, parts: Iterable[Index]) -> Index:
        """The rows of ``parts`` one after the other, each part packed as it comes (they
        are made a table at a time and let go: the wide form never exists for them all)."""
        ix = cls(**{f: np.zeros(0, dtype=np.int64) for f in FIELDS})
        ix._parts, firsts = [], []
        for p in parts:
            if len(p):
                ix._parts.append({f: Packed(p.column(f)) for f in FIELDS})
                firsts.append(int(p.column("stream")[0]))
        ix._firsts = np.array(firsts, dtype=np.int64)
        ix._starts = np.cumsum([0, *(part["stream"].shape[0] for part in ix._parts)])
        ix._n = int(ix._starts[-1])
        return ix

    @classmethod
    def of_table(cls, t: ConnTable) -> Index:
        cid, port = t.column("cid"), t.column("port")
        return cls(stream=t.column("stream"), type=t.column("type"),
                   client_cid=cid[:, CLIENT], client_port=port[:, CLIENT],
                   server_cid=cid[:, SERVER], server_port=port[:, SERVER],
                   **{k: t.column(k) for k in FIELDS[6:]})

    @classmethod
    def of_connections(cls, conns: Sequence[Connection]) -> Index:
        def col(get: Callable[[Connection], int | None], dtype: type = np.int64) -> np.ndarray:
            values = [get(c) for c in conns]
            return np.array([NONE if v is None else v for v in values], dtype=dtype)

        return cls(**dict(zip(FIELDS, (
            col(lambda c: c.stream), col(lambda c: c.type),
            col(lambda c: c.client.cid, np.uint64), col(lambda c: c.client.port),
            col(lambda c: c.server.cid, np.uint64), col(lambda c: c.server.port),
            col(lambda c: _CODE[c.close]), col(lambda c: c.start_seen, bool),
            col(lambda c: c.request_frame), col(lambda c: c.response_frame),
            col(lambda c: c.close_frame), col(lambda c: c.first_frame),
            col(lambda c: c.last_frame), col(lambda c: c.first_ts_ns),
            col(lambda c: c.last_ts_ns), col(lambda c: c.handshake_ns)), strict=True)))

    def __len__(self) -> int:
        return self._n

    def column(self, name: str) -> np.ndarray:
        """The column ``name`` over every row: the array itself when the index was given
        its columns, else joined from the packed parts (read-only)."""
        if len(self._parts) == 1 and isinstance(only := self._parts[0][name], np.ndarray):
            return only
        joined = self._joined.pop(name, None)
        if joined is None:
            joined = self._join(name)
        held = joined.nbytes + sum(c.nbytes for c in self._joined.values())
        while self._joined and held > JOINED_BYTES:  # the least recently read go
            held -= self._joined.pop(next(iter(self._joined))).nbytes
        self._joined[name] = joined
        return joined

    def take(self, name: str, rows: int | np.ndarray) -> np.ndarray:
        """The column ``name`` at ``rows`` (a row or an array of them, any order): read
        from the joined column when it is held, else from only the parts that hold the rows
        — a finding reads a few values of a million without joining them all, and a storm's
        finding its million ascending rows a part at a time."""
        at = np.asarray(rows, dtype=np.int64)
        flat = at.reshape(-1)
        if ((flat < 0) | (flat >= self._n)).any():
            raise IndexError(f"rows outside the index's {self._n}")
        if name in self._joined or len(self._parts) == 1:
            return self.column(name)[at]
        ascending = not (flat[1:] < flat[:-1]).any()
        if not ascending and len(flat) > self._n // 4:
            return self.column(name)[at]  # many rows out of order: cheaper joined than sorted
        order = None if ascending else np.argsort(flat, kind="stable")
        ordered = flat if order is None else flat[order]
        cut = np.searchsorted(ordered, self._starts).tolist()
        pieces = [_wide(part[name])[ordered[a:b] - start]
                  for part, start, a, b in zip(self._parts, self._starts[:-1].tolist(),
                                               cut[:-1], cut[1:], strict=True) if b > a]
        if not pieces:
            return np.zeros(at.shape, dtype=self._parts[0][name].dtype if self._parts
                            else np.int64)
        by_row = np.concatenate(pieces)
        if order is not None:
            by_row[order] = by_row.copy()
        return by_row.reshape(at.shape)

    def row_of(self, stream: int) -> int:
        """The row of ``stream`` (KeyError: none), found in the one part that can hold it:
        the streams ascend."""
        if len(self._parts) == 1 or "stream" in self._joined:
            streams, base = self.column("stream"), 0
        else:
            p = max(int(np.searchsorted(self._firsts, stream, side="right")) - 1, 0)
            streams, base = _wide(self._parts[p]["stream"]), int(self._starts[p])
        i = int(np.searchsorted(streams, stream))
        if i >= len(streams) or streams[i] != stream:
            raise KeyError(f"no stream {stream}")
        return base + i

    def _join(self, name: str) -> np.ndarray:
        pieces = [_wide(part[name]) for part in self._parts]
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        joined = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]  # made here
        joined.flags.writeable = False
        return joined

    def closed(self, *kinds: Close) -> np.ndarray:
        """Which connections ended in one of ``kinds``."""
        return np.isin(self.close, [_CODE[k] for k in kinds])

    def among(self, streams: Iterable[int]) -> np.ndarray:
        """Which connections are of ``streams`` (a set the rules keep)."""
        return np.isin(self.stream, np.fromiter(streams, dtype=np.int64))

    def close_of(self, row: int) -> Close:
        return CLOSES[int(self.take("close", row))]

    def previous_same_pair(self) -> np.ndarray:
        """Per connection, the row of the latest earlier one on the same address pair
        (socket type and both ends, whichever dialled), or -1: the connection whose ports a
        new one reuses."""
        if self._previous is None:
            words = self._pair_words()
            order = np.lexsort(words[::-1])  # stable: each pair's rows in stream order
            same = np.ones(len(order), dtype=bool)
            same[:1] = False
            while words:  # each word let go once compared
                sw = words.pop()[order]
                same[1:] &= sw[1:] == sw[:-1]
            later = np.flatnonzero(same)
            previous = np.full(len(order), -1, dtype=np.int64)
            previous[order[later]] = order[later - 1]
            self._previous = previous
        return self._previous

    def _pair_words(self) -> list[np.ndarray]:
        """Each row's address pair (type, then the lower end's CID and port, then the
        higher's) packed into as few uint64 words as the columns' largest values allow (a
        storm's: one), made a part at a time: no whole column is read for it."""
        cid = max(self._bits("client_cid"), self._bits("server_cid"))
        port = max(self._bits("client_port"), self._bits("server_port"))
        layout = _layout((self._bits("type"), cid, port, cid, port))
        words = [np.zeros(self._n, dtype=np.uint64) for _ in range(layout[-1][0] + 1)]
        for part, a, b in zip(self._parts, self._starts[:-1], self._starts[1:], strict=True):
            for (w, shift), key in zip(layout, _pair(part), strict=True):
                words[w][a:b] |= key.astype(np.uint64) << np.uint64(shift)
        return words

    def _bits(self, name: str) -> int:
        """The bits the largest value of column ``name`` needs (at least 1)."""
        top = max((int(_wide(part[name]).max(initial=0)) for part in self._parts), default=0)
        return max(top.bit_length(), 1)

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


def _layout(bits: Sequence[int]) -> list[tuple[int, int]]:
    """Where keys of these widths go when packed in order: (word, shift) each, a word
    holding at most 64 bits."""
    out, word, used = [], 0, 0
    for width in bits:
        if used + width > 64:
            word, used = word + 1, 0
        out.append((word, used))
        used += width
    return out


def _pair(part: Part) -> Iterator[np.ndarray]:
    """A part's address pair columns: type, the lower end's CID and port, the higher's."""
    ccid, scid = _wide(part["client_cid"]), _wide(part["server_cid"])
    cport, sport = _wide(part["client_port"]), _wide(part["server_port"])
    client_first = (ccid < scid) | ((ccid == scid) & (cport <= sport))
    yield _wide(part["type"])
    yield np.where(client_first, ccid, scid)
    yield np.where(client_first, cport, sport)
    yield np.where(client_first, scid, ccid)
    yield np.where(client_first, sport, cport)


def _wide(col: np.ndarray | Packed) -> np.ndarray:
    """A part's column as an array."""
    return col if isinstance(col, np.ndarray) else col.rows(0, col.shape[0])


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
        index = Index.packed(Index.of_table(table_at(lo, lo + CHUNK))
                             for lo in range(0, streams, CHUNK))
        ranges = _Ranges(table_at)
        return cls(index, lambda rows: ranges.make(index.take("stream", rows)))

    def pick(self, rows: np.ndarray) -> Iterator[Connection]:
        """The Connection objects of the index rows ``rows`` (ascending)."""
        return self._make(np.asarray(rows, dtype=np.int64))

    def at(self, row: int) -> Connection:
        """The Connection object of one index row."""
        return next(self.pick(np.array([row])))

    def row(self, stream: int) -> int:
        """The index row of ``stream`` (KeyError: no such stream)."""
        return self.index.row_of(stream)

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
        return len(self.index)


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
