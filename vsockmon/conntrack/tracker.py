"""Connection tracking for virtio-vsock: streams, ends, closes and flow credit, in bulk.

A :class:`ConnTracker` is fed :class:`~vsockmon.decode.frames.FrameBatch` columns and follows every
connection through REQUEST → RESPONSE (or RST) → data → SHUTDOWN → RST. It never builds a
Python object per packet: each batch is grouped by connection with numpy (one sort), and
counters, first/last frames, violations and the credit arithmetic are segmented cumulative
sums, maxima and forward fills over those groups (:mod:`~vsockmon.conntrack.segments`), kept
in a :class:`~vsockmon.conntrack.table.StreamTable`. Python runs once per connection per
batch and once per control packet at the very end (:mod:`~vsockmon.conntrack.records` makes
the results), so a capture of a million packets costs about what decoding it costs. No I/O.

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

from collections import deque
from collections.abc import Iterable, Iterator
from itertools import compress, repeat

import numpy as np

from vsockmon.conntrack.model import (
    CLIENT,
    NONE,
    ROLES,
    SERVER,
    VIOLATIONS,
    Close,
    Connection,
    Event,
    Evidence,
    Side,
    Stalls,
    Tags,
    Violation,
    no_credit,
)
from vsockmon.conntrack.records import CLOSES, RECORD_FIELDS, ConnTable, RecordField, results
from vsockmon.conntrack.segments import (
    first_per,
    last_per,
    seg_cummax,
    seg_cumsum,
    seg_shift,
)
from vsockmon.conntrack.spill import Spill, key_hash
from vsockmon.conntrack.streams import StreamRows
from vsockmon.conntrack.table import StreamTable
from vsockmon.decode.frames import Anomaly, FrameBatch
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType

__all__ = [
    "CLIENT", "CLOSES", "NONE", "RECORD_FIELDS", "ROLES", "SERVER", "Close", "ConnTable",
    "ConnTracker", "Connection", "Event", "Evidence", "RecordField", "Side", "Stalls",
    "StreamRows", "Tags", "Violation",
]

# Lookup tables indexed by the u16 op.
_EVENT_OPS = np.ones(65536, dtype=bool)
_EVENT_OPS[[Op.RW, Op.CREDIT_UPDATE]] = False
_CREDIT_OPS = np.zeros(65536, dtype=bool)
_CREDIT_OPS[[Op.REQUEST, Op.RESPONSE, Op.SHUTDOWN, Op.RW, Op.CREDIT_UPDATE,
             Op.CREDIT_REQUEST]] = True

_HALF = 1 << 31
U32_MASK = (1 << 32) - 1
_EV_NAMES = ("sid", "frame", "ts", "op", "sender", "flags", "len", "buf", "fwd")
"""The columns of a control event, as the tracker keeps them."""
CHUNK = 20000
"""Streams per table of :meth:`ConnTracker.tables`."""


def _keys(v: np.ndarray) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Sort keys of the connection key (type, {lower end, higher end}) and whether each
    row's source is the lower end. An end is packed as ``cid << 32 | port`` (one compare per
    end) unless a CID does not fit 32 bits; then each part is its own key."""
    scid, dcid = v["src_cid"], v["dst_cid"]
    sport, dport = v["src_port"], v["dst_port"]
    if len(v) and max(int(scid.max()), int(dcid.max())) <= 0xFFFFFFFF:
        src = (scid << np.uint64(32)) | sport
        dst = (dcid << np.uint64(32)) | dport
        return (v["type"], np.minimum(src, dst), np.maximum(src, dst)), src <= dst
    src_lo = (scid < dcid) | ((scid == dcid) & (sport <= dport))
    return (v["type"], np.where(src_lo, scid, dcid), np.where(src_lo, sport, dport),
            np.where(src_lo, dcid, scid), np.where(src_lo, dport, sport)), src_lo


def _key_tuples(keys: list[np.ndarray]) -> list[tuple[int, ...]]:
    """The dictionary keys of the groups: always the packed form when the CIDs fit, so
    a connection's key does not depend on the other rows of its batch."""
    if len(keys) == 3:
        return list(zip(*(k.tolist() for k in keys), strict=True))
    out: list[tuple[int, ...]] = []
    for typ, lc, lp, hc, hp in zip(*(k.tolist() for k in keys), strict=True):
        out.append((typ, lc << 32 | lp, hc << 32 | hp) if max(lc, hc) <= 0xFFFFFFFF
                   else (typ, lc, lp, hc, hp))
    return out


class _Batch:
    """The rows of one batch that carry a virtio header, sorted by stream (then frame): their
    columns, their streams as segments, and which side sent each row. Read-only once made."""

    def __init__(self, fb: FrameBatch, rows: np.ndarray, v: np.ndarray, src_lo: np.ndarray,
                 sid: np.ndarray, slot: np.ndarray, client_is_lower: np.ndarray) -> None:
        self.rows = rows
        self.m = len(rows)
        self.op = v["op"].astype(np.int64)
        self.len = v["len"].astype(np.int64)
        self.flags = v["flags"].astype(np.int64)
        self.buf = v["buf_alloc"].astype(np.int64)
        self.fwd = v["fwd_cnt"].astype(np.int64)
        self.type = v["type"]
        self.rw = self.op == Op.RW
        looped = (v["src_cid"] == v["dst_cid"]) & (v["src_port"] == v["dst_port"])
        self.frame = rows + fb.first
        self.ts = fb.ts_ns[rows]
        self.anom = fb.anomalies[rows]
        # segments: the rows of one stream
        self.sid = sid
        """Each row's stream number (what the tags and events carry)."""
        self.slot = slot
        """Each row's stream's row in the tracker's table (streams forgotten leave it)."""
        first = np.empty(self.m, dtype=bool)
        first[0] = True
        np.not_equal(sid[1:], sid[:-1], out=first[1:])
        self.first_mask = first
        self.first = np.flatnonzero(first)
        self.last = np.r_[self.first[1:] - 1, self.m - 1]
        self.seg = np.cumsum(first) - 1
        self.k = len(self.first)
        self.seg_slot = slot[self.first]
        # a frame addressed to its own sender (both ends equal) counts as the client's
        self.sender = ((src_lo != client_is_lower[slot]) & ~looped).astype(np.int64)
        self.sd = self.seg * 2 + self.sender
        """Row keys per (segment, sender): 2 * segment + sender."""


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
        self._current: dict[tuple[int, ...], int] = {}
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
        """Streams whose state the tracker holds as rows of Python-indexed numpy state and
        dictionary entries: all of them, less those forgotten or spilled."""
        return self._t.size

    @property
    def keys(self) -> int:
        """Connection keys in the tracker's dictionary (the Python objects it keeps)."""
        return len(self._current)

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
        rows = np.flatnonzero(fb.has_virtio)
        self.frames += n
        self.frames_without_stream += n - len(rows)
        if n:
            hi = int(fb.ts_ns.max())
            self.end_ns = hi if self.end_ns is None else max(self.end_ns, hi)
        if not len(rows):
            return tags
        b = self._group(fb, rows)
        self._count(b)
        self._control(b)
        in_flight, limit, beyond = self._credit(b)
        self._violations(b, beyond)
        tags.stream[b.rows] = b.sid
        tags.sender[b.rows] = b.sender
        tags.in_flight[b.rows] = in_flight
        tags.limit[b.rows] = limit
        tags.beyond[b.rows] = beyond
        if self._spill_at is not None:
            self._spill_closed(self._spill_at)
        return tags

    def _group(self, fb: FrameBatch, rows: np.ndarray) -> _Batch:
        """Sort the rows by connection key and give each row its stream (new ones numbered
        in order of their first frame)."""
        v = fb.virtio[rows]
        keys, src_lo = _keys(v)
        order = np.lexsort(keys[::-1])  # stable: rows of one key stay in frame order
        rows, v, src_lo = rows[order], v[order], src_lo[order]
        m = len(rows)
        skeys = [col[order] for col in keys]
        change = np.zeros(m, dtype=bool)
        change[0] = True
        for col in skeys:
            change[1:] |= col[1:] != col[:-1]
        gpos = np.flatnonzero(change)
        gend = np.r_[gpos[1:] - 1, m - 1]
        key_list = _key_tuples([col[gpos] for col in skeys])
        current = self._current
        cur = np.fromiter((current.get(k, -1) for k in key_list), dtype=np.int64,
                          count=len(key_list))
        if self._spill.streams:
            late = np.flatnonzero((cur < 0) & (v["op"][gpos] != Op.REQUEST))
            if len(late):
                cur[late] = self._unspill([key_list[g] for g in late.tolist()])

        start = v["op"] == Op.REQUEST
        start[gpos] |= cur < 0
        spos = np.flatnonzero(start)
        by_frame = spos[np.argsort(rows[spos], kind="stable")]
        first_new = self._next
        self._next += len(by_frame)
        val = np.full(m, -1, dtype=np.int64)
        val[gpos] = cur
        val[by_frame] = np.arange(first_new, first_new + len(by_frame))
        last = np.maximum.accumulate(np.where(val >= 0, np.arange(m), 0))
        sid = val[last]
        for k, s in zip(key_list, sid[gend].tolist(), strict=True):
            current[k] = s
        self._new_streams(fb, rows[by_frame], v[by_frame], src_lo[by_frame], first_new)
        t = self._t
        slot = np.searchsorted(t.stream[: t.size], sid)  # the table is in stream order
        return _Batch(fb, rows, v, src_lo, sid, slot, t.client_is_lower)

    def _new_streams(self, fb: FrameBatch, rows: np.ndarray, v: np.ndarray,
                     src_lo: np.ndarray, first: int) -> None:
        """Open streams ``first``, ``first + 1``… at each of ``rows`` (their virtio headers
        ``v``), in id order."""
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
        t.client_is_lower[ids] = client_is_src == src_lo
        t.start_seen[ids] = op == Op.REQUEST
        t.type[ids] = v["type"]
        for side, is_client in ((CLIENT, client_is_src), (SERVER, ~client_is_src)):
            t.cid[ids, side] = np.where(is_client, v["src_cid"], v["dst_cid"])
            t.port[ids, side] = np.where(is_client, v["src_port"], v["dst_port"])
        t.first_frame[ids] = rows + fb.first
        t.first_ts[ids] = fb.ts_ns[rows]

    def _per_side(self, b: _Batch, mask: np.ndarray | None = None) -> np.ndarray:
        """Rows counted per (segment, sender): a (k, 2) array."""
        keys = b.sd if mask is None else b.sd[mask]
        return np.bincount(keys, minlength=2 * b.k).reshape(b.k, 2)

    def _count(self, b: _Batch) -> None:
        t, s = self._t, b.seg_slot
        t.last_frame[s] = b.frame[b.last]
        t.last_ts[s] = b.ts[b.last]
        rw = b.rw
        t.packets[s] += self._per_side(b)
        t.rw_packets[s] += self._per_side(b, rw)
        seq_rw = rw & (b.type == SockType.SEQPACKET)
        t.eom_packets[s] += self._per_side(b, seq_rw & ((b.flags & SeqFlag.EOM) != 0))
        # A message carries EOR when its last piece (the EOM one) does: the receiving kernel
        # reads EOR only there, so an EOR on a piece without EOM marks no record.
        eom_eor = SeqFlag.EOM | SeqFlag.EOR
        t.eor_packets[s] += self._per_side(b, seq_rw & ((b.flags & eom_eor) == eom_eor))
        t.credit_updates[s] += self._per_side(b, b.op == Op.CREDIT_UPDATE)
        t.credit_requests[s] += self._per_side(b, b.op == Op.CREDIT_REQUEST)
        if rw.any():
            size = 2 * b.k
            first = first_per(b.sd[rw], b.frame[rw], size).reshape(b.k, 2)
            last = last_per(b.sd[rw], b.frame[rw], size).reshape(b.k, 2)
            t.first_rw_frame[s] = np.minimum(t.first_rw_frame[s], first)
            t.last_rw_frame[s] = np.maximum(t.last_rw_frame[s], last)

    def _control(self, b: _Batch) -> None:
        """Keep the control packets as events; note the frames the violation checks need."""
        t, s = self._t, b.seg_slot
        ev = _EVENT_OPS[b.op]
        if ev.any():
            # the only per-packet memory kept: narrow types (the wire's widths)
            self._events.append((
                b.sid[ev], b.frame[ev], b.ts[ev], b.op[ev].astype(np.uint16),
                b.sender[ev].astype(np.int8), *(c[ev].astype(np.uint32) for c in
                                                (b.flags, b.len, b.buf, b.fwd))))
        resp = b.op == Op.RESPONSE
        if resp.any():
            t.response_frame[s] = np.minimum(t.response_frame[s],
                                             first_per(b.seg[resp], b.frame[resp], b.k))
        shut = (b.op == Op.SHUTDOWN) & ((b.flags & ShutdownFlag.SEND) != 0)
        if shut.any():
            first = first_per(b.sd[shut], b.frame[shut], 2 * b.k).reshape(b.k, 2)
            t.shutdown_send_frame[s] = np.minimum(t.shutdown_send_frame[s], first)
        self._closing(b)

    def _closing(self, b: _Batch) -> None:
        """Note in ``closed`` the directions shut down and whether an RST came."""
        rst, shut = b.op == Op.RST, b.op == Op.SHUTDOWN
        ctl = np.flatnonzero(rst | shut)
        if not len(ctl):
            return
        flags, sender = b.flags[ctl], b.sender[ctl]
        own = np.where((flags & ShutdownFlag.SEND) != 0, 1 << sender, 0)
        peer = np.where((flags & ShutdownFlag.RCV) != 0, 1 << (1 - sender), 0)
        bits = np.where(rst[ctl], 4, np.where(shut[ctl], own | peer, 0)).astype(np.uint8)
        acc = np.zeros(b.k, dtype=np.uint8)
        np.bitwise_or.at(acc, b.seg[ctl], bits)
        self._t.closed[b.seg_slot] |= acc

    def _violations(self, b: _Batch, beyond: np.ndarray) -> None:
        t = self._t
        rw = b.rw
        masks = {
            Violation.BEFORE_RESPONSE: rw & t.start_seen[b.slot]
            & (b.frame < t.response_frame[b.slot]),
            Violation.AFTER_SHUTDOWN: rw & (b.frame > t.shutdown_send_frame[b.slot, b.sender]),
            Violation.TAP_LENGTH: (b.anom & Anomaly.PAYLOAD_LEN) != 0,
            Violation.BEYOND_CREDIT: beyond,
        }
        for kind, mask in masks.items():
            if mask.any():
                self._add_violation(b, VIOLATIONS.index(kind), mask)

    def _add_violation(self, b: _Batch, j: int, mask: np.ndarray) -> None:
        t, s, size = self._t, b.seg_slot, 2 * b.k
        keys, frames = b.sd[mask], b.frame[mask]
        t.violation_count[s, :, j] += np.bincount(keys, minlength=size).reshape(b.k, 2)
        first = first_per(keys, frames, size).reshape(b.k, 2)
        t.violation_first[s, :, j] = np.minimum(t.violation_first[s, :, j], first)
        last = last_per(keys, frames, size).reshape(b.k, 2)
        t.violation_last[s, :, j] = np.maximum(t.violation_last[s, :, j], last)

    # -- credit -----------------------------------------------------------------------------

    def _advertised(self, b: _Batch, side: int) -> tuple[np.ndarray, ...]:
        """What ``side`` advertised as receiver, as of each row: (known, fwd_max, buf_alloc).

        fwd_cnt is unwrapped from u32 by signed steps between consecutive advertisements and
        made monotonic (max so far), relative to the side's first advertisement.
        """
        t, s, seg = self._t, b.seg_slot, b.seg
        known0, fwd0, buf0 = t.credit_known[s, side], t.fwd_max[s, side], t.buf_alloc[s, side]
        p = np.flatnonzero(_CREDIT_OPS[b.op] & (b.sender == side))
        if not len(p):
            return known0[seg], fwd0[seg], buf0[seg]
        segp = seg[p]
        firstp_mask = np.empty(len(p), dtype=bool)
        firstp_mask[0] = True
        np.not_equal(segp[1:], segp[:-1], out=firstp_mask[1:])
        firstp = np.flatnonzero(firstp_mask)
        raw = b.fwd[p]
        carried_raw = np.where(known0, t.fwd_raw[s, side], -1)[segp]
        carried_raw = np.where(carried_raw < 0, raw, carried_raw)
        prev = seg_shift(raw, firstp_mask, carried_raw)
        delta = ((raw - prev + _HALF) & U32_MASK) - _HALF
        unw = t.fwd_unw[s, side][segp] + seg_cumsum(delta, firstp, np.cumsum(firstp_mask) - 1)
        fwd = np.maximum(seg_cummax(unw, segp), fwd0[segp])
        bufp = b.buf[p]
        lastp = np.r_[firstp[1:] - 1, len(p) - 1]
        segs = s[segp[lastp]]
        t.fwd_raw[segs, side] = raw[lastp]
        t.fwd_unw[segs, side] = unw[lastp]
        t.fwd_max[segs, side] = fwd[lastp]
        t.buf_alloc[segs, side] = bufp[lastp]
        t.credit_known[segs, side] = True
        # forward fill to every row of the segment
        idx = np.full(b.m, -1, dtype=np.int64)
        idx[p] = np.arange(len(p))
        last = np.maximum.accumulate(idx)
        ok = last >= 0
        ok[ok] = p[last[ok]] >= b.first[seg[ok]]
        li = np.where(ok, last, 0)
        return (ok | known0[seg], np.where(ok, fwd[li], fwd0[seg]),
                np.where(ok, bufp[li], buf0[seg]))

    def _credit(self, b: _Batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bytes in flight and the peer's buffer per direction after each row, and which
        rows were sent beyond credit; counts stalls on the way."""
        t, s, seg = self._t, b.seg_slot, b.seg
        # what was carried in, before this batch's advertisements update it
        known0, buf0, fwd0 = t.credit_known[s], t.buf_alloc[s], t.fwd_max[s]
        adv = [self._advertised(b, side) for side in (CLIENT, SERVER)]
        in_flight = np.full((b.m, 2), -1, dtype=np.int64)
        limit = np.full((b.m, 2), -1, dtype=np.int64)
        beyond = np.zeros(b.m, dtype=bool)
        for d in (CLIENT, SERVER):
            known, fwd, buf = adv[1 - d]
            sent_mask = b.rw & (b.sender == d)
            tx0 = t.tx_bytes[s, d]
            tx = tx0[seg] + seg_cumsum(np.where(sent_mask, b.len, 0), b.first, seg)
            c = tx - fwd
            q = np.flatnonzero(known)
            cmin0 = t.outstanding_floor[s, d]
            cm = np.full(b.m, NONE, dtype=np.int64)
            if len(q):
                cm[q] = np.minimum(-seg_cummax(-c[q], seg[q]), cmin0[seg[q]])
            flight = np.where(known, c - cm, 0)
            credit = buf - flight
            # credit before each row, for the beyond-credit check
            kb0 = known0[:, 1 - d]
            credit0 = buf0[:, 1 - d] - (tx0 - fwd0[:, 1 - d] - np.where(kb0, cmin0, 0))
            credit_before = seg_shift(credit, b.first_mask, credit0[seg])
            known_before = seg_shift(known, b.first_mask, kb0[seg])
            beyond |= sent_mask & known_before & (b.len > credit_before)
            in_flight[:, d] = np.where(known, flight, -1)
            limit[:, d] = np.where(known, buf, -1)
            self._stalls(b, d, no_credit(in_flight[:, d], limit[:, d]))
            last = b.last
            t.tx_bytes[s, d] = tx[last]
            t.outstanding_floor[s, d] = np.where(known[last], cm[last], cmin0)
            if len(q):
                t.max_in_flight[s, d] = np.maximum(
                    t.max_in_flight[s, d], last_per(seg[q], flight[q], b.k, -1))
                low = np.full(b.k, NONE, dtype=np.int64)
                np.minimum.at(low, seg[q], credit[q])
                t.min_credit[s, d] = np.minimum(t.min_credit[s, d], low)
        return in_flight, limit, beyond

    def _stalls(self, b: _Batch, d: int, zero: np.ndarray) -> None:
        """Runs of rows where sender ``d`` has no credit: count, durations, open run."""
        t, s = self._t, b.seg_slot
        prev = seg_shift(zero, b.first_mask, t.stalled[s, d][b.seg])
        tp = np.flatnonzero(zero != prev)
        if not len(tp):
            return
        seg_t = b.seg[tp]
        starts = zero[tp]
        k = b.k
        if starts.any():
            st_pos = tp[starts]
            t.stalls[s, d] += np.bincount(b.seg[st_pos], minlength=k)
            t.stall_first[s, d] = np.minimum(
                t.stall_first[s, d], first_per(b.seg[st_pos], b.frame[st_pos], k))
        same = np.r_[False, seg_t[1:] == seg_t[:-1]]
        prev_tp = np.r_[0, tp[:-1]]
        start_ts = np.where(same, b.ts[prev_tp], t.stall_ts[s, d][seg_t])
        start_frame = np.where(same, b.frame[prev_tp], t.stall_frame[s, d][seg_t])
        ends = ~starts
        if ends.any():
            dur, seg_e, sf = (b.ts[tp] - start_ts)[ends], seg_t[ends], start_frame[ends]
            total = np.zeros(k, dtype=np.int64)
            np.add.at(total, seg_e, dur)
            t.stall_total[s, d] += total
            self._longest(s[seg_e], d, dur, sf)
        last_t = np.r_[seg_t[1:] != seg_t[:-1], True]
        segs = s[seg_t[last_t]]
        t.stalled[segs, d] = starts[last_t]
        t.stall_ts[segs, d] = np.where(starts[last_t], b.ts[tp[last_t]], 0)
        t.stall_frame[segs, d] = np.where(starts[last_t], b.frame[tp[last_t]], 0)

    def _longest(self, sids: np.ndarray, d: int, dur: np.ndarray, frames: np.ndarray) -> None:
        """Keep the longest stall per stream (its duration and starting frame; the earliest
        of equals)."""
        t = self._t
        order = np.lexsort((-frames, dur, sids))
        sids, dur, frames = sids[order], dur[order], frames[order]
        top = np.r_[sids[1:] != sids[:-1], True]
        sids, dur, frames = sids[top], dur[top], frames[top]
        better = dur > t.stall_max[sids, d]
        t.stall_max[sids[better], d] = dur[better]
        t.stall_longest[sids[better], d] = frames[better]

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
        typ, lo, hi = _table_keys(cols)
        # their keys leave the dictionary, unless a newer stream holds the key
        current = self._current
        keys = list(zip(typ.tolist(), lo.tolist(), hi.tolist(), strict=True))
        held = np.fromiter(map(current.get, keys, repeat(-1)), dtype=np.int64, count=len(keys))
        deque(map(current.__delitem__, compress(keys, (held == cols["stream"]).tolist())),
              maxlen=0)
        ev = self._sorted_events()
        out = np.isin(ev["sid"], cols["stream"])
        self._spill.add(cols, {k: c[out] for k, c in ev.items()}, key_hash(typ, lo, hi))
        self._events = [tuple(c[~out] for c in ev.values())]
        t.keep(~done)

    def _unspill(self, keys: list[tuple[int, ...]]) -> list[int]:
        """The stream of each key among the spilled ones (-1: none), taken back into the
        working set: a late frame joins the key's latest stream, spilled or not."""
        out = [-1] * len(keys)
        packed = [i for i, k in enumerate(keys) if len(k) == 3]
        if not packed:
            return out
        arr = np.array([keys[i] for i in packed], dtype=np.uint64).reshape(-1, 3)
        found = self._spill.find(key_hash(arr[:, 0], arr[:, 1], arr[:, 2]))
        picks: list[tuple[int, int]] = []
        for i, cands in zip(packed, found, strict=True):
            best: tuple[int, int, int] | None = None
            for ci, r in cands:
                row = {n: self._spill.row(ci, r, n)[None] for n in ("type", "cid", "port",
                                                                    "stream")}
                if tuple(int(x[0]) for x in _table_keys(row)) == keys[i]:
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
        dead = set(gone.tolist())
        self._current = {k: s for k, s in self._current.items() if s not in dead}
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
    32 bits: the dictionary keys of :func:`_key_tuples`."""
    ends = (cols["cid"].astype(np.uint64) << np.uint64(32)) | cols["port"].astype(np.uint64)
    return (cols["type"].astype(np.uint64), ends.min(axis=1), ends.max(axis=1))


def _ascending(ev: dict[str, np.ndarray]) -> bool:
    """Whether events are already by stream, then frame."""
    sid, frame = ev["sid"], ev["frame"]
    if len(sid) < 2:
        return True
    step = np.diff(sid)
    return bool((step >= 0).all() and (np.diff(frame)[step == 0] > 0).all())
