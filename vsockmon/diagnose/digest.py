"""The per-packet facts the rules need and the tracker does not keep, gathered batch by batch.

First packet of each CID, addressing errors, zero-credit periods with their times, small
writes, each stream's first reset with the credit state then, data waiting unconsumed. Fed
beside the tracker; memory stays O(connections) plus the stalls long enough to matter.
No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from vsockmon.conntrack.model import NONE, no_credit, stall_end_ns
from vsockmon.conntrack.tracker import CLIENT, SERVER, Tags
from vsockmon.decode.frames import Anomaly, FrameBatch
from vsockmon.diagnose.columns import Counts, Resets, Times
from vsockmon.diagnose.model import Thresholds
from vsockmon.wire.protocol import VMADDR_CID_ANY, Op, ShutdownFlag

HOST_CID = 2
U32 = 1 << 32
_IMPOSSIBLE_PEERS = (0, 1, VMADDR_CID_ANY)
"""CIDs that never talk to another CID over a transport: the hypervisor (VMCI only), local
loopback (talks only to itself) and the bind-only wildcard."""


@dataclass
class Stall:
    """A period during which one sender had no credit left: its peer's window was full."""

    stream: int
    sender: int
    start_frame: int
    start_ns: int
    in_flight: int
    limit: int
    end_frame: int | None = None
    end_ns: int | None = None
    ended_by: int | None = None
    """The op of the peer's packet that gave credit back."""
    freed_by_fwd: bool = False
    """The credit came back because the peer's fwd_cnt advanced (not its buf_alloc)."""
    freed: int = 0
    """Bytes the packet that ended it showed consumed: in flight before it minus after."""
    unanswered: list[tuple[int, int, int | None]] = field(default_factory=list)
    """CREDIT_REQUESTs and the peer's first packet after each: (frame, time, reply time)."""

    def seconds(self, end_ns: int) -> float:
        return (stall_end_ns(self.end_ns, end_ns) - self.start_ns) / 1e9


@dataclass
class Count:
    count: int = 0
    frames: list[int] = field(default_factory=list)
    streams: set[int] = field(default_factory=set)
    first_ns: int = 0
    detail: tuple[int, ...] = ()

    def add(self, frame: int, ts: int, stream: int, detail: tuple[int, ...], keep: int) -> None:
        if not self.count:
            self.first_ns, self.detail = ts, detail
        self.count += 1
        self.streams.add(stream)
        if len(self.frames) < keep:
            self.frames.append(frame)


@dataclass
class Excess:
    """RW packets of one sender beyond its peer's credit."""

    count: int
    first_frame: int
    first_ns: int
    length: int
    """Payload of the first one."""
    credit: int
    """Credit the sender had left before the first one."""
    limit: int
    """The peer's buf_alloc then."""
    last_frame: int
    max_in_flight: int


EXAMPLE_FRAMES = 20
"""Frames kept as examples for findings that can span thousands (tap-length)."""


class Digest:
    """Per-packet facts for the rules, accumulated batch by batch beside the tracker.

    Fed each batch with the tracker's :class:`~vsockmon.conntrack.tracker.Tags` for it; memory stays
    O(connections) plus the stalls long enough to matter.
    """

    def __init__(self, thresholds: Thresholds) -> None:
        self.t = thresholds
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.cid_first: dict[int, tuple[int, int]] = {}
        """CID → (frame, time) of the first packet it sent."""
        self.bad_cids: dict[int, Count] = {}
        """stream → packets between CIDs that cannot talk to each other."""
        self.tap_length = Count()
        self.small_rw = Counts()
        """(stream, sender) → its RW packets shorter than ``small_rw_bytes``."""
        self.resets = Resets()
        """stream → its first RST, with the credit state of both directions then; kept only
        when the reset end's peer still had credit to send (what small-packet-reset reads):
        a storm's million refusals keep none."""
        self._rst_seen = np.zeros(0, dtype=bool)
        """By stream number: whether its first RST went by (one byte a stream)."""
        self.beyond: dict[tuple[int, int], Excess] = {}
        self.pending: dict[tuple[int, int], int] = {}
        """(stream, sender) → since when bytes it sent have been waiting unconsumed (no
        entry: nothing waits)."""
        self.stalls: list[Stall] = []
        """Finished stalls at least as long as the shortest threshold that reads them."""
        self.open_stalls: dict[tuple[int, int], Stall] = {}
        self.eof_read = Times()
        """(stream, sender) of a SEND-only SHUTDOWN → when its peer had consumed all it sent
        (reached its end of file); None while bytes still wait."""

    def feed(self, fb: FrameBatch, tags: Tags) -> None:
        n = len(fb)
        if not n:
            return
        lo, hi = int(fb.ts_ns.min()), int(fb.ts_ns.max())
        self.start_ns = lo if self.start_ns is None else min(self.start_ns, lo)
        self.end_ns = hi if self.end_ns is None else max(self.end_ns, hi)
        rows = np.flatnonzero(tags.stream >= 0)
        if not len(rows):
            return
        r = Rows(fb, tags, rows)
        self._cids(r)
        self._anomalies(r)
        self._small_writes(r)
        self._resets(r)
        self._beyond(r)
        for d in (CLIENT, SERVER):
            self._pending(r, d)
        self._stalls(r)
        self._eof_read(r)

    def _cids(self, r: Rows) -> None:
        cids, first = np.unique(r.src_cid, return_index=True)
        for cid, i in zip(cids.tolist(), first.tolist(), strict=True):
            self.cid_first.setdefault(cid, (int(r.frame[i]), int(r.ts[i])))
        differ = r.src_cid != r.dst_cid
        odd = np.isin(r.src_cid, _IMPOSSIBLE_PEERS) | np.isin(r.dst_cid, _IMPOSSIBLE_PEERS)
        odd |= (r.src_cid >= U32) | (r.dst_cid >= U32)
        no_host = (r.src_cid != HOST_CID) & (r.dst_cid != HOST_CID)
        for i in np.flatnonzero(differ & (no_host | odd)).tolist():
            count = self.bad_cids.setdefault(int(r.sid[i]), Count())
            count.add(int(r.frame[i]), int(r.ts[i]), int(r.sid[i]),
                      (int(r.src_cid[i]), int(r.dst_cid[i])), EXAMPLE_FRAMES)

    def _anomalies(self, r: Rows) -> None:
        bad = (r.anomalies & np.uint16(Anomaly.PAYLOAD_LEN)) != 0
        for i in np.flatnonzero(bad).tolist():
            self.tap_length.add(int(r.frame[i]), int(r.ts[i]), int(r.sid[i]),
                                (int(r.length[i]), int(r.captured[i])), EXAMPLE_FRAMES)

    def _small_writes(self, r: Rows) -> None:
        small = (r.op == Op.RW) & (r.length > 0) & (r.length < self.t.small_rw_bytes)
        keys, counts = np.unique(r.sid[small] * 2 + r.sender[small], return_counts=True)
        self.small_rw.add(keys, counts)

    def _resets(self, r: Rows) -> None:
        rst = np.flatnonzero(r.op == Op.RST)
        if not len(rst):
            return
        sids, at = np.unique(r.sid[rst], return_index=True)  # each stream's first here
        if int(sids[-1]) >= len(self._rst_seen):
            grown = np.zeros(max(2 * len(self._rst_seen), int(sids[-1]) + 1), dtype=bool)
            grown[: len(self._rst_seen)] = self._rst_seen
            self._rst_seen = grown
        first = ~self._rst_seen[sids]
        self._rst_seen[sids] = True
        rows = rst[at[first]]
        d = 1 - r.sender[rows]
        limit = r.limit[rows, d]
        credit = limit - r.in_flight[rows, d]
        kept = rows[(limit >= 0) & (credit > 0)]
        self.resets.add(r.sid[kept], r.frame[kept], r.ts[kept], r.sender[kept],
                        r.in_flight[kept], r.limit[kept])

    def _beyond(self, r: Rows) -> None:
        """RW packets that took the sender past its peer's advertised buffer (the tracker's
        beyond-credit rows)."""
        idx = np.arange(len(r.sid))
        flight = r.in_flight[idx, r.sender]
        limit = r.limit[idx, r.sender]
        for i in np.flatnonzero(r.beyond).tolist():
            key = (int(r.sid[i]), int(r.sender[i]))
            e = self.beyond.get(key)
            if e is None:
                credit = int(limit[i] - flight[i] + r.length[i])
                self.beyond[key] = Excess(1, int(r.frame[i]), int(r.ts[i]), int(r.length[i]),
                                           credit, int(limit[i]), int(r.frame[i]),
                                           int(flight[i]))
            else:
                e.count += 1
                e.max_in_flight = max(e.max_in_flight, int(flight[i]))
                e.last_frame = int(r.frame[i])

    def _pending(self, r: Rows, d: int) -> None:
        """Since when sender ``d``'s bytes have been waiting unconsumed, per stream."""
        mine = np.flatnonzero(r.limit[:, d] >= 0)
        if not len(mine):
            return
        sid, ts = r.sid[mine], r.ts[mine]
        waiting = r.in_flight[mine, d] > 0
        order = np.argsort(sid, kind="stable")
        sid, ts, waiting = sid[order], ts[order], waiting[order]
        starts = np.flatnonzero(np.r_[True, sid[1:] != sid[:-1]])
        ends = np.r_[starts[1:] - 1, len(sid) - 1]
        last_idle = np.maximum.reduceat(np.where(waiting, -1, np.arange(len(sid))), starts)
        for s, a, b, idle in zip(sid[starts].tolist(), starts.tolist(), ends.tolist(),
                                 last_idle.tolist(), strict=True):
            key = (s, d)
            if not waiting[b]:  # nothing waits: no entry (a storm's million conns keep none)
                self.pending.pop(key, None)
            elif idle >= a:
                self.pending[key] = int(ts[idle + 1])
            elif self.pending.get(key) is None:
                self.pending[key] = int(ts[a])

    def _stalls(self, r: Rows) -> None:
        """Follow zero-credit periods packet by packet, only on the streams that have one."""
        zero = no_credit(r.in_flight, r.limit)
        busy = {s for s, _ in self.open_stalls}
        busy.update(np.unique(r.sid[zero.any(axis=1)]).tolist())
        if not busy:
            return
        for i in np.flatnonzero(np.isin(r.sid, list(busy))).tolist():
            for d in (CLIENT, SERVER):
                self._stall_step(r, i, d, bool(zero[i, d]))

    def _stall_step(self, r: Rows, i: int, d: int, zero: bool) -> None:
        key = (int(r.sid[i]), d)
        st = self.open_stalls.get(key)
        frame, ts, op, sender = int(r.frame[i]), int(r.ts[i]), int(r.op[i]), int(r.sender[i])
        if st is None:
            if zero:
                self.open_stalls[key] = Stall(key[0], d, frame, ts, int(r.in_flight[i, d]),
                                              int(r.limit[i, d]))
            return
        if zero:
            if sender == d and op == Op.CREDIT_REQUEST:
                st.unanswered.append((frame, ts, None))
            elif sender != d:
                st.unanswered = [(f, t, reply if reply is not None else ts)
                                 for f, t, reply in st.unanswered]
            return
        st.end_frame, st.end_ns, st.ended_by = frame, ts, op
        st.freed_by_fwd = int(r.limit[i, d]) <= st.limit
        st.freed = st.in_flight - int(r.in_flight[i, d])
        st.unanswered = [(f, t, reply if reply is not None else ts)
                         for f, t, reply in st.unanswered]  # the credit is an answer too
        del self.open_stalls[key]
        if st.seconds(ts) >= min(self.t.stall_s, self.t.credit_reply_s):
            self.stalls.append(st)

    def _eof_read(self, r: Rows) -> None:
        """When the peer of each half-closing sender had consumed everything it sent: at the
        SHUTDOWN itself when nothing waits (the usual case, vectorised), else at the first
        later packet of that stream that shows the bytes consumed (credit unknown counts as
        consumed: nothing tells otherwise)."""
        idx = np.arange(len(r.sid))
        half = np.flatnonzero((r.op == Op.SHUTDOWN) & (r.flags == ShutdownFlag.SEND))
        flight = r.in_flight[idx, r.sender]
        keys, first = np.unique(r.sid[half] * 2 + r.sender[half], return_index=True)
        new = self.eof_read.new(keys)
        at = half[first[new]]  # each new sender's first SHUTDOWN in the batch
        self.eof_read.add(keys[new], np.where(flight[at] <= 0, r.ts[at], NONE))
        since = dict(zip(keys[new].tolist(), (at + 1).tolist(), strict=True))  # rows after
        waiting = set(self.eof_read.unknown().tolist())
        if not waiting:
            return
        for i in np.flatnonzero(np.isin(r.sid, [k // 2 for k in waiting])).tolist():
            for d in (CLIENT, SERVER):
                key = int(r.sid[i]) * 2 + d
                if key in waiting and i >= since.get(key, 0) and r.in_flight[i, d] <= 0:
                    self.eof_read.learn(key, int(r.ts[i]))
                    waiting.discard(key)

    def forget(self, streams: set[int]) -> None:
        """Drop what is kept per connection for ``streams`` (the tracker forgot them): a live
        view's memory follows the open connections. Capture-wide facts stay."""
        for sid in streams & self.bad_cids.keys():
            del self.bad_cids[sid]
        self.resets.drop(streams)
        self.small_rw.drop(streams)
        self.eof_read.drop(streams)
        for keyed in (self.beyond, self.pending, self.open_stalls):
            for key in [k for k in keyed if k[0] in streams]:
                del keyed[key]
        self.stalls = [st for st in self.stalls if st.stream not in streams]

    def all_stalls(self) -> Iterator[Stall]:
        yield from self.stalls
        yield from self.open_stalls.values()


class Rows:
    """The columns of one batch's rows that belong to a stream, for the digest."""

    def __init__(self, fb: FrameBatch, tags: Tags, rows: np.ndarray) -> None:
        v = fb.virtio[rows]
        self.frame = rows + fb.first
        self.ts = fb.ts_ns[rows]
        self.sid = tags.stream[rows]
        self.sender = tags.sender[rows].astype(np.int64)
        self.in_flight = tags.in_flight[rows]
        self.limit = tags.limit[rows]
        self.beyond = tags.beyond[rows]
        self.op = v["op"].astype(np.int64)
        self.flags = v["flags"]
        self.length = v["len"].astype(np.int64)
        self.src_cid = v["src_cid"]
        self.dst_cid = v["dst_cid"]
        self.anomalies = fb.anomalies[rows]
        self.captured = fb.payload_len[rows]
