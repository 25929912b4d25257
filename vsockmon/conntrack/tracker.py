"""Connection tracking for virtio-vsock: streams, ends, closes and flow credit, in bulk.

A :class:`ConnTracker` is fed :class:`~vsockmon.decode.frames.FrameBatch` columns and follows every
connection through REQUEST → RESPONSE (or RST) → data → SHUTDOWN → RST. It never builds a
Python object per packet or per connection: a compiled key map (``_track.KeyMap``, 40 bytes
a key) gives each row its stream, and one compiled pass over the batch (``_track.track``)
updates counters, first/last frames, closes, violations, stalls and the credit arithmetic
in the columns of a :class:`~vsockmon.conntrack.table.StreamTable`, in frame order, and
keeps the control packets (by stream, then frame). Numpy opens new streams; Python runs
once per batch, and once per control packet at the very end
(:mod:`~vsockmon.conntrack.records` makes the results). The pass is sequential because the
rules are: a frame's credit and its violations depend on every earlier frame of its
connection. No I/O.

Stream numbering — shared with the Wireshark Lua plugin, so it must stay exactly this:
the key of a frame is (virtio type, unordered pair {(src_cid, src_port), (dst_cid,
dst_port)}). A REQUEST always starts a new stream for its key; any other frame joins the
current stream of its key, or starts one if the key has none. Streams are numbered 0, 1, 2…
in order of their first frame. Frames without a virtio header belong to no stream (-1).

Credit (per direction, sender S → receiver R): S may have at most ``R.buf_alloc - (tx_cnt -
R.fwd_cnt)`` payload bytes unconsumed. ``tx_cnt`` is the sum of S's RW ``len`` (never the
frame length: the tap-length bug). ``R.fwd_cnt`` is unwrapped from u32 and never moves back
(a delayed packet may carry an older value; the highest seen counts). Counting is relative
to R's first advertisement, so a connection whose start was not captured gets a lower bound
of the bytes in flight rather than nonsense; a REQUEST-started one gets the exact value.
RST packets carry no credit (a refusal advertises buf_alloc 0).

The tracker's results and the names most callers want are re-exported here
(``from vsockmon.conntrack.tracker import ConnTracker, ConnTable, Close``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from vsockmon.conntrack import _track
from vsockmon.conntrack.model import (
    CLIENT,
    NONE,
    ROLES,
    SERVER,
    Close,
    Connection,
    Event,
    Evidence,
    Side,
    Stalls,
    Tags,
    Violation,
)
from vsockmon.conntrack.records import CLOSES, RECORD_FIELDS, ConnTable, RecordField, results
from vsockmon.conntrack.spill import Spill, key_hash
from vsockmon.conntrack.streams import StreamRows
from vsockmon.conntrack.table import StreamTable
from vsockmon.decode.frames import VIRTIO_DTYPE, FrameBatch
from vsockmon.wire.protocol import Op

__all__ = [
    "CLIENT", "CLOSES", "NONE", "RECORD_FIELDS", "ROLES", "SERVER", "Close", "ConnTable",
    "ConnTracker", "Connection", "Event", "Evidence", "RecordField", "Side", "Stalls",
    "StreamRows", "Tags", "Violation",
]

_HEADERS_FIT = 0xFFFFFFFF
"""The largest CID of a packed key end (``cid << 32 | port``): the spill's index form."""
_EVENTS: tuple[tuple[str, type[np.integer]], ...] = (
    ("sid", np.int64), ("frame", np.int64), ("ts", np.int64), ("op", np.uint16),
    ("sender", np.int8), ("flags", np.uint32), ("len", np.uint32), ("buf", np.uint32),
    ("fwd", np.uint32))
"""The columns of a control event, as the tracker keeps them (the wire's narrow types) and
the compiled pass writes them (``_track.EVENT_COLUMNS``)."""
_EV_NAMES = tuple(name for name, _ in _EVENTS)
CHUNK = 20000
"""Streams per table of :meth:`ConnTracker.tables`."""


def _layout(dtype: np.dtype[np.void]) -> tuple[int, ...]:
    """What the compiled pass needs to read headers of ``dtype``: (itemsize, offset of each
    field it reads), taken from the header table's dtype so the layout has one source."""
    for name, size in _track.HEADER_FIELDS:
        if dtype.fields is None or dtype.fields[name][0].itemsize != size:
            raise ValueError(f"virtio header field {name}: not {size} bytes")
    assert dtype.fields is not None
    return (dtype.itemsize, *(dtype.fields[name][1] for name, _ in _track.HEADER_FIELDS))


_LAYOUT = _layout(VIRTIO_DTYPE)
_START_LOWER = _track.CONSTANTS["START_LOWER"]


class ConnTracker:
    """Follows every connection of a capture; feed it batches in order, then :meth:`finish`.

    Memory is O(connections + control packets): nothing is kept per RW or CREDIT_UPDATE.
    """

    def __init__(self, spill_at: int | None = None) -> None:
        """``spill_at``: move closed streams out of the working set into compact columns
        (:mod:`~vsockmon.conntrack.spill`) whenever it holds at least this many; None keeps
        every stream in it (a live view forgets them instead, see :meth:`forget`)."""
        self._t = StreamTable()
        self._spill = Spill()
        self._spill_at = spill_at
        self._next = 0
        """The number of the next new stream (streams seen so far)."""
        self._keys = _track.KeyMap()
        """Connection key -> its current stream (the latest started)."""
        self._events: list[tuple[np.ndarray, ...]] = []
        self.frames = 0
        self.frames_without_stream = 0
        self.end_ns: int | None = None
        """The latest timestamp fed: where the capture's still-open stalls end."""

    @property
    def streams(self) -> int:
        """Streams seen so far, forgotten ones included."""
        return self._next

    @property
    def working_set(self) -> int:
        """Streams whose state the tracker holds as table rows (and key map entries): all of
        them, less those forgotten or spilled."""
        return self._t.size

    @property
    def keys(self) -> int:
        """Connection keys in the tracker's key map (40 bytes each, not Python objects)."""
        return len(self._keys)

    @property
    def spilled(self) -> int:
        """Closed streams held in the spill's compact columns."""
        return self._spill.streams

    # -- feeding ----------------------------------------------------------------------------

    def feed(self, fb: FrameBatch) -> Tags:
        """Track the frames of one batch; returns each row's stream, sender and credit."""
        n = len(fb)
        tags = Tags(np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int8),
                    np.full((n, 2), -1, dtype=np.int64), np.full((n, 2), -1, dtype=np.int64),
                    np.zeros(n, dtype=bool))
        rows = np.flatnonzero(fb.has_virtio).astype(np.int64)
        self.frames += n
        self.frames_without_stream += n - len(rows)
        if n:
            hi = int(fb.ts_ns.max())
            self.end_ns = hi if self.end_ns is None else max(self.end_ns, hi)
        if not len(rows):
            return tags
        virtio = np.ascontiguousarray(fb.virtio)
        sid, slot = self._group(fb, virtio, rows)
        t = self._t
        events = tuple(np.empty(len(rows), dtype=dtype) for _, dtype in _EVENTS)
        k = _track.track(
            virtio, _LAYOUT, rows, fb.first, np.ascontiguousarray(fb.ts_ns, dtype=np.int64),
            np.ascontiguousarray(fb.anomalies, dtype=np.uint16), slot, sid, len(t.type),
            tuple(getattr(t, name) for name, _, _ in _track.COLUMNS),
            tags.sender, tags.in_flight, tags.limit, tags.beyond, events)
        tags.stream[rows] = sid
        if k:  # the control packets, by stream then frame: the only per-packet memory kept
            self._events.append(tuple(c[:k].copy() for c in events))
        if self._spill_at is not None:
            self._spill_closed(self._spill_at)
        return tags

    def _group(self, fb: FrameBatch, virtio: np.ndarray, rows: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's stream (new ones numbered in order of their first frame) and its row in
        the table, the new streams opened."""
        keys = self._keys
        spilled = self._spill.indexes if self._spill.streams else ()
        sid = np.empty(len(rows), dtype=np.int64)
        starts = np.empty(len(rows), dtype=np.uint8)
        first_new = self._next
        at, self._next = keys.assign(virtio, _LAYOUT, rows, 0, first_new, sid, starts, spilled)
        while at < len(rows):  # a late frame of a spilled key (or a hash's rare collision)
            late = rows[at: at + 1]
            keys.put(virtio, _LAYOUT, late, self._unspill(virtio[late]))
            at, self._next = keys.assign(virtio, _LAYOUT, rows, at, self._next, sid, starts,
                                         spilled)
        begun = starts != 0
        started = rows[begun]
        self._new_streams(fb, started, virtio[started], starts[begun] == _START_LOWER,
                          first_new)
        t = self._t
        return sid, np.searchsorted(t.stream[: t.size], sid)  # the table is in stream order

    def _new_streams(self, fb: FrameBatch, rows: np.ndarray, v: np.ndarray,
                     src_lower: np.ndarray, first: int) -> None:
        """Open streams ``first``, ``first + 1``… at each of ``rows`` (their virtio headers
        ``v``; ``src_lower``: whether each source is its key's lower end, as the key map
        decided), in id order."""
        if not len(rows):
            return
        t = self._t
        a = t.size
        t.grow(a + len(rows))
        ids = slice(a, a + len(rows))
        t.stream[ids] = np.arange(first, first + len(rows))
        op = v["op"].astype(np.int64)
        sport, dport = v["src_port"], v["dst_port"]
        client_is_src = (op == Op.REQUEST) | ((op != Op.RESPONSE) & (sport >= dport))
        t.client_is_lower[ids] = client_is_src == src_lower
        t.start_seen[ids] = op == Op.REQUEST
        t.type[ids] = v["type"]
        for side, is_client in ((CLIENT, client_is_src), (SERVER, ~client_is_src)):
            t.cid[ids, side] = np.where(is_client, v["src_cid"], v["dst_cid"])
            t.port[ids, side] = np.where(is_client, v["src_port"], v["dst_port"])
        t.first_frame[ids] = rows + fb.first
        t.first_ts[ids] = fb.ts_ns[rows]

    # -- the spill ----------------------------------------------------------------------------

    def _spill_closed(self, at_least: int) -> None:
        """Spill the closed streams (an RST, or both directions shut) once there are
        ``at_least`` of them. Streams whose CIDs do not fit 32 bits stay (their key is not
        the packed one the spill indexes)."""
        t = self._t
        closed = t.closed[: t.size]
        done = (closed >= 4) | (closed == 3)  # bit 2, or bits 0 and 1
        if int(np.count_nonzero(done)) < at_least:
            return
        done &= t.cid[: t.size].max(axis=1) <= 0xFFFFFFFF
        rows = np.flatnonzero(done)
        cols = {k: c.take(rows, axis=0) for k, c in t.columns().items()}
        # their keys leave the map, unless a newer stream holds the key
        self._keys.discard(cols["type"], cols["cid"], cols["port"], cols["stream"])
        typ, lo, hi = _table_keys(cols)
        ev = self._sorted_events()
        out = np.isin(ev["sid"], cols["stream"])
        self._spill.add(cols, {k: c[out] for k, c in ev.items()}, key_hash(typ, lo, hi))
        self._events = [tuple(c[~out] for c in ev.values())]
        t.keep(~done)

    def _unspill(self, v: np.ndarray) -> np.ndarray:
        """The stream of each header's key among the spilled ones (-1: none), taken back
        into the working set: a late frame joins the key's latest stream, spilled or not.
        Only keys whose CIDs fit 32 bits are spilled."""
        out = np.full(len(v), -1, dtype=np.int64)
        packed = np.flatnonzero(np.maximum(v["src_cid"], v["dst_cid"]) <= _HEADERS_FIT)
        if not len(packed):
            return out
        src = (v["src_cid"] << np.uint64(32)) | v["src_port"]
        dst = (v["dst_cid"] << np.uint64(32)) | v["dst_port"]
        keys = np.stack([v["type"].astype(np.uint64), np.minimum(src, dst),
                         np.maximum(src, dst)], axis=1)[packed]
        found = self._spill.find(key_hash(keys[:, 0], keys[:, 1], keys[:, 2]))
        picks: list[tuple[int, int]] = []
        for i, key, cands in zip(packed.tolist(), keys.tolist(), found, strict=True):
            best: tuple[int, int, int] | None = None
            for ci, r in cands:
                row = {n: self._spill.row(ci, r, n)[None] for n in ("type", "cid", "port",
                                                                    "stream")}
                if [int(x[0]) for x in _table_keys(row)] == key:
                    sid = int(row["stream"][0])
                    if best is None or sid > best[0]:
                        best = (sid, ci, r)
            if best is not None:
                out[i] = best[0]
                picks.append(best[1:])
        if picks:
            cols, events = self._spill.take(picks)
            self._t.insert({k: np.concatenate([c[k] for c in cols]) for k in cols[0]})
            self._events.append(tuple(np.concatenate([e[k] for e in events])
                                      for k in _EV_NAMES))
        return out

    def _sorted_events(self) -> dict[str, np.ndarray]:
        """The working set's control events as one set of columns, by stream then frame;
        kept so (one sorted copy, not two)."""
        if not self._events:
            return {k: np.zeros(0, dtype=np.int64) for k in _EV_NAMES}
        if len(self._events) == 1:  # already one set (sorted when it was made here)
            ev = dict(zip(_EV_NAMES, self._events[0], strict=True))
        else:
            ev = {k: np.concatenate(c) for k, c in zip(
                _EV_NAMES, zip(*self._events, strict=True), strict=True)}
        if len(self._events) > 1 or not _ascending(ev):
            order = np.lexsort((ev["frame"], ev["sid"]))
            ev = {k: c[order] for k, c in ev.items()}
        self._events = [tuple(ev.values())]
        return ev

    # -- results ----------------------------------------------------------------------------

    def forget(self, streams: Iterable[int]) -> None:
        """Drop ``streams`` from the working set: a live view forgets closed connections so
        that its memory follows the open ones. A later frame of a forgotten stream's ends
        starts a new stream (as one does at the start of a capture); :meth:`finish` leaves
        them out. Costs a pass over the streams kept."""
        gone = np.fromiter(streams, dtype=np.int64)
        t = self._t
        keep = ~np.isin(t.stream[: t.size], gone)
        if keep.all():
            return
        t.keep(keep)
        self._keys.drop(np.unique(gone))
        self._events = [tuple(c[~np.isin(ev[0], gone)] for c in ev) for ev in self._events]

    def finish(self, end_ns: int | None = None) -> ConnTable:
        """Every connection, by stream number, closed off as the capture ended: at
        ``end_ns`` (live: now) or the latest timestamp fed, whichever is later."""
        return self._table(0, self._next, self._end(end_ns))

    def tables(self, end_ns: int | None = None, size: int | None = None
               ) -> Iterator[ConnTable]:
        """The connections of :meth:`finish` as tables of at most ``size`` (default
        :data:`CHUNK`) streams each, in stream order: what a writer needs when the spill
        holds a million of them."""
        end = self._end(end_ns)
        size = size or CHUNK
        for lo in range(0, self._next, size):
            table = self._table(lo, min(lo + size, self._next), end)
            if len(table):
                yield table

    def table(self, lo: int, hi: int, end_ns: int | None = None) -> ConnTable:
        """The connections of :meth:`finish` numbered ``lo`` to ``hi - 1`` (those held): a
        reader that wants a few connections of a million (diagnose) takes their range."""
        return self._table(lo, hi, self._end(end_ns))

    def __len__(self) -> int:
        """Streams held: in the working set or spilled (not forgotten)."""
        return self._t.size + self._spill.streams

    def _end(self, end_ns: int | None) -> int:
        return max(end_ns or 0, self.end_ns or 0)

    def _table(self, lo: int, hi: int, end: int) -> ConnTable:
        """The table of the streams numbered ``lo`` to ``hi - 1`` (those held)."""
        t = self._t
        cols = t.columns()
        a, b = np.searchsorted(cols["stream"], [lo, hi]).tolist()
        ev = self._sorted_events()
        ea, eb = np.searchsorted(ev["sid"], [lo, hi]).tolist()
        # spilled streams first: they are mostly older, so the parts are often in order
        parts = [*self._spill.ranges(lo, hi),
                 ({k: c[a:b] for k, c in cols.items()}, {k: c[ea:eb] for k, c in ev.items()})]
        if len(parts) > 1:  # a column at a time, each part's freed once joined
            cols = {k: np.concatenate([p[0].pop(k) for p in parts]) for k in list(cols)}
            if (np.diff(cols["stream"]) < 0).any():
                order = np.argsort(cols["stream"], kind="stable")
                cols = {k: c[order] for k, c in cols.items()}
            ev = {k: np.concatenate([p[1].pop(k) for p in parts]) for k in list(ev)}
            if not _ascending(ev):
                order = np.lexsort((ev["frame"], ev["sid"]))
                ev = {k: c[order] for k, c in ev.items()}
        else:
            cols, ev = parts[0]
        # the table's rows: the stream numbers unless some were forgotten or spilled
        ev = {**ev, "sid": np.searchsorted(cols["stream"], ev["sid"])}
        return results(cols, ev, len(cols["stream"]), end)


def _table_keys(cols: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The packed connection keys (type, lower end, higher end) of table rows whose CIDs fit
    32 bits: the form the spill indexes."""
    ends = (cols["cid"].astype(np.uint64) << np.uint64(32)) | cols["port"].astype(np.uint64)
    return (cols["type"].astype(np.uint64), ends.min(axis=1), ends.max(axis=1))


def _ascending(ev: dict[str, np.ndarray]) -> bool:
    """Whether events are already by stream, then frame."""
    sid, frame = ev["sid"], ev["frame"]
    if len(sid) < 2:
        return True
    step = np.diff(sid)
    return bool((step >= 0).all() and (np.diff(frame)[step == 0] > 0).all())
