"""Connection tracking for virtio-vsock: streams, ends, closes and flow credit, in bulk.

A :class:`ConnTracker` is fed :class:`~vsockmon.decode.frames.FrameBatch` columns and follows every
connection through REQUEST → RESPONSE (or RST) → data → SHUTDOWN → RST. It never builds a
Python object per packet: each batch is grouped by connection with numpy (one sort), and
counters, first/last frames, violations and the credit arithmetic are segmented cumulative
sums, maxima and forward fills over those groups. Python runs once per connection per batch
(the stream table) and once per control packet at the very end (the event list), so a
capture of a million packets costs about what decoding it costs. No I/O here.

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
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, NamedTuple

import numpy as np

from vsockmon.decode.frames import Anomaly, FrameBatch
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType, enum_name

CLIENT, SERVER = 0, 1
"""Side indexes: the client is the end that sent the REQUEST (or is guessed to have)."""
ROLES = ("client", "server")

NONE = np.iinfo(np.int64).max
"""Sentinel of an unset 'first frame' column (minimum updates leave it alone)."""


class Close(StrEnum):
    """How a connection ended (or had not yet, when the capture stopped)."""

    GRACEFUL = "graceful"
    """Both directions were shut down (SHUTDOWN flags), then an RST ended the connection."""
    HALF_CLOSED = "half-closed"
    """Only one direction was shut down when the capture ended; no RST."""
    CLOSING = "closing"
    """Both directions shut down, but the capture ended before the final RST."""
    RESET_BY_CLIENT = "reset-by-client"
    """An RST from the client without a prior shutdown of both directions."""
    RESET_BY_SERVER = "reset-by-server"
    """An RST from the server without a prior shutdown of both directions."""
    REFUSED = "refused"
    """The server answered the REQUEST with an RST: nothing listens there."""
    UNANSWERED = "unanswered"
    """A REQUEST with neither RESPONSE nor RST before the capture ended."""
    OPEN = "open"
    """Still open when the capture ended: no SHUTDOWN, no RST."""


class Violation(StrEnum):
    """A protocol rule broken by the packets one end sent."""

    BEYOND_CREDIT = "beyond-credit"
    """An RW carrying more bytes than the peer's advertised free space."""
    AFTER_SHUTDOWN = "after-shutdown"
    """An RW after the same end sent SHUTDOWN with the SEND flag."""
    BEFORE_RESPONSE = "before-response"
    """An RW on a REQUEST-started connection before the RESPONSE."""
    TAP_LENGTH = "tap-length"
    """A frame whose captured payload length differs from the header's ``len`` (tap bug)."""


_VIOLATIONS = tuple(Violation)


class Event(NamedTuple):
    """One control packet of a connection: REQUEST, RESPONSE, SHUTDOWN, RST, CREDIT_REQUEST,
    or an op the protocol does not define. RW and CREDIT_UPDATE are counted, not listed."""

    frame: int
    ts_ns: int
    op: int
    sender: int
    """:data:`CLIENT` or :data:`SERVER`."""
    flags: int
    length: int
    buf_alloc: int
    fwd_cnt: int

    @property
    def op_name(self) -> str:
        return enum_name(Op, self.op)

    @property
    def sender_role(self) -> str:
        return ROLES[self.sender]


@dataclass(frozen=True, slots=True)
class Evidence:
    """How often a violation happened on one side, and where first and last."""

    count: int
    first_frame: int
    last_frame: int


@dataclass(frozen=True, slots=True)
class Stalls:
    """Zero-credit stalls of one sender: times its peer's free space was used up.

    A stall starts at the packet that leaves the sender no credit and ends at the peer's
    packet (CREDIT_UPDATE, RW, …) that gives some back. One still running when the connection's
    last packet was captured counts up to that packet and sets :attr:`open`.
    """

    count: int = 0
    total_ns: int = 0
    max_ns: int = 0
    first_frame: int | None = None
    """Frame that started the first stall."""
    longest_frame: int | None = None
    """Frame that started the longest stall."""
    open: bool = False


@dataclass(slots=True)
class Side:
    """One end of a connection, and what it sent (its direction: client→server for the
    client). Credit figures describe this end as a sender, limited by its peer's buffer."""

    role: str
    cid: int
    port: int
    packets: int = 0
    rw_packets: int = 0
    bytes: int = 0
    """Payload bytes sent: the sum of the virtio ``len`` of its RW packets."""
    messages: int | None = None
    """SEQPACKET only: messages sent (RW packets with EOM)."""
    records: int | None = None
    """SEQPACKET only: messages sent with EOR."""
    credit_updates: int = 0
    credit_requests: int = 0
    buf_alloc: int | None = None
    """The receive buffer this end advertised last (None: no credit-bearing packet)."""
    fwd_cnt: int | None = None
    """The highest fwd_cnt this end advertised (u32, as on the wire)."""
    first_rw_frame: int | None = None
    last_rw_frame: int | None = None
    shutdown_flags: int = 0
    """Union of the SHUTDOWN flags this end sent (RCV=1, SEND=2)."""
    shutdown_frame: int | None = None
    rst_frame: int | None = None
    rst_count: int = 0
    max_in_flight: int | None = None
    """Most bytes sent and not yet consumed by the peer (None: peer's credit never seen)."""
    min_credit: int | None = None
    """Least free space the peer had left for this sender (negative: credit exceeded)."""
    stalls: Stalls = field(default_factory=Stalls)
    violations: dict[Violation, Evidence] = field(default_factory=dict)

    @property
    def addr(self) -> str:
        return f"{self.cid}:{self.port}"


@dataclass(slots=True)
class Connection:
    """One stream: a virtio-vsock connection from its first to its last captured frame."""

    stream: int
    type: int
    client: Side
    server: Side
    start_seen: bool
    """True when the REQUEST was captured. False: the capture began mid-connection and the
    roles are guessed from the first frame: a RESPONSE's sender is the server; otherwise the
    end with the lower port is (services listen on small fixed ports, Linux binds clients to
    random ports above 1024); equal ports: the sender is the client."""
    first_frame: int
    last_frame: int
    first_ts_ns: int
    last_ts_ns: int
    request_frame: int | None = None
    response_frame: int | None = None
    handshake_ns: int | None = None
    """REQUEST to its answer (RESPONSE, or the refusing RST)."""
    close: Close = Close.OPEN
    close_frame: int | None = None
    """The frame that closed it: the first RST, or the last SHUTDOWN when no RST came."""
    close_by: str | None = None
    """Role of the end that sent :attr:`close_frame`."""
    events: tuple[Event, ...] = ()

    @property
    def type_name(self) -> str:
        return enum_name(SockType, self.type)

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.client, self.server

    @property
    def packets(self) -> int:
        return self.client.packets + self.server.packets

    @property
    def bytes(self) -> int:
        return self.client.bytes + self.server.bytes

    @property
    def duration_ns(self) -> int:
        return self.last_ts_ns - self.first_ts_ns


class Tags(NamedTuple):
    """Per-row results of :meth:`ConnTracker.feed`, in the batch's row order.

    ``in_flight[:, s]`` is what side ``s`` has sent and its peer not yet consumed, after the
    row; ``limit[:, s]`` is the peer's buffer size for that direction; both are -1 while the
    peer's credit is unknown (and on rows without a stream). Free credit = limit - in_flight.
    """

    stream: np.ndarray
    sender: np.ndarray
    in_flight: np.ndarray
    limit: np.ndarray


# Lookup tables indexed by the u16 op.
_EVENT_OPS = np.ones(65536, dtype=bool)
_EVENT_OPS[[Op.RW, Op.CREDIT_UPDATE]] = False
_CREDIT_OPS = np.zeros(65536, dtype=bool)
_CREDIT_OPS[[Op.REQUEST, Op.RESPONSE, Op.SHUTDOWN, Op.RW, Op.CREDIT_UPDATE,
             Op.CREDIT_REQUEST]] = True

_HALF = 1 << 31
_U32 = (1 << 32) - 1


class _Table:
    """Per-stream state as growable numpy columns (struct of arrays): memory O(streams)."""

    # name: (per-side?, dtype, initial value)
    SPEC: ClassVar[dict[str, tuple[bool, str, int]]] = {
        "type": (False, "u2", 0),
        "client_lo": (False, "?", False),
        "start_seen": (False, "?", False),
        "cid": (True, "u8", 0),
        "port": (True, "u4", 0),
        "first_frame": (False, "i8", 0),
        "last_frame": (False, "i8", 0),
        "first_ts": (False, "i8", 0),
        "last_ts": (False, "i8", 0),
        "response_frame": (False, "i8", NONE),
        "packets": (True, "i8", 0),
        "rw": (True, "i8", 0),
        "tx": (True, "i8", 0),
        "eom": (True, "i8", 0),
        "eor": (True, "i8", 0),
        "cu": (True, "i8", 0),
        "cr": (True, "i8", 0),
        "first_rw": (True, "i8", NONE),
        "last_rw": (True, "i8", 0),
        "shut_send": (True, "i8", NONE),
        # credit advertised by each side (as receiver)
        "known": (True, "?", False),
        "fwd_raw": (True, "i8", 0),
        "fwd_unw": (True, "i8", 0),
        "fwd_max": (True, "i8", 0),
        "buf": (True, "i8", 0),
        # credit of each side as sender
        "cmin": (True, "i8", NONE),
        "max_flight": (True, "i8", -1),
        "min_credit": (True, "i8", NONE),
        "stalled": (True, "?", False),
        "stall_ts": (True, "i8", 0),
        "stall_frame": (True, "i8", 0),
        "stalls": (True, "i8", 0),
        "stall_total": (True, "i8", 0),
        "stall_max": (True, "i8", -1),
        "stall_first": (True, "i8", NONE),
        "stall_longest": (True, "i8", 0),
    }

    def __init__(self) -> None:
        self.size = 0
        self.capacity = 0
        self.viol_count = np.zeros((0, 2, len(_VIOLATIONS)), dtype=np.int64)
        self.viol_first = np.zeros((0, 2, len(_VIOLATIONS)), dtype=np.int64)
        self.viol_last = np.zeros((0, 2, len(_VIOLATIONS)), dtype=np.int64)
        for name, (sided, dtype, init) in self.SPEC.items():
            setattr(self, name, np.full((0, 2) if sided else 0, init, dtype=dtype))

    def grow(self, size: int) -> None:
        if size > self.capacity:
            cap = max(size, 2 * self.capacity, 1024)
            for name, (sided, dtype, init) in self.SPEC.items():
                self._resize(name, (cap, 2) if sided else (cap,), dtype, init)
            for name, init in (("viol_count", 0), ("viol_first", NONE), ("viol_last", 0)):
                self._resize(name, (cap, 2, len(_VIOLATIONS)), "i8", init)
            self.capacity = cap
        self.size = size

    def _resize(self, name: str, shape: tuple[int, ...], dtype: str, init: int) -> None:
        old = getattr(self, name)
        new = np.full(shape, init, dtype=dtype)
        new[: len(old)] = old
        setattr(self, name, new)


# -- segmented operations over rows sorted by segment ---------------------------------------


def _seg_cumsum(x: np.ndarray, first: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarting at each segment (``first`` = start positions)."""
    cs = np.cumsum(x)
    base = cs[first] - x[first]
    return cs - base[seg]


def _seg_cummax(x: np.ndarray, seg: np.ndarray) -> np.ndarray:
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


def _seg_shift(x: np.ndarray, first_mask: np.ndarray, carried: np.ndarray) -> np.ndarray:
    """The previous row's value within the segment; ``carried`` at segment starts."""
    prev = np.empty_like(x)
    prev[1:] = x[:-1]
    prev[first_mask] = carried[first_mask]
    return prev


def _first_per(keys: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """Minimum of ``values`` per key in ``range(size)`` (NONE where a key has none)."""
    out = np.full(size, NONE, dtype=np.int64)
    np.minimum.at(out, keys, values)
    return out


def _last_per(keys: np.ndarray, values: np.ndarray, size: int, init: int = 0) -> np.ndarray:
    """Maximum of ``values`` per key in ``range(size)`` (``init`` where a key has none)."""
    out = np.full(size, init, dtype=np.int64)
    np.maximum.at(out, keys, values)
    return out


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
    """The rows of one batch that carry a virtio header, sorted by stream (then frame)."""

    def __init__(self, fb: FrameBatch, rows: np.ndarray, order: np.ndarray,
                 v: np.ndarray, src_lo: np.ndarray) -> None:
        self.rows = rows[order]
        self.m = len(order)
        v = v[order]
        self.op = v["op"].astype(np.int64)
        self.len = v["len"].astype(np.int64)
        self.flags = v["flags"].astype(np.int64)
        self.buf = v["buf_alloc"].astype(np.int64)
        self.fwd = v["fwd_cnt"].astype(np.int64)
        self.type = v["type"]
        self.src_port = v["src_port"]
        self.dst_port = v["dst_port"]
        self.src_lo = src_lo[order]
        self.looped = (v["src_cid"] == v["dst_cid"]) & (self.src_port == self.dst_port)
        self.frame = self.rows + fb.first
        self.ts = fb.ts_ns[self.rows]
        self.anom = fb.anomalies[self.rows]
        self.v = v

    def set_streams(self, sid: np.ndarray) -> None:
        self.sid = sid
        first = np.empty(self.m, dtype=bool)
        first[0] = True
        np.not_equal(sid[1:], sid[:-1], out=first[1:])
        self.first_mask = first
        self.first = np.flatnonzero(first)
        self.last = np.r_[self.first[1:] - 1, self.m - 1]
        self.seg = np.cumsum(first) - 1
        self.k = len(self.first)
        self.seg_sid = sid[self.first]


class ConnTracker:
    """Follows every connection of a capture; feed it batches in order, then :meth:`finish`.

    Memory is O(connections + control packets): nothing is kept per RW or CREDIT_UPDATE.
    """

    def __init__(self) -> None:
        self._t = _Table()
        self._current: dict[tuple[int, ...], int] = {}
        self._events: list[tuple[np.ndarray, ...]] = []
        self.frames = 0
        self.frames_without_stream = 0

    @property
    def streams(self) -> int:
        return self._t.size

    # -- feeding ----------------------------------------------------------------------------

    def feed(self, fb: FrameBatch) -> Tags:
        """Track the frames of one batch; returns each row's stream, sender and credit."""
        n = len(fb)
        tags = Tags(np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int8),
                    np.full((n, 2), -1, dtype=np.int64), np.full((n, 2), -1, dtype=np.int64))
        rows = np.flatnonzero(fb.has_virtio)
        self.frames += n
        self.frames_without_stream += n - len(rows)
        if not len(rows):
            return tags
        b = self._group(fb, rows)
        t = self._t
        # a frame addressed to its own sender (both ends equal) counts as the client's
        b.sender = ((b.src_lo != t.client_lo[b.sid]) & ~b.looped).astype(np.int64)
        b.sd = b.seg * 2 + b.sender
        self._count(b)
        self._control(b)
        in_flight, limit = self._credit(b)
        self._violations(b)
        tags.stream[b.rows] = b.sid
        tags.sender[b.rows] = b.sender
        tags.in_flight[b.rows] = in_flight
        tags.limit[b.rows] = limit
        return tags

    def _group(self, fb: FrameBatch, rows: np.ndarray) -> _Batch:
        """Sort the rows by connection key and give each row its stream (new ones numbered
        in order of their first frame)."""
        v = fb.virtio[rows]
        keys, src_lo = _keys(v)
        order = np.lexsort(keys[::-1])  # stable: rows of one key stay in frame order
        b = _Batch(fb, rows, order, v, src_lo)
        m = b.m
        skeys = [k[order] for k in keys]
        change = np.zeros(m, dtype=bool)
        change[0] = True
        for k in skeys:
            change[1:] |= k[1:] != k[:-1]
        gpos = np.flatnonzero(change)
        gend = np.r_[gpos[1:] - 1, m - 1]
        key_list = _key_tuples([k[gpos] for k in skeys])
        current = self._current
        cur = np.fromiter((current.get(k, -1) for k in key_list), dtype=np.int64,
                          count=len(key_list))

        start = b.op == Op.REQUEST
        start[gpos] |= cur < 0
        spos = np.flatnonzero(start)
        by_frame = spos[np.argsort(b.rows[spos], kind="stable")]
        first_new = self._t.size
        val = np.full(m, -1, dtype=np.int64)
        val[gpos] = cur
        val[by_frame] = np.arange(first_new, first_new + len(by_frame))
        last = np.maximum.accumulate(np.where(val >= 0, np.arange(m), 0))
        sid = val[last]
        for k, s in zip(key_list, sid[gend].tolist(), strict=True):
            current[k] = s
        self._new_streams(b, by_frame)
        b.set_streams(sid)
        return b

    def _new_streams(self, b: _Batch, pos: np.ndarray) -> None:
        """Open a stream at each of the sorted positions ``pos`` (already in id order)."""
        if not len(pos):
            return
        t = self._t
        a = t.size
        t.grow(a + len(pos))
        ids = slice(a, a + len(pos))
        op = b.op[pos]
        sport, dport = b.src_port[pos], b.dst_port[pos]
        client_is_src = (op == Op.REQUEST) | ((op != Op.RESPONSE) & (sport >= dport))
        src_lo = b.src_lo[pos]
        t.client_lo[ids] = client_is_src == src_lo
        t.start_seen[ids] = op == Op.REQUEST
        t.type[ids] = b.type[pos]
        v = b.v[pos]
        for side, is_client in ((CLIENT, client_is_src), (SERVER, ~client_is_src)):
            t.cid[ids, side] = np.where(is_client, v["src_cid"], v["dst_cid"])
            t.port[ids, side] = np.where(is_client, v["src_port"], v["dst_port"])
        t.first_frame[ids] = b.frame[pos]
        t.first_ts[ids] = b.ts[pos]

    def _per_side(self, b: _Batch, mask: np.ndarray | None = None) -> np.ndarray:
        """Rows counted per (segment, sender): a (k, 2) array."""
        keys = b.sd if mask is None else b.sd[mask]
        return np.bincount(keys, minlength=2 * b.k).reshape(b.k, 2)

    def _count(self, b: _Batch) -> None:
        t, s = self._t, b.seg_sid
        t.last_frame[s] = b.frame[b.last]
        t.last_ts[s] = b.ts[b.last]
        rw = b.op == Op.RW
        b.rw = rw
        t.packets[s] += self._per_side(b)
        t.rw[s] += self._per_side(b, rw)
        seq_rw = rw & (b.type == SockType.SEQPACKET)
        t.eom[s] += self._per_side(b, seq_rw & ((b.flags & SeqFlag.EOM) != 0))
        t.eor[s] += self._per_side(b, seq_rw & ((b.flags & SeqFlag.EOR) != 0))
        t.cu[s] += self._per_side(b, b.op == Op.CREDIT_UPDATE)
        t.cr[s] += self._per_side(b, b.op == Op.CREDIT_REQUEST)
        if rw.any():
            size = 2 * b.k
            first = _first_per(b.sd[rw], b.frame[rw], size).reshape(b.k, 2)
            last = _last_per(b.sd[rw], b.frame[rw], size).reshape(b.k, 2)
            t.first_rw[s] = np.minimum(t.first_rw[s], first)
            t.last_rw[s] = np.maximum(t.last_rw[s], last)

    def _control(self, b: _Batch) -> None:
        """Keep the control packets as events; note the frames the violation checks need."""
        t, s = self._t, b.seg_sid
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
                                             _first_per(b.seg[resp], b.frame[resp], b.k))
        shut = (b.op == Op.SHUTDOWN) & ((b.flags & ShutdownFlag.SEND) != 0)
        if shut.any():
            first = _first_per(b.sd[shut], b.frame[shut], 2 * b.k).reshape(b.k, 2)
            t.shut_send[s] = np.minimum(t.shut_send[s], first)

    def _violations(self, b: _Batch) -> None:
        t = self._t
        rw = b.rw
        masks = {
            Violation.BEFORE_RESPONSE: rw & t.start_seen[b.sid]
            & (b.frame < t.response_frame[b.sid]),
            Violation.AFTER_SHUTDOWN: rw & (b.frame > t.shut_send[b.sid, b.sender]),
            Violation.TAP_LENGTH: (b.anom & Anomaly.PAYLOAD_LEN) != 0,
            Violation.BEYOND_CREDIT: b.beyond,
        }
        for kind, mask in masks.items():
            if mask.any():
                self._add_violation(b, _VIOLATIONS.index(kind), mask)

    def _add_violation(self, b: _Batch, j: int, mask: np.ndarray) -> None:
        t, s, size = self._t, b.seg_sid, 2 * b.k
        keys, frames = b.sd[mask], b.frame[mask]
        t.viol_count[s, :, j] += np.bincount(keys, minlength=size).reshape(b.k, 2)
        first = _first_per(keys, frames, size).reshape(b.k, 2)
        t.viol_first[s, :, j] = np.minimum(t.viol_first[s, :, j], first)
        last = _last_per(keys, frames, size).reshape(b.k, 2)
        t.viol_last[s, :, j] = np.maximum(t.viol_last[s, :, j], last)

    # -- credit -----------------------------------------------------------------------------

    def _advertised(self, b: _Batch, side: int) -> tuple[np.ndarray, ...]:
        """What ``side`` advertised as receiver, as of each row: (known, fwd_max, buf_alloc).

        fwd_cnt is unwrapped from u32 by signed steps between consecutive advertisements and
        made monotonic (max so far), relative to the side's first advertisement.
        """
        t, s, seg = self._t, b.seg_sid, b.seg
        known0, fwd0, buf0 = t.known[s, side], t.fwd_max[s, side], t.buf[s, side]
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
        prev = _seg_shift(raw, firstp_mask, carried_raw)
        delta = ((raw - prev + _HALF) & _U32) - _HALF
        unw = t.fwd_unw[s, side][segp] + _seg_cumsum(delta, firstp, np.cumsum(firstp_mask) - 1)
        fwd = np.maximum(_seg_cummax(unw, segp), fwd0[segp])
        bufp = b.buf[p]
        lastp = np.r_[firstp[1:] - 1, len(p) - 1]
        segs = s[segp[lastp]]
        t.fwd_raw[segs, side] = raw[lastp]
        t.fwd_unw[segs, side] = unw[lastp]
        t.fwd_max[segs, side] = fwd[lastp]
        t.buf[segs, side] = bufp[lastp]
        t.known[segs, side] = True
        # forward fill to every row of the segment
        idx = np.full(b.m, -1, dtype=np.int64)
        idx[p] = np.arange(len(p))
        last = np.maximum.accumulate(idx)
        ok = last >= 0
        ok[ok] = p[last[ok]] >= b.first[seg[ok]]
        li = np.where(ok, last, 0)
        return (ok | known0[seg], np.where(ok, fwd[li], fwd0[seg]),
                np.where(ok, bufp[li], buf0[seg]))

    def _credit(self, b: _Batch) -> tuple[np.ndarray, np.ndarray]:
        """Bytes in flight and free credit per direction; stalls and beyond-credit sends."""
        t, s, seg = self._t, b.seg_sid, b.seg
        # what was carried in, before this batch's advertisements update it
        known0, buf0, fwd0 = t.known[s], t.buf[s], t.fwd_max[s]
        adv = [self._advertised(b, side) for side in (CLIENT, SERVER)]
        in_flight = np.full((b.m, 2), -1, dtype=np.int64)
        limit = np.full((b.m, 2), -1, dtype=np.int64)
        b.beyond = np.zeros(b.m, dtype=bool)
        for d in (CLIENT, SERVER):
            known, fwd, buf = adv[1 - d]
            sent_mask = b.rw & (b.sender == d)
            tx0 = t.tx[s, d]
            tx = tx0[seg] + _seg_cumsum(np.where(sent_mask, b.len, 0), b.first, seg)
            c = tx - fwd
            q = np.flatnonzero(known)
            cmin0 = t.cmin[s, d]
            cm = np.full(b.m, NONE, dtype=np.int64)
            if len(q):
                cm[q] = np.minimum(-_seg_cummax(-c[q], seg[q]), cmin0[seg[q]])
            flight = np.where(known, c - cm, 0)
            credit = buf - flight
            # credit before each row, for the beyond-credit check
            kb0 = known0[:, 1 - d]
            credit0 = buf0[:, 1 - d] - (tx0 - fwd0[:, 1 - d] - np.where(kb0, cmin0, 0))
            credit_before = _seg_shift(credit, b.first_mask, credit0[seg])
            known_before = _seg_shift(known, b.first_mask, kb0[seg])
            b.beyond |= sent_mask & known_before & (b.len > credit_before)
            self._stalls(b, d, known & (credit <= 0))
            last = b.last
            t.tx[s, d] = tx[last]
            t.cmin[s, d] = np.where(known[last], cm[last], cmin0)
            if len(q):
                t.max_flight[s, d] = np.maximum(
                    t.max_flight[s, d], _last_per(seg[q], flight[q], b.k, -1))
                low = np.full(b.k, NONE, dtype=np.int64)
                np.minimum.at(low, seg[q], credit[q])
                t.min_credit[s, d] = np.minimum(t.min_credit[s, d], low)
            in_flight[:, d] = np.where(known, flight, -1)
            limit[:, d] = np.where(known, buf, -1)
        return in_flight, limit

    def _stalls(self, b: _Batch, d: int, zero: np.ndarray) -> None:
        """Runs of rows where sender ``d`` has no credit: count, durations, open run."""
        t, s = self._t, b.seg_sid
        prev = _seg_shift(zero, b.first_mask, t.stalled[s, d][b.seg])
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
                t.stall_first[s, d], _first_per(b.seg[st_pos], b.frame[st_pos], k))
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

    # -- results ----------------------------------------------------------------------------

    def finish(self) -> ConnTable:
        """Every connection, by stream number, closed off as the capture ended."""
        t = self._t
        n = t.size
        cols = {name: getattr(t, name)[:n] for name in _Table.SPEC}
        for name in ("viol_count", "viol_first", "viol_last"):
            cols[name] = getattr(t, name)[:n]
        names = ("sid", "frame", "ts", "op", "sender", "flags", "len", "buf", "fwd")
        if self._events:
            ev = {k: np.concatenate(c) for k, c in zip(names, zip(*self._events, strict=True),
                                                         strict=True)}
            order = np.lexsort((ev["frame"], ev["sid"]))
            ev = {k: c[order] for k, c in ev.items()}
            self._events = [tuple(ev.values())]  # one sorted copy, not two
        else:
            ev = {k: np.zeros(0, dtype=np.int64) for k in names}
        _end_stalls(cols)
        _closes(cols, ev, n)
        return ConnTable(cols, ev)


def _end_stalls(c: dict[str, np.ndarray]) -> None:
    """A stall still running at the connection's last packet lasts until that packet."""
    open_ = c["stalled"]
    dur = np.where(open_, c["last_ts"][:, None] - c["stall_ts"], 0)
    c["stall_total"] = c["stall_total"] + dur
    longer = open_ & (dur > c["stall_max"])
    c["stall_max"] = np.where(longer, dur, np.maximum(c["stall_max"], 0))
    c["stall_longest"] = np.where(longer, c["stall_frame"], c["stall_longest"])


def _closes(c: dict[str, np.ndarray], ev: dict[str, np.ndarray], n: int) -> None:
    """Handshake, shutdown, reset and close columns from the control events (sorted by
    stream, then frame)."""
    sid, frame, ts, op, sender, flags = (ev[k] for k in
                                         ("sid", "frame", "ts", "op", "sender", "flags"))
    side_key = sid * 2 + sender

    def first(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per stream: index of its first event matching ``mask`` (or -1), and whether."""
        pos = np.flatnonzero(mask)
        idx = np.full(n, -1, dtype=np.int64)
        streams, at = np.unique(sid[pos], return_index=True)
        idx[streams] = pos[at]
        return idx, idx >= 0

    def pick(col: np.ndarray, idx: np.ndarray, unset: int = NONE) -> np.ndarray:
        return np.where(idx >= 0, col[idx], unset) if len(col) else np.full(n, unset)

    req, has_req = first(op == Op.REQUEST)
    rst, has_rst = first(op == Op.RST)
    rst_frame = pick(frame, rst)
    resp, has_resp = first(op == Op.RESPONSE)
    c["request_frame"], c["response_frame"] = pick(frame, req), pick(frame, resp)
    resp_first = has_resp & (pick(frame, resp) < rst_frame)

    is_rst, is_shut = op == Op.RST, op == Op.SHUTDOWN
    c["rst_count"] = np.bincount(side_key[is_rst], minlength=2 * n).reshape(n, 2)
    c["rst_frame"] = _first_per(side_key[is_rst], frame[is_rst], 2 * n).reshape(n, 2)
    c["shut_frame"] = _first_per(side_key[is_shut], frame[is_shut], 2 * n).reshape(n, 2)
    shut_flags = np.zeros(2 * n, dtype=np.int64)
    np.bitwise_or.at(shut_flags, side_key[is_shut], flags[is_shut])
    c["shut_flags"] = shut_flags.reshape(n, 2)

    # Directions shut before the first RST: bit 0 client→server, bit 1 server→client. A
    # SEND shutdown closes the sender's direction, RCV the peer's.
    pre = is_shut & (frame < rst_frame[sid])
    send, rcv = (flags & ShutdownFlag.SEND) != 0, (flags & ShutdownFlag.RCV) != 0
    own_bit, peer_bit = 1 << sender, 1 << (1 - sender)
    bits = np.where(send, own_bit, 0) | np.where(rcv, peer_bit, 0)
    shut = np.zeros(n, dtype=np.int64)
    np.bitwise_or.at(shut, sid[pre], bits[pre])
    both = shut == 3
    pre_pos = np.flatnonzero(pre)
    latest = np.r_[sid[pre_pos][1:] != sid[pre_pos][:-1], True] if len(pre_pos) else []
    last_shut = np.full(n, -1, dtype=np.int64)
    last_shut[sid[pre_pos[latest]]] = pre_pos[latest]

    rst_sender = pick(sender, rst, -1)
    refused = has_rst & ~both & has_req & ~resp_first & (rst_sender == SERVER)
    kinds = np.select(
        [has_rst & both, refused, has_rst & (rst_sender == CLIENT), has_rst,
         (last_shut >= 0) & both, last_shut >= 0, has_req & ~has_resp],
        [_CLOSE_CODE[k] for k in (Close.GRACEFUL, Close.REFUSED, Close.RESET_BY_CLIENT,
                                  Close.RESET_BY_SERVER, Close.CLOSING, Close.HALF_CLOSED,
                                  Close.UNANSWERED)],
        _CLOSE_CODE[Close.OPEN])
    c["close"] = kinds
    close_ev = np.where(has_rst, rst, last_shut)
    c["close_frame"] = pick(frame, close_ev)
    c["close_by"] = pick(sender, close_ev, -1)
    answer = np.where(refused, rst, np.where(has_resp, resp, -1))
    c["handshake"] = np.where(has_req & (answer >= 0), pick(ts, answer, 0) - pick(ts, req, 0),
                              NONE)


CLOSES = tuple(Close)
_CLOSE_CODE = {k: i for i, k in enumerate(CLOSES)}


@dataclass(frozen=True)
class RecordField:
    """One key of a connection's flat record (``conns --json``/``--csv``)."""

    name: str
    kind: type
    doc: str


def _fields(*specs: tuple[str, type, str]) -> tuple[RecordField, ...]:
    return tuple(RecordField(*s) for s in specs)


RECORD_FIELDS = _fields(
    ("stream", int, "stream index (the shared numbering rule)"),
    ("type", str, "STREAM or SEQPACKET (UNKNOWN(n) for other values)"),
    ("client", str, "client end as cid:port (the REQUEST's sender, or the guess)"),
    ("server", str, "server end as cid:port"),
    ("client_cid", int, "client CID"),
    ("client_port", int, "client port"),
    ("server_cid", int, "server CID"),
    ("server_port", int, "server port"),
    ("start_seen", bool, "the REQUEST was captured (false: mid-connection, roles guessed)"),
    ("start", float, "time of the first frame, seconds since the epoch"),
    ("end", float, "time of the last frame, seconds since the epoch"),
    ("duration", float, "end - start, seconds"),
    ("first_frame", int, "number of the first frame"),
    ("last_frame", int, "number of the last frame"),
    ("request_frame", int, "frame of the REQUEST"),
    ("response_frame", int, "frame of the first RESPONSE"),
    ("handshake_ms", float, "REQUEST to RESPONSE (or to the refusing RST), milliseconds"),
    ("close", str, "how it ended: " + ", ".join(CLOSES)),
    ("close_frame", int, "the first RST, or the last SHUTDOWN when there was no RST"),
    ("close_by", str, "client or server: who sent close_frame"),
    ("packets", int, "frames both ways"),
    ("bytes", int, "payload bytes both ways (sum of the virtio len of RW packets)"),
    ("packets_c2s", int, "frames the client sent"),
    ("packets_s2c", int, "frames the server sent"),
    ("bytes_c2s", int, "payload bytes the client sent"),
    ("bytes_s2c", int, "payload bytes the server sent"),
    ("rw_c2s", int, "RW packets the client sent"),
    ("rw_s2c", int, "RW packets the server sent"),
    ("messages_c2s", int, "SEQPACKET: messages (EOM) the client sent; null for STREAM"),
    ("messages_s2c", int, "SEQPACKET: messages (EOM) the server sent; null for STREAM"),
    ("records_c2s", int, "SEQPACKET: messages with EOR the client sent"),
    ("records_s2c", int, "SEQPACKET: messages with EOR the server sent"),
    ("first_rw_frame", int, "first RW frame either way"),
    ("last_rw_frame", int, "last RW frame either way"),
    ("shutdown_client", str, "SHUTDOWN flags the client sent (RCV|SEND)"),
    ("shutdown_server", str, "SHUTDOWN flags the server sent"),
    ("shutdown_client_frame", int, "first SHUTDOWN from the client"),
    ("shutdown_server_frame", int, "first SHUTDOWN from the server"),
    ("rst_client", int, "RSTs the client sent"),
    ("rst_server", int, "RSTs the server sent"),
    ("buf_alloc_client", int, "receive buffer the client advertised last"),
    ("buf_alloc_server", int, "receive buffer the server advertised last"),
    ("credit_updates_c2s", int, "CREDIT_UPDATEs the client sent"),
    ("credit_updates_s2c", int, "CREDIT_UPDATEs the server sent"),
    ("credit_requests_c2s", int, "CREDIT_REQUESTs the client sent"),
    ("credit_requests_s2c", int, "CREDIT_REQUESTs the server sent"),
    ("max_in_flight_c2s", int, "most client bytes not yet consumed by the server"),
    ("max_in_flight_s2c", int, "most server bytes not yet consumed by the client"),
    ("credit_stalls", int, "zero-credit stalls, both directions"),
    ("stalls_c2s", int, "stalls of the client as sender (server's buffer full)"),
    ("stalls_s2c", int, "stalls of the server as sender"),
    ("stall_time", float, "total stalled time, both directions, seconds"),
    ("max_stall_ms", float, "longest stall, milliseconds"),
    ("stalled_at_end", bool, "a sender still had no credit at the connection's last frame"),
    ("violations", int, "protocol violations, all kinds, both directions"),
    ("beyond_credit", int, "RW packets carrying more than the peer's free credit"),
    ("after_shutdown", int, "RW packets sent after the sender's own SHUTDOWN(SEND)"),
    ("before_response", int, "RW packets before the RESPONSE"),
    ("tap_length", int, "frames whose captured payload length differs from len (tap bug)"),
    ("first_violation_frame", int, "first frame with a violation"),
)
"""The keys of a connection record, in output order."""


class ConnTable:
    """Every connection of a capture as columns, with :class:`Connection` objects on demand.

    ``for conn in table`` and ``table[i]`` give dataclasses (what rule engines want);
    :meth:`columns` gives the flat record fields as numpy arrays or lists (what filters,
    sorting and the JSON/CSV writers want, a million connections at a time).
    """

    def __init__(self, cols: dict[str, np.ndarray], events: dict[str, np.ndarray]) -> None:
        self._c = cols
        self._ev = events
        self._n = len(cols["type"])
        self._ev_start = np.searchsorted(events["sid"], np.arange(self._n + 1)).tolist()
        self._lists: tuple[dict[str, list], tuple[dict[str, list], ...]] | None = None
        self._ev_rows: list[Event] | None = None
        self._records: dict[str, np.ndarray | list] | None = None
        self._record_lists: list[list] | None = None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Connection]:
        if self._ev_rows is None:  # all events at once: far cheaper than per connection
            self._ev_rows = list(map(Event._make, zip(
                *(self._ev[k].tolist() for k in _EV_COLS), strict=True)))
        return (self[i] for i in range(self._n))

    def __getitem__(self, i: int) -> Connection:
        if not 0 <= i < self._n:
            raise IndexError(f"no stream {i}")
        c, roles = self._columns_as_lists()
        seq = c["type"][i] == SockType.SEQPACKET
        a, b = self._ev_start[i], self._ev_start[i + 1]
        if self._ev_rows is not None:
            events = tuple(self._ev_rows[a:b])
        else:
            events = tuple(map(Event._make, zip(*(self._ev[k][a:b].tolist() for k in _EV_COLS),
                                                strict=True)))
        return Connection(
            stream=i, type=c["type"][i], client=self._side(roles[CLIENT], i, CLIENT, seq),
            server=self._side(roles[SERVER], i, SERVER, seq), start_seen=c["start_seen"][i],
            first_frame=c["first_frame"][i], last_frame=c["last_frame"][i],
            first_ts_ns=c["first_ts"][i], last_ts_ns=c["last_ts"][i],
            request_frame=_opt(c["request_frame"][i]),
            response_frame=_opt(c["response_frame"][i]), handshake_ns=_opt(c["handshake"][i]),
            close=CLOSES[c["close"][i]], close_frame=_opt(c["close_frame"][i]),
            close_by=ROLES[c["close_by"][i]] if c["close_by"][i] >= 0 else None, events=events)

    def _columns_as_lists(self) -> tuple[dict[str, list], tuple[dict[str, list], ...]]:
        """The columns as Python lists: the per-stream ones, then one dict per role of the
        per-side ones (violation columns as ``name@kind``). Reading a Connection is then
        only list indexing."""
        if self._lists is None:
            common: dict[str, list] = {}
            roles: tuple[dict[str, list], ...] = ({}, {})
            for k, v in self._c.items():
                if v.ndim == 1:
                    common[k] = v.tolist()
                    continue
                for role in (CLIENT, SERVER):
                    if v.ndim == 2:
                        roles[role][k] = v[:, role].tolist()
                    else:
                        for j in range(v.shape[2]):
                            roles[role][f"{k}@{j}"] = v[:, role, j].tolist()
            self._lists = common, roles
        return self._lists

    @staticmethod
    def _side(c: dict[str, list], i: int, role: int, seq: bool) -> Side:
        violations = {}
        for j, kind in enumerate(_VIOLATIONS):
            count = c[f"viol_count@{j}"][i]
            if count:
                violations[kind] = Evidence(count, c[f"viol_first@{j}"][i],
                                            c[f"viol_last@{j}"][i])
        stalls = _NO_STALLS if not c["stalls"][i] else Stalls(
            c["stalls"][i], c["stall_total"][i], c["stall_max"][i], _opt(c["stall_first"][i]),
            c["stall_longest"][i] or None, c["stalled"][i])
        known = c["known"][i]
        return Side(
            role=ROLES[role], cid=c["cid"][i], port=c["port"][i], packets=c["packets"][i],
            rw_packets=c["rw"][i], bytes=c["tx"][i], messages=c["eom"][i] if seq else None,
            records=c["eor"][i] if seq else None, credit_updates=c["cu"][i],
            credit_requests=c["cr"][i], buf_alloc=c["buf"][i] if known else None,
            fwd_cnt=(c["fwd_raw"][i] - c["fwd_unw"][i] + c["fwd_max"][i]) & _U32
            if known else None,
            first_rw_frame=_opt(c["first_rw"][i]), last_rw_frame=c["last_rw"][i] or None,
            shutdown_flags=c["shut_flags"][i], shutdown_frame=_opt(c["shut_frame"][i]),
            rst_frame=_opt(c["rst_frame"][i]), rst_count=c["rst_count"][i],
            max_in_flight=_opt(c["max_flight"][i], -1), min_credit=_opt(c["min_credit"][i]),
            stalls=stalls, violations=violations)

    def columns(self) -> dict[str, np.ndarray | list]:
        """The record fields (:data:`RECORD_FIELDS`) as columns; None marks a missing value."""
        if self._records is None:
            self._records = _record_columns(self._c)
        return self._records

    def records(self, rows: Iterable[int] | None = None) -> list[dict[str, object]]:
        """The flat records of ``rows`` (default: all), in that order."""
        cols = self.columns()
        if self._record_lists is None:
            self._record_lists = [_as_list(cols[f.name]) for f in RECORD_FIELDS]
        lists = self._record_lists
        names = [f.name for f in RECORD_FIELDS]
        idx = range(self._n) if rows is None else rows
        return [dict(zip(names, (col[i] for col in lists), strict=True)) for i in idx]


_EV_COLS = ("frame", "ts", "op", "sender", "flags", "len", "buf", "fwd")
_NO_STALLS = Stalls()


def _opt(value: int, unset: int = NONE) -> int | None:
    return None if value == unset else value


def _as_list(col: np.ndarray | list) -> list:
    return col if isinstance(col, list) else col.tolist()


def _nullable(col: np.ndarray, unset: np.ndarray | int) -> list:
    """``col`` as a list with None where it equals ``unset`` (or where ``unset`` is True)."""
    missing = col == unset if not isinstance(unset, np.ndarray) or unset.dtype != bool \
        else unset
    values = col.tolist()
    for i in np.flatnonzero(missing).tolist():
        values[i] = None
    return values


def _flag_text(flags: np.ndarray) -> list[str]:
    names = {v: "|".join(f.name for f in ShutdownFlag if v & f) for v in np.unique(flags).tolist()}
    return [names[v] for v in flags.tolist()]


def _record_columns(c: dict[str, np.ndarray]) -> dict[str, np.ndarray | list]:
    """Every record field as a column, derived from the tracker's table."""
    n = len(c["type"])
    cid, port = c["cid"], c["port"]
    seq = c["type"] == SockType.SEQPACKET
    out: dict[str, np.ndarray | list] = {"stream": np.arange(n)}
    types = {v: enum_name(SockType, v) for v in np.unique(c["type"]).tolist()}
    out["type"] = [types[v] for v in c["type"].tolist()]
    for role, name in enumerate(ROLES):
        out[name] = [f"{a}:{p}" for a, p in zip(cid[:, role].tolist(), port[:, role].tolist(),
                                                 strict=True)]
        out[f"{name}_cid"], out[f"{name}_port"] = cid[:, role], port[:, role]
    out["start_seen"] = c["start_seen"]
    out["start"], out["end"] = c["first_ts"] / 1e9, c["last_ts"] / 1e9
    out["duration"] = (c["last_ts"] - c["first_ts"]) / 1e9
    out["first_frame"], out["last_frame"] = c["first_frame"], c["last_frame"]
    out["request_frame"] = _nullable(c["request_frame"], NONE)
    out["response_frame"] = _nullable(c["response_frame"], NONE)
    out["handshake_ms"] = _nullable(c["handshake"] / 1e6, c["handshake"] == NONE)
    out["close"] = [CLOSES[v].value for v in c["close"].tolist()]
    out["close_frame"] = _nullable(c["close_frame"], NONE)
    by = c["close_by"].tolist()
    out["close_by"] = [ROLES[v] if v >= 0 else None for v in by]
    out["packets"] = c["packets"].sum(axis=1)
    out["bytes"] = c["tx"].sum(axis=1)
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"packets_{suffix}"] = c["packets"][:, d]
        out[f"bytes_{suffix}"] = c["tx"][:, d]
        out[f"rw_{suffix}"] = c["rw"][:, d]
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"messages_{suffix}"] = _nullable(c["eom"][:, d], ~seq)
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"records_{suffix}"] = _nullable(c["eor"][:, d], ~seq)
    out["first_rw_frame"] = _nullable(c["first_rw"].min(axis=1), NONE)
    out["last_rw_frame"] = _nullable(c["last_rw"].max(axis=1), 0)
    for role, name in enumerate(ROLES):
        out[f"shutdown_{name}"] = _flag_text(c["shut_flags"][:, role])
    for role, name in enumerate(ROLES):
        out[f"shutdown_{name}_frame"] = _nullable(c["shut_frame"][:, role], NONE)
    for role, name in enumerate(ROLES):
        out[f"rst_{name}"] = c["rst_count"][:, role]
    for role, name in enumerate(ROLES):
        out[f"buf_alloc_{name}"] = _nullable(c["buf"][:, role], ~c["known"][:, role])
    for key, col in (("credit_updates", "cu"), ("credit_requests", "cr")):
        for d, suffix in enumerate(("c2s", "s2c")):
            out[f"{key}_{suffix}"] = c[col][:, d]
    for d, suffix in enumerate(("c2s", "s2c")):
        out[f"max_in_flight_{suffix}"] = _nullable(c["max_flight"][:, d], -1)
    out["credit_stalls"] = c["stalls"].sum(axis=1)
    out["stalls_c2s"], out["stalls_s2c"] = c["stalls"][:, 0], c["stalls"][:, 1]
    out["stall_time"] = c["stall_total"].sum(axis=1) / 1e9
    out["max_stall_ms"] = c["stall_max"].max(axis=1) / 1e6
    out["stalled_at_end"] = c["stalled"].any(axis=1)
    counts = c["viol_count"].sum(axis=1)  # (n, kinds)
    out["violations"] = counts.sum(axis=1)
    for j, kind in enumerate(_VIOLATIONS):
        out[kind.value.replace("-", "_")] = counts[:, j]
    out["first_violation_frame"] = _nullable(c["viol_first"].min(axis=(1, 2)), NONE)
    return out


def track(batches: Iterable[FrameBatch]) -> ConnTable:
    """Every connection of a stream of decoded batches."""
    tracker = ConnTracker()
    for fb in batches:
        tracker.feed(fb)
    return tracker.finish()


class StreamRows:
    """The packets of chosen streams as columns, gathered from :meth:`ConnTracker.feed`.

    For views of a few connections (timeline, follow): memory is proportional to their
    packets only. ``wanted`` names the streams, or None for the first ``first`` streams;
    ``payloads`` keeps each packet's payload (its first ``len`` bytes: the tap-length rule).
    """

    COLUMNS = ("frame", "ts", "sender", "op", "len", "flags", "buf", "fwd", "anomalies",
               "in_flight", "limit", "caplen")

    def __init__(self, wanted: Iterable[int] | None = None, first: int = 0,
                 payloads: bool = False) -> None:
        self.wanted = None if wanted is None else np.asarray(sorted(set(wanted)), np.int64)
        self.first = first
        self.payloads = payloads
        self._parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self._data: dict[int, list[bytes]] = {}

    def __call__(self, fb: FrameBatch, tags: Tags) -> None:
        stream = tags.stream
        if self.wanted is None:
            pick = (stream >= 0) & (stream < self.first)
        else:
            pick = np.isin(stream, self.wanted)
        rows = np.flatnonzero(pick)
        if not len(rows):
            return
        v = fb.virtio[rows]
        length = v["len"].astype(np.int64)
        cols = {"frame": rows + fb.first, "ts": fb.ts_ns[rows],
                "sender": tags.sender[rows].astype(np.int64), "op": v["op"].astype(np.int64),
                "len": length, "flags": v["flags"].astype(np.int64),
                "buf": v["buf_alloc"].astype(np.int64), "fwd": v["fwd_cnt"].astype(np.int64),
                "anomalies": fb.anomalies[rows].astype(np.int64),
                "in_flight": tags.in_flight[rows], "limit": tags.limit[rows],
                "caplen": fb.payload_len[rows].astype(np.int64)}
        sids = stream[rows]
        for sid in np.unique(sids).tolist():
            sel = sids == sid
            self._parts.setdefault(sid, []).append({k: c[sel] for k, c in cols.items()})
            if self.payloads:
                data = self._data.setdefault(sid, [])
                for i, n in zip(rows[sel].tolist(), length[sel].tolist(), strict=True):
                    data.append(fb.payload(i)[:n])

    @property
    def streams(self) -> list[int]:
        return sorted(self._parts)

    def columns(self, stream: int) -> dict[str, np.ndarray]:
        """Every column of one stream's packets, in frame order."""
        parts = self._parts.get(stream, [])
        if not parts:
            return {k: np.zeros((0, 2) if k in ("in_flight", "limit") else 0, dtype=np.int64)
                    for k in self.COLUMNS}
        return {k: np.concatenate([p[k] for p in parts]) for k in self.COLUMNS}

    def payload(self, stream: int) -> list[bytes]:
        """Each packet's payload bytes (the first ``len`` captured), in frame order."""
        return self._data.get(stream, [])
