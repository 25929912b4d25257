"""Diagnosis: find what went wrong in a vsock capture, explain it, and say how to fix it.

The rules read the connection tracker's output (:mod:`vsockmon.conntrack.tracker`:
connections, their control events, per-side credit and stalls) plus a :class:`Digest` of the
few per-packet facts the tracker does not keep (first packet of each CID, addressing errors,
zero-credit periods with their times, small writes, pending data). Each rule turns a pattern into a
:class:`Finding`: a stable rule id, a severity, the stream and frames that prove it, the
numbers that matter, a plain-language finding, the likely cause and the fix.

Healthy Linux traffic must diagnose clean: port reuse, two RSTs at close, CREDIT_UPDATE counts
that vary, delayed packets carrying an older fwd_cnt and the SHUTDOWN-then-RST close are all
normal and never reported. Every threshold is a named field of :class:`Thresholds`.

No I/O here. Use :func:`diagnose_batches` for a capture, :class:`Diagnosis` to feed batches
yourself, :class:`LiveDiagnosis` to report findings as they become certain during a capture.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import numpy as np

from vsockmon.conntrack.tracker import (
    CLIENT,
    SERVER,
    Close,
    Connection,
    ConnTracker,
    Tags,
    Violation,
)
from vsockmon.decode.frames import Anomaly, FrameBatch, decode_batch
from vsockmon.wire.pcapio import RecordBatch
from vsockmon.wire.protocol import VMADDR_CID_ANY, Op, ShutdownFlag, SockType, enum_name

HOST_CID = 2
_U32 = 1 << 32
_IMPOSSIBLE_PEERS = (0, 1, VMADDR_CID_ANY)
"""CIDs that never talk to another CID over a transport: the hypervisor (VMCI only), local
loopback (talks only to itself) and the bind-only wildcard."""


class Severity(IntEnum):
    """How bad a finding is; the CLI's exit code is 1 from WARNING up."""

    INFO = 0
    WARNING = 1
    ERROR = 2

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        return cls[text.upper()]


def _limit(default: float, unit: str, doc: str) -> Any:
    return field(default=default, metadata={"unit": unit, "doc": doc})


@dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares against; the defaults suit Linux peers.

    Each field's ``metadata`` holds its unit and a one-line doc (the CLI's options are made
    from them).
    """

    no_transport_s: float = _limit(
        2.0, "s", "a REQUEST unanswered this long counts as never answered (Linux's own "
        "connect timeout is 2 s)")
    stall_s: float = _limit(
        1.0, "s", "a full window whose receiver's fwd_cnt stays frozen this long is reported "
        "(bulk transfers fill it for milliseconds all the time: flow control at work)")
    credit_reply_s: float = _limit(
        1.0, "s", "a CREDIT_REQUEST followed by nothing at all from the peer for this long is "
        "unanswered")
    half_close_s: float = _limit(
        1.0, "s", "silence after a one-sided SHUTDOWN(SEND), up to the capture's end, that "
        "makes a hang")
    unread_grace_s: float = _limit(
        0.01, "s", "bytes still unconsumed at a reset count as discarded only if they had "
        "waited this long (younger ones may have crossed the close)")
    small_rw_bytes: int = _limit(
        1024, "bytes", "an RW with a smaller payload is a small write")
    small_rw_count: int = _limit(
        64, "packets", "this many small writes before a reset make the small-packet-reset "
        "pattern")
    retry_count: int = _limit(
        3, "attempts", "attempts to one CID:port, all but the last failed, that make a retry "
        "loop")
    retry_gap_s: float = _limit(
        60.0, "s", "attempts further apart than this belong to different retry loops")


@dataclass(frozen=True)
class Rule:
    """A rule's stable id, its usual severity and a one-line title."""

    id: str
    severity: Severity
    title: str
    kinds: tuple[str, ...] = ()


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("no-listener", Severity.ERROR, "STREAM REQUEST refused by RST: nothing listens there"),
    Rule("seqpacket-refused", Severity.ERROR, "SEQPACKET REQUEST refused by RST"),
    Rule("no-transport", Severity.ERROR, "REQUEST never answered: the peer's vsock transport "
         "is not running", ("no-transport", "peer-silent")),
    Rule("cid-mismatch", Severity.ERROR, "packets between CIDs the host drops, or an answer "
         "from another CID", ("not-host", "reply-cid")),
    Rule("window-full", Severity.WARNING, "receive window full with fwd_cnt frozen",
         ("not-reading", "deadlock", "no-credit-update", "credit-request-unanswered")),
    Rule("half-close-hang", Severity.WARNING, "SHUTDOWN(SEND), then silence until the end"),
    Rule("abrupt-close", Severity.WARNING, "reset without shutdown, or with data unread",
         ("reset", "unread")),
    Rule("credit-violation", Severity.ERROR, "RW beyond the advertised credit"),
    Rule("small-packet-reset", Severity.ERROR, "reset after many small writes while credit "
         "remained"),
    Rule("state-lost", Severity.ERROR, "REQUEST on an address pair that is still connected"),
    Rule("dial-retry", Severity.WARNING, "repeated REQUESTs to a failing CID:port"),
    Rule("tap-length", Severity.INFO, "the kernel's tap-length bug on split packets"),
    Rule("mid-capture", Severity.INFO, "connection started before or ended after the capture",
         ("start", "end")),
)}


@dataclass(frozen=True)
class Finding:
    """One diagnosed problem with its proof, explanation and fix."""

    rule: str
    severity: Severity
    stream: int | None
    """The connection it concerns (the first one when it spans several); None: the capture."""
    frames: tuple[int, ...]
    """The frames that show it, in order."""
    message: str
    cause: str
    fix: str
    kind: str | None = None
    """Which variant of the rule (see :attr:`Rule.kinds`)."""
    streams: tuple[int, ...] = ()
    """Every connection concerned, :attr:`stream` first."""
    time_ns: int | None = None
    """When it shows: the time of its first evidence frame."""
    connection: str = ""
    """The connection as ``client → server TYPE``."""
    evidence: Mapping[str, Any] = field(default_factory=dict)
    """The numbers that matter, by name (bytes, seconds, frame numbers)."""

    @property
    def rule_id(self) -> str:
        """``rule/kind`` when the rule has variants, else the rule id."""
        return f"{self.rule}/{self.kind}" if self.kind else self.rule

    def to_dict(self, start_ns: int | None = None) -> dict[str, Any]:
        """The JSON object of ``--json``; ``t`` is seconds since ``start_ns`` when given."""
        out: dict[str, Any] = {
            "rule": self.rule, "kind": self.kind, "severity": str(self.severity),
            "stream": self.stream, "streams": list(self.streams or _opt_tuple(self.stream)),
            "frames": list(self.frames), "time_ns": self.time_ns,
        }
        if start_ns is not None and self.time_ns is not None:
            out["t"] = round((self.time_ns - start_ns) / 1e9, 9)
        out.update(connection=self.connection, message=self.message, cause=self.cause,
                   fix=self.fix, evidence=dict(self.evidence))
        return out

    def to_json(self, start_ns: int | None = None) -> str:
        return json.dumps(self.to_dict(start_ns), ensure_ascii=False)


def _opt_tuple(value: int | None) -> tuple[int, ...]:
    return () if value is None else (value,)


# -- per-packet facts the tracker does not keep ---------------------------------------------


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
    peer_packets: int = 0
    """Packets the peer sent during the stall that gave no credit back."""
    unanswered: list[tuple[int, int, int | None]] = field(default_factory=list)
    """CREDIT_REQUESTs and the peer's first packet after each: (frame, time, reply time)."""

    def seconds(self, end_ns: int) -> float:
        return ((self.end_ns if self.end_ns is not None else end_ns) - self.start_ns) / 1e9


@dataclass
class _Count:
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


@dataclass(frozen=True)
class _Reset:
    frame: int
    ts_ns: int
    sender: int
    in_flight: tuple[int, int]
    limit: tuple[int, int]


@dataclass
class _Excess:
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
        self.frames = 0
        self.start_ns: int | None = None
        self.end_ns: int | None = None
        self.cid_first: dict[int, tuple[int, int]] = {}
        """CID → (frame, time) of the first packet it sent."""
        self.bad_cids: dict[int, _Count] = {}
        """stream → packets between CIDs that cannot talk to each other."""
        self.tap_length = _Count()
        self.small_rw: dict[tuple[int, int], int] = defaultdict(int)
        self.resets: dict[int, _Reset] = {}
        """stream → its first RST, with the credit state of both directions then."""
        self.beyond: dict[tuple[int, int], _Excess] = {}
        self.pending: dict[tuple[int, int], int | None] = {}
        """(stream, sender) → since when bytes it sent have been waiting unconsumed."""
        self.stalls: list[Stall] = []
        """Finished stalls at least as long as the shortest threshold that reads them."""
        self.open_stalls: dict[tuple[int, int], Stall] = {}

    def feed(self, fb: FrameBatch, tags: Tags) -> None:
        n = len(fb)
        if not n:
            return
        self.frames += n
        lo, hi = int(fb.ts_ns.min()), int(fb.ts_ns.max())
        self.start_ns = lo if self.start_ns is None else min(self.start_ns, lo)
        self.end_ns = hi if self.end_ns is None else max(self.end_ns, hi)
        rows = np.flatnonzero(tags.stream >= 0)
        if not len(rows):
            return
        r = _Rows(fb, tags, rows)
        self._cids(r)
        self._anomalies(r)
        self._small_writes(r)
        self._resets(r)
        self._beyond(r)
        for d in (CLIENT, SERVER):
            self._pending(r, d)
        self._stalls(r)

    def _cids(self, r: _Rows) -> None:
        cids, first = np.unique(r.src_cid, return_index=True)
        for cid, i in zip(cids.tolist(), first.tolist(), strict=True):
            self.cid_first.setdefault(cid, (int(r.frame[i]), int(r.ts[i])))
        differ = r.src_cid != r.dst_cid
        odd = np.isin(r.src_cid, _IMPOSSIBLE_PEERS) | np.isin(r.dst_cid, _IMPOSSIBLE_PEERS)
        odd |= (r.src_cid >= _U32) | (r.dst_cid >= _U32)
        no_host = (r.src_cid != HOST_CID) & (r.dst_cid != HOST_CID)
        for i in np.flatnonzero(differ & (no_host | odd)).tolist():
            count = self.bad_cids.setdefault(int(r.sid[i]), _Count())
            count.add(int(r.frame[i]), int(r.ts[i]), int(r.sid[i]),
                      (int(r.src_cid[i]), int(r.dst_cid[i])), EXAMPLE_FRAMES)

    def _anomalies(self, r: _Rows) -> None:
        bad = (r.anomalies & np.uint16(Anomaly.PAYLOAD_LEN)) != 0
        for i in np.flatnonzero(bad).tolist():
            self.tap_length.add(int(r.frame[i]), int(r.ts[i]), int(r.sid[i]),
                                (int(r.length[i]), int(r.captured[i])), EXAMPLE_FRAMES)

    def _small_writes(self, r: _Rows) -> None:
        small = (r.op == Op.RW) & (r.length > 0) & (r.length < self.t.small_rw_bytes)
        keys, counts = np.unique(r.sid[small] * 2 + r.sender[small], return_counts=True)
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
            self.small_rw[(key // 2, key % 2)] += count

    def _resets(self, r: _Rows) -> None:
        for i in np.flatnonzero(r.op == Op.RST).tolist():
            sid = int(r.sid[i])
            if sid not in self.resets:
                self.resets[sid] = _Reset(
                    int(r.frame[i]), int(r.ts[i]), int(r.sender[i]),
                    (int(r.in_flight[i, 0]), int(r.in_flight[i, 1])),
                    (int(r.limit[i, 0]), int(r.limit[i, 1])))

    def _beyond(self, r: _Rows) -> None:
        """RW packets that took the sender past its peer's advertised buffer."""
        idx = np.arange(len(r.sid))
        flight = r.in_flight[idx, r.sender]
        limit = r.limit[idx, r.sender]
        over = (r.op == Op.RW) & (limit >= 0) & (flight > limit)
        for i in np.flatnonzero(over).tolist():
            key = (int(r.sid[i]), int(r.sender[i]))
            e = self.beyond.get(key)
            if e is None:
                credit = int(limit[i] - flight[i] + r.length[i])
                self.beyond[key] = _Excess(1, int(r.frame[i]), int(r.ts[i]), int(r.length[i]),
                                           credit, int(limit[i]), int(r.frame[i]),
                                           int(flight[i]))
            else:
                e.count += 1
                e.max_in_flight = max(e.max_in_flight, int(flight[i]))
                e.last_frame = int(r.frame[i])

    def _pending(self, r: _Rows, d: int) -> None:
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
            if not waiting[b]:
                self.pending[key] = None
            elif idle >= a:
                self.pending[key] = int(ts[idle + 1])
            elif self.pending.get(key) is None:
                self.pending[key] = int(ts[a])

    def _stalls(self, r: _Rows) -> None:
        """Follow zero-credit periods packet by packet, only on the streams that have one."""
        zero = (r.limit >= 0) & (r.in_flight >= r.limit)
        busy = {s for s, _ in self.open_stalls}
        busy.update(np.unique(r.sid[zero.any(axis=1)]).tolist())
        if not busy:
            return
        for i in np.flatnonzero(np.isin(r.sid, list(busy))).tolist():
            for d in (CLIENT, SERVER):
                self._stall_step(r, i, d, bool(zero[i, d]))

    def _stall_step(self, r: _Rows, i: int, d: int, zero: bool) -> None:
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
                st.peer_packets += 1
                st.unanswered = [(f, t, reply if reply is not None else ts)
                                 for f, t, reply in st.unanswered]
            return
        st.end_frame, st.end_ns, st.ended_by = frame, ts, op
        st.freed_by_fwd = int(r.limit[i, d]) <= st.limit
        st.unanswered = [(f, t, reply if reply is not None else ts)
                         for f, t, reply in st.unanswered]  # the credit is an answer too
        del self.open_stalls[key]
        if st.seconds(ts) >= min(self.t.stall_s, self.t.credit_reply_s):
            self.stalls.append(st)

    def all_stalls(self) -> Iterator[Stall]:
        yield from self.stalls
        yield from self.open_stalls.values()


class _Rows:
    """The columns of one batch's rows that belong to a stream, for the digest."""

    def __init__(self, fb: FrameBatch, tags: Tags, rows: np.ndarray) -> None:
        v = fb.virtio[rows]
        self.frame = rows + fb.first
        self.ts = fb.ts_ns[rows]
        self.sid = tags.stream[rows]
        self.sender = tags.sender[rows].astype(np.int64)
        self.in_flight = tags.in_flight[rows]
        self.limit = tags.limit[rows]
        self.op = v["op"].astype(np.int64)
        self.length = v["len"].astype(np.int64)
        self.src_cid = v["src_cid"]
        self.dst_cid = v["dst_cid"]
        self.anomalies = fb.anomalies[rows]
        self.captured = fb.payload_len[rows]


# -- the rules ------------------------------------------------------------------------------


_OPEN_ENDS = (Close.OPEN, Close.HALF_CLOSED, Close.CLOSING, Close.UNANSWERED)
_FAILED = (Close.REFUSED, Close.UNANSWERED)


class _Context:
    """What every rule reads: connections, digest, thresholds, the capture's end."""

    def __init__(self, conns: list[Connection], digest: Digest, t: Thresholds,
                 end_ns: int, final: bool) -> None:
        self.conns = conns
        self.digest = digest
        self.t = t
        self.end_ns = end_ns
        self.final = final
        self.findings: list[Finding] = []
        self.open_end_explained: set[int] = set()
        """Streams whose missing end a finding already explains (no mid-capture for them)."""
        self.unestablished: set[int] = set()
        """Streams whose failure a finding already explains (no refusal or reset for them)."""

    def add(self, rule: str, conn: Connection | None, frames: Iterable[int], message: str,
            cause: str, fix: str, *, kind: str | None = None, severity: Severity | None = None,
            streams: Sequence[int] = (), time_ns: int | None = None,
            **evidence: Any) -> None:
        stream = conn.stream if conn is not None else (streams[0] if streams else None)
        self.findings.append(Finding(
            rule=rule, severity=RULES[rule].severity if severity is None else severity,
            stream=stream, frames=tuple(sorted(set(frames))), message=message, cause=cause,
            fix=fix, kind=kind, streams=tuple(streams) or _opt_tuple(stream),
            time_ns=time_ns if time_ns is not None else (conn.first_ts_ns if conn else None),
            connection=label(conn) if conn is not None else "", evidence=evidence))


def label(conn: Connection) -> str:
    """``client → server TYPE``, the way findings name a connection."""
    return f"{conn.client.addr} → {conn.server.addr} {conn.type_name}"


def _event(conn: Connection, frame: int | None) -> Any:
    return next((e for e in conn.events if e.frame == frame), None)


def _ms(ns: int | None) -> str:
    if ns is None:
        return "?"
    return f"{ns / 1e3:.0f} µs" if ns < 1_000_000 else f"{ns / 1e6:.1f} ms"


def _s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds * 1000:.0f} ms"


def _request_ts(conn: Connection) -> int:
    ev = _event(conn, conn.request_frame)
    return ev.ts_ns if ev is not None else conn.first_ts_ns


def _refusals(ctx: _Context) -> None:
    """no-listener and seqpacket-refused: refused REQUESTs, one finding per target."""
    groups: dict[tuple[int, int, int, int], list[Connection]] = defaultdict(list)
    for c in ctx.conns:
        if c.close == Close.REFUSED and c.stream not in ctx.unestablished:
            groups[(c.client.cid, c.server.cid, c.server.port, c.type)].append(c)
    for (_, cid, port, typ), conns in groups.items():
        first = conns[0]
        later = _accepted(ctx, cid, port, typ, after=first.request_frame or 0)
        frames = [f for c in conns for f in (c.request_frame, c.close_frame) if f]
        delays = [c.handshake_ns for c in conns if c.handshake_ns is not None]
        times = "" if len(conns) == 1 else f" {len(conns)} times"
        target = f"{cid}:{port}"
        common = dict(streams=[c.stream for c in conns], time_ns=_request_ts(first),
                      refusals=len(conns), rst_delay_ms=round(max(delays, default=0) / 1e6, 3),
                      target=target)
        if typ == SockType.SEQPACKET:
            _seqpacket_refused(ctx, first, frames, target, times, delays, common)
            continue
        message = (f"Nothing listens on {target}: the STREAM REQUEST from {first.client.addr} "
                   f"(frame {first.request_frame}) was refused{times} by an RST within "
                   f"{_ms(max(delays, default=None))}.")
        severity = None
        fix = (f"Start the service on CID {cid} (or point the client at the port it really "
               f"uses), and have the client report ECONNRESET from connect() instead of "
               f"retrying silently.")
        if later is not None:
            severity = Severity.WARNING
            message += (f" A later attempt (stream {later.stream}, frame "
                        f"{later.response_frame}) was accepted: the service started late.")
            fix = ("Start the client once the service listens (wait for its readiness "
                   "notification) rather than racing it.")
        ctx.add("no-listener", first, frames, message,
                f"No socket listens on port {port} at CID {cid}: the service is not started "
                f"(yet), listens on another port, or has crashed. A client that retries turns "
                f"this immediate refusal into a timeout.", fix, severity=severity, **common)


def _accepted(ctx: _Context, cid: int, port: int, typ: int, after: int) -> Connection | None:
    return next((c for c in ctx.conns if c.server.cid == cid and c.server.port == port
                 and c.type == typ and c.response_frame and c.response_frame > after), None)


def _seqpacket_refused(ctx: _Context, first: Connection, frames: list[int], target: str,
                       times: str, delays: list[int], common: dict[str, Any]) -> None:
    cid, port = first.server.cid, first.server.port
    stream_ok = _accepted(ctx, cid, port, SockType.STREAM, after=0)
    message = (f"The SEQPACKET REQUEST from {first.client.addr} to {target} (frame "
               f"{first.request_frame}) was refused{times} by an RST within "
               f"{_ms(max(delays, default=None))}.")
    if stream_ok is not None:
        message += (f" A STREAM connection to the same port was accepted (stream "
                    f"{stream_ok.stream}): the service listens for STREAM only.")
        cause = ("The listener on that port is a SOCK_STREAM socket; Linux refuses a "
                 "SEQPACKET REQUEST to a socket of another type.")
        fix = "Connect with SOCK_STREAM, or make the service listen with SOCK_SEQPACKET."
    else:
        cause = ("Either nothing listens there for SEQPACKET, or the peer's transport does not "
                 "support SEQPACKET at all (Linux before 5.14, or a VMM's vsock device "
                 "without it).")
        fix = ("Check that a SOCK_SEQPACKET service listens on that port; if the peer cannot do "
               "SEQPACKET, use SOCK_STREAM with your own message framing, or upgrade the peer.")
    ctx.add("seqpacket-refused", first, frames, message, cause, fix, **common)


def _unanswered(ctx: _Context) -> None:
    """no-transport: REQUESTs that got neither RESPONSE nor RST in time."""
    for c in ctx.conns:
        if c.close != Close.UNANSWERED or c.request_frame is None:
            continue
        if c.stream in ctx.unestablished:
            continue  # cid-mismatch or state-lost explains it
        asked = _request_ts(c)
        waited = (ctx.end_ns - asked) / 1e9
        if waited < ctx.t.no_transport_s:
            continue
        ctx.open_end_explained.add(c.stream)
        cid = c.server.cid
        spoke = ctx.digest.cid_first.get(cid)
        common = dict(time_ns=asked, waited_s=round(waited, 3), dialled=c.server.addr)
        if spoke is None or spoke[1] >= asked:
            ctx.add("no-transport", c, [c.request_frame],
                    f"The REQUEST from {c.client.addr} to {c.server.addr} (frame "
                    f"{c.request_frame}) got neither RESPONSE nor RST for {_s(waited)}, and "
                    f"CID {cid} sent nothing earlier in the capture.",
                    *_no_transport_text(cid),
                    kind="no-transport", **common)
        else:
            ctx.add("no-transport", c, [c.request_frame, spoke[0]],
                    f"The REQUEST from {c.client.addr} to {c.server.addr} (frame "
                    f"{c.request_frame}) got neither RESPONSE nor RST for {_s(waited)}, "
                    f"although CID {cid} had sent packets before (first at frame {spoke[0]}).",
                    f"CID {cid}'s vsock stack stopped answering: the guest hung, or its "
                    f"transmit queue stalled (seen after a snapshot restore).",
                    "Check the peer's kernel log; after a restore, re-initialise the vsock "
                    "device (or reboot the guest) and reconnect.",
                    kind="peer-silent", severity=Severity.WARNING,
                    cid_first_frame=spoke[0], **common)


def _no_transport_text(cid: int) -> tuple[str, str]:
    """Cause and fix of an unanswered REQUEST, for the host or for a guest."""
    if cid == HOST_CID:
        return ("Nothing answers for the host (CID 2): the host end of the vsock device is not "
                "running — vhost_vsock not loaded, or a user-space VMM device (Firecracker, "
                "Cloud Hypervisor, libkrun) whose vsock backend is stopped or stuck.",
                "Load vhost_vsock on the host, or start (or restart) the VMM's vsock backend; "
                "give connect() a timeout and report its failure.")
    return (f"No vsock transport answers at CID {cid}: the guest's virtio-vsock driver "
            f"(vmw_vsock_virtio_transport) is not loaded, the guest is still booting, or no VM "
            f"has that CID.",
            "Load the transport in the guest and wait for it to boot before dialling; give "
            "connect() a timeout longer than the boot.")


def _cid_mismatch(ctx: _Context) -> None:
    """cid-mismatch: packets between CIDs that cannot talk (one finding per CID pair), and
    answers from another CID than the one dialled."""
    pairs: dict[tuple[int, int], list[tuple[int, _Count]]] = defaultdict(list)
    for sid, count in sorted(ctx.digest.bad_cids.items()):
        pairs[count.detail].append((sid, count))
    for (src, dst), found in pairs.items():
        sid, first = found[0]
        packets = sum(count.count for _, count in found)
        ctx.open_end_explained.update(s for s, _ in found)
        ctx.unestablished.update(s for s, _ in found)  # dropped: nothing can answer
        ctx.add("cid-mismatch", ctx.conns[sid],
                [f for _, count in found for f in count.frames][:EXAMPLE_FRAMES],
                f"{packets} packet(s) from CID {src} to CID {dst} (first at frame "
                f"{first.frames[0]}, {len(found)} connection(s)): no transport carries traffic "
                f"between these CIDs, so nothing ever answers.",
                "A guest can reach only the host (CID 2) and itself. The host's vhost-vsock "
                "taps such a packet before checking its addresses, then drops it, so the "
                "sender waits for an answer that never comes. Usual causes: a CID baked into a "
                "VM template or snapshot, two VMs with one CID, or CID 1 used to mean the host.",
                "Dial CID 2 (VMADDR_CID_HOST) from a guest; give every VM its own CID and check "
                "the guest's own CID (IOCTL_VM_SOCKETS_GET_LOCAL_CID).",
                kind="not-host", streams=[s for s, _ in found], time_ns=first.first_ns,
                packets=packets, src_cid=src, dst_cid=dst)
    _reply_from_other_cid(ctx)


def _reply_from_other_cid(ctx: _Context) -> None:
    """An unanswered REQUEST whose answer came back on the same ports from another CID."""
    pending = {(c.client.cid, c.client.port, c.server.port): c for c in ctx.conns
               if c.request_frame is not None and c.response_frame is None}
    for c in ctx.conns:
        if c.start_seen or not c.events or c.events[0].op not in (Op.RESPONSE, Op.RST):
            continue
        asked = pending.get((c.client.cid, c.client.port, c.server.port))
        if asked is None or asked.server.cid == c.server.cid:
            continue
        ctx.open_end_explained.update((asked.stream, c.stream))
        ctx.unestablished.add(asked.stream)
        ctx.add("cid-mismatch", asked, [asked.request_frame or asked.first_frame, c.first_frame],
                f"The REQUEST went to CID {asked.server.cid} (frame {asked.request_frame}), but "
                f"the answer came from CID {c.server.cid} on the same ports (frame "
                f"{c.first_frame}, stream {c.stream}).",
                f"The peer believes it is CID {c.server.cid}, not the CID {asked.server.cid} "
                f"it was dialled at: a stale CID after a snapshot restore or from a template.",
                "Give the VM the CID its peers dial (or dial the CID it reports), and restart "
                "its vsock users after changing a CID.",
                kind="reply-cid", streams=[asked.stream, c.stream],
                dialled_cid=asked.server.cid, answering_cid=c.server.cid)


def _dial_retry(ctx: _Context) -> None:
    groups: dict[tuple[int, int, int, int], list[Connection]] = defaultdict(list)
    for c in ctx.conns:
        if c.request_frame is not None:
            groups[(c.client.cid, c.server.cid, c.server.port, c.type)].append(c)
    for attempts in groups.values():
        run: list[Connection] = []
        for c in attempts:
            if run and (_failed(run[-1]) and
                        (_request_ts(c) - _request_ts(run[-1])) / 1e9 <= ctx.t.retry_gap_s):
                run.append(c)
            else:
                _report_retry(ctx, run)
                run = [c]
        _report_retry(ctx, run)


def _failed(c: Connection) -> bool:
    return c.close in _FAILED or (c.request_frame is not None and c.response_frame is None
                                  and c.close in (Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER))


def _report_retry(ctx: _Context, run: list[Connection]) -> None:
    if len(run) < ctx.t.retry_count:
        return
    first, last = run[0], run[-1]
    span = (_request_ts(last) - _request_ts(first)) / 1e9
    connected = not _failed(last) and last.response_frame is not None
    failures = run[:-1] if connected else run
    how = sorted({str(c.close) for c in failures})
    outcome = (f"the attempt at frame {last.request_frame} connected" if connected
               else "none connected")
    ctx.add("dial-retry", first, [c.request_frame for c in run if c.request_frame],
            f"CID {first.client.cid} dialled {first.server.addr} {len(run)} times in {_s(span)} "
            f"({len(failures)} {'/'.join(how)}); {outcome}.",
            "The client retries a failing connect(). To its user a refusal (nothing listens) "
            "then looks like a slow timeout, and the real error is never shown.",
            "Log the connect() error of every attempt; wait for the service's readiness instead "
            "of retrying blindly; fix the target (see the no-listener / no-transport findings).",
            streams=[c.stream for c in run], time_ns=_request_ts(first), attempts=len(run),
            failures=len(failures), span_s=round(span, 3), connected=connected)


def _state_lost(ctx: _Context) -> None:
    previous: dict[tuple[int, frozenset[tuple[int, int]]], Connection] = {}
    for c in ctx.conns:
        key = (c.type, frozenset(((c.client.cid, c.client.port),
                                  (c.server.cid, c.server.port))))
        old = previous.get(key)
        previous[key] = c
        if old is None or c.request_frame is None or old.close not in _OPEN_ENDS:
            continue
        if old.close == Close.UNANSWERED or (old.start_seen and old.response_frame is None):
            continue
        ctx.open_end_explained.add(old.stream)
        ctx.unestablished.add(c.stream)
        ctx.add("state-lost", c, [old.last_frame, c.request_frame],
                f"A REQUEST (frame {c.request_frame}) reuses the address pair of stream "
                f"{old.stream}, which was still connected ({old.close}, last packet at frame "
                f"{old.last_frame}, no RST).",
                "One end lost the connection's state while the other kept it: typical after a "
                "VM snapshot restore or live migration, or a VMM bug; the old connection will "
                "never be closed properly.",
                "After a resume or restore, close the old sockets and reconnect; check the "
                "VMM's vsock handling of snapshots.",
                streams=[c.stream, old.stream], time_ns=_request_ts(c),
                previous_stream=old.stream)


def _window_full(ctx: _Context) -> None:
    t = ctx.t
    long = [st for st in ctx.digest.all_stalls() if st.seconds(ctx.end_ns) >= t.stall_s
            or _unanswered_requests(st, ctx)]
    by_stream: dict[int, list[Stall]] = defaultdict(list)
    for st in long:
        by_stream[st.stream].append(st)
    for sid, stalls in sorted(by_stream.items()):
        c = ctx.conns[sid]
        pair = _overlap(stalls, ctx.end_ns, t.stall_s)
        if pair is not None:
            _deadlock(ctx, c, *pair)
            stalls = [st for st in stalls if st not in pair]
        for st in stalls:
            _one_stall(ctx, c, st)


def _unanswered_requests(st: Stall, ctx: _Context) -> list[tuple[int, int, int | None]]:
    return [(f, ts, reply) for f, ts, reply in st.unanswered
            if ((reply if reply is not None else ctx.end_ns) - ts) / 1e9 >= ctx.t.credit_reply_s]


def _overlap(stalls: list[Stall], end_ns: int, minimum: float) -> tuple[Stall, Stall] | None:
    for a in stalls:
        for b in stalls:
            if a.sender == CLIENT and b.sender == SERVER:
                start = max(a.start_ns, b.start_ns)
                stop = min(a.end_ns if a.end_ns is not None else end_ns,
                           b.end_ns if b.end_ns is not None else end_ns)
                if (stop - start) / 1e9 >= minimum:
                    return a, b
    return None


def _deadlock(ctx: _Context, c: Connection, a: Stall, b: Stall) -> None:
    start = max(a.start_ns, b.start_ns)
    stops = [st.end_ns if st.end_ns is not None else ctx.end_ns for st in (a, b)]
    both = (min(stops) - start) / 1e9
    if a.end_frame is None and b.end_frame is None:
        ctx.open_end_explained.add(c.stream)
    ctx.add("window-full", c, [f for st in (a, b) for f in (st.start_frame, st.end_frame) if f],
            f"Both directions were full at once for {_s(both)}: client→server "
            f"{a.in_flight}/{a.limit} bytes (full at frame {a.start_frame}), server→client "
            f"{b.in_flight}/{b.limit} bytes (full at frame {b.start_frame}); neither fwd_cnt "
            f"moved{_until(a, b)}.",
            "A write–write deadlock: each application is blocked writing to the other and "
            "neither reads, so neither window can ever reopen.",
            "Read and write concurrently (a reader thread, or non-blocking I/O with poll), or "
            "bound how much each side writes before it reads the other's data.",
            kind="deadlock", severity=Severity.ERROR, time_ns=start,
            seconds=round(both, 3), client_in_flight=a.in_flight, client_limit=a.limit,
            server_in_flight=b.in_flight, server_limit=b.limit)


def _until(*stalls: Stall) -> str:
    ends = [st.end_frame for st in stalls]
    if all(e is None for e in ends):
        return " until the capture ended"
    return f" until frame {min(e for e in ends if e is not None)}"


def _one_stall(ctx: _Context, c: Connection, st: Stall) -> None:
    sender, receiver = c.sides[st.sender], c.sides[1 - st.sender]
    secs = st.seconds(ctx.end_ns)
    frames = [st.start_frame] + ([st.end_frame] if st.end_frame else [])
    common: dict[str, Any] = dict(time_ns=st.start_ns, seconds=round(secs, 3),
                                  in_flight=st.in_flight, buf_alloc=st.limit,
                                  sender=sender.addr, receiver=receiver.addr)
    head = (f"{sender.role} {sender.addr} → {receiver.addr}: {st.in_flight} bytes in flight "
            f"filled the receiver's buffer (buf_alloc {st.limit}) at frame {st.start_frame}")
    if st.end_frame is None:
        ctx.open_end_explained.add(c.stream)
    unanswered = _unanswered_requests(st, ctx)
    if unanswered:
        f, ts, reply = unanswered[0]
        wait = ((reply if reply is not None else ctx.end_ns) - ts) / 1e9
        ctx.add("window-full", c, [*frames, f],
                f"{head}; the sender asked for credit (CREDIT_REQUEST, frame {f}) and the "
                f"receiver sent nothing for {_s(wait)}.",
                "The receiver's vsock transport does not answer CREDIT_REQUEST (Linux always "
                "does): a transport bug, so the sender may wait forever.",
                "Update or fix the receiver's vsock implementation (VMM device or driver) so "
                "it answers CREDIT_REQUEST with a CREDIT_UPDATE.",
                kind="credit-request-unanswered", credit_request_frame=f,
                unanswered_s=round(wait, 3), **common)
    elif st.end_frame is not None and st.freed_by_fwd and st.ended_by != Op.CREDIT_UPDATE:
        op = enum_name(Op, st.ended_by or 0)
        ctx.add("window-full", c, frames,
                f"{head}; for {_s(secs)} the receiver announced no free space, until its {op} "
                f"at frame {st.end_frame} carried a higher fwd_cnt.",
                "The receiver consumed the data without sending a CREDIT_UPDATE: its "
                "transport does not announce freed buffer space, so the sender waited for "
                "nothing (a transport bug, e.g. vhost-device-vsock #494).",
                "Fix or update the receiver's vsock implementation to send CREDIT_UPDATE when "
                "its application frees buffer space.",
                kind="no-credit-update", ended_by=op, **common)
    else:
        until = (f"until frame {st.end_frame}" if st.end_frame is not None
                 else "until the capture ended")
        ctx.add("window-full", c, frames,
                f"{head}, and its fwd_cnt stayed frozen for {_s(secs)} ({until}).",
                f"The application at {receiver.addr} stopped reading (busy, blocked, or "
                f"waiting for something else), so the sender cannot send more.",
                "Keep reading the socket (a dedicated reader, or non-blocking I/O with poll); "
                "if bursts are expected, raise SO_VM_SOCKETS_BUFFER_SIZE on the receiver.",
                kind="not-reading", **common)


def _half_close(ctx: _Context) -> None:
    for c in ctx.conns:
        if c.close != Close.HALF_CLOSED:
            continue
        shut = next((s for s in c.sides if s.shutdown_flags & ShutdownFlag.SEND), None)
        if shut is None or shut.shutdown_frame is None:
            continue
        silence = (ctx.end_ns - c.last_ts_ns) / 1e9
        if silence < ctx.t.half_close_s:
            continue
        peer = c.sides[1 - (shut is c.server)]
        ev = _event(c, shut.shutdown_frame)
        ctx.open_end_explained.add(c.stream)
        ctx.add("half-close-hang", c, [shut.shutdown_frame, c.last_frame],
                f"{shut.role} {shut.addr} shut down its sending side (SHUTDOWN SEND, frame "
                f"{shut.shutdown_frame}) and waited; {peer.addr} neither answered nor closed: "
                f"nothing on the connection for the last {_s(silence)} of the capture "
                f"(last packet at frame {c.last_frame}).",
                f"{peer.addr} never acted on the end of file: its application waits for more "
                f"data instead of finishing, or a relay between them dropped the "
                f"shutdown(SHUT_WR).",
                "Make the peer treat read() = 0 as the end of the request (reply, then close); "
                "relays and proxies must pass shutdown(SHUT_WR) on, not drop it or close fully.",
                time_ns=ev.ts_ns if ev else c.first_ts_ns, silence_s=round(silence, 3),
                shutdown_frame=shut.shutdown_frame)


def _unconsumed(c: Connection, d: int) -> int | None:
    """Bytes side ``d`` sent that its peer never consumed, counting the fwd_cnt of its RSTs;
    None when unknown (the connection's start, hence fwd_cnt's base, was not captured)."""
    receiver = c.sides[1 - d]
    if not c.start_seen or receiver.fwd_cnt is None:
        return None
    fwd = receiver.fwd_cnt
    for ev in c.events:
        newer = 0 < (ev.fwd_cnt - fwd) % _U32 < _U32 // 2
        if ev.op == Op.RST and ev.sender == 1 - d and ev.buf_alloc and newer:
            fwd = ev.fwd_cnt
    left = (c.sides[d].bytes - fwd) % _U32
    return left if left < _U32 // 2 else 0


def _abrupt(ctx: _Context, small: set[int]) -> None:
    for c in ctx.conns:
        if c.stream in small or c.close not in (Close.GRACEFUL, Close.RESET_BY_CLIENT,
                                                 Close.RESET_BY_SERVER):
            continue
        if c.stream in ctx.unestablished or (c.start_seen and c.response_frame is None):
            continue  # a connect that failed is not a close
        rst = _event(c, c.close_frame) if c.close != Close.GRACEFUL else None
        if rst is None:
            rst = next((e for e in c.events if e.op == Op.RST), None)
        if rst is None:
            continue
        lost = _lost(ctx, c, rst.ts_ns)
        if c.close == Close.GRACEFUL and not lost:
            continue
        by = c.sides[rst.sender]
        lost_text = "".join(f"; {n} bytes {c.sides[d].addr} sent were never consumed"
                            for d, n in lost)
        evidence = {f"{c.sides[d].role}_unconsumed": n for d, n in lost}
        if c.close != Close.GRACEFUL:
            ctx.add("abrupt-close", c, [rst.frame],
                    f"{by.role} {by.addr} reset the connection (RST, frame {rst.frame}) "
                    f"without shutting it down first{lost_text}.",
                    f"{by.addr} dropped the connection instead of closing it: its process was "
                    f"killed or crashed, its transport was reset, or it no longer knew the "
                    f"connection and answered with RST.",
                    "Close with shutdown(SHUT_WR), read to EOF, then close(); look at what "
                    f"happened to {by.addr}'s application or VM at that moment.",
                    kind="reset", time_ns=rst.ts_ns, rst_frame=rst.frame, **evidence)
            continue
        d, n = lost[0]
        receiver = c.sides[1 - d]
        closer = _event(c, receiver.shutdown_frame) or rst
        also = "".join(f"; {m} bytes from {c.sides[e].addr} were left unread too"
                       for e, m in lost[1:])
        ctx.add("abrupt-close", c, [closer.frame, rst.frame],
                f"{receiver.role} {receiver.addr} closed (frame {closer.frame}) with {n} bytes "
                f"from {c.sides[d].addr} unread; they were discarded when the connection was "
                f"reset (frame {rst.frame}){also}.",
                "close() with unread data: the application closed the socket without reading "
                "what its peer had sent. vsock keeps no unread data after close.",
                "Before close(): shutdown(SHUT_WR), then read until EOF (read() = 0); or make "
                "the protocol say when each side is done.",
                kind="unread", time_ns=closer.ts_ns, rst_frame=rst.frame, **evidence)


def _lost(ctx: _Context, c: Connection, reset_ns: int) -> list[tuple[int, int]]:
    """(sender, bytes) of data never consumed and waiting long enough before the reset."""
    out = []
    for d in (CLIENT, SERVER):
        n = _unconsumed(c, d)
        since = ctx.digest.pending.get((c.stream, d))
        if n and since is not None and (reset_ns - since) / 1e9 >= ctx.t.unread_grace_s:
            out.append((d, n))
    return out


def _small_packet_reset(ctx: _Context) -> set[int]:
    found = set()
    for c in ctx.conns:
        if c.close not in (Close.RESET_BY_CLIENT, Close.RESET_BY_SERVER):
            continue
        rst = ctx.digest.resets.get(c.stream)
        if rst is None:
            continue
        d = 1 - rst.sender
        small = ctx.digest.small_rw.get((c.stream, d), 0)
        credit = rst.limit[d] - rst.in_flight[d]
        if small < ctx.t.small_rw_count or rst.limit[d] < 0 or credit <= 0:
            continue
        sender, receiver = c.sides[d], c.sides[rst.sender]
        found.add(c.stream)
        ctx.add("small-packet-reset", c, [rst.frame],
                f"{receiver.addr} reset the connection (frame {rst.frame}) after {small} RW "
                f"packets under {ctx.t.small_rw_bytes} bytes from {sender.addr}, while the "
                f"sender still had {credit} of {rst.limit[d]} bytes of credit.",
                "The receiver charges per-packet overhead against its buffer: many small "
                "packets used it up long before the byte credit ran out, so it dropped data "
                "(ENOBUFS) and reset the connection (e.g. libkrun #795).",
                "Raise SO_VM_SOCKETS_BUFFER_SIZE on the receiver and coalesce small writes "
                "(buffer them, write larger chunks).",
                time_ns=rst.ts_ns, small_writes=small, credit_left=credit,
                buf_alloc=rst.limit[d])
    return found


def _credit_violation(ctx: _Context) -> None:
    for (sid, d), e in sorted(ctx.digest.beyond.items()):
        c = ctx.conns[sid]
        sender, receiver = c.sides[d], c.sides[1 - d]
        ev = sender.violations.get(Violation.BEYOND_CREDIT)
        count = ev.count if ev else e.count
        ctx.add("credit-violation", c, [e.first_frame, e.last_frame],
                f"{sender.role} {sender.addr} sent {count} RW packet(s) beyond the credit "
                f"{receiver.addr} advertised: the first at frame {e.first_frame} carried "
                f"{e.length} bytes with {max(e.credit, 0)} bytes of credit left; at worst "
                f"{e.max_in_flight} bytes were in flight for a {e.limit}-byte buffer.",
                "The sender ignores flow control: it must keep the bytes in flight within the "
                "peer's buf_alloc minus what the peer has not consumed (fwd_cnt). A transport "
                "bug; the receiver may drop the excess or reset.",
                "Fix the sender's vsock implementation (VMM device, driver or user-space "
                "stack) to honour buf_alloc and fwd_cnt.",
                time_ns=e.first_ns, packets=count, first_len=e.length,
                credit_before=e.credit, max_in_flight=e.max_in_flight, buf_alloc=e.limit)


def _tap_length(ctx: _Context) -> None:
    tl = ctx.digest.tap_length
    if not tl.count:
        return
    length, captured = tl.detail
    streams = sorted(tl.streams)
    ctx.add("tap-length", ctx.conns[streams[0]], tl.frames,
            f"{tl.count} frame(s) carry a payload of another length than their virtio header's "
            f"len (first at frame {tl.frames[0]}: captured {captured} bytes, len {length}). "
            f"This analysis used the header's len.",
            "The kernel's tap-length bug: before the 2026 fix \"fix length and offset in tap "
            "skb for split packets\", vhost-vsock tapped every non-final fragment of a split "
            "packet with all the bytes still to send. The traffic itself is fine.",
            "Nothing to fix in the traffic. Trust len (vsockmon does); Wireshark shows the "
            "surplus as payload. A kernel with the fix captures the right lengths.",
            streams=streams, time_ns=tl.first_ns, frames_affected=tl.count,
            example_len=length, example_captured=captured)


def _mid_capture(ctx: _Context) -> None:
    for c in ctx.conns:
        if not c.start_seen and c.stream not in ctx.open_end_explained:
            ctx.add("mid-capture", c, [c.first_frame],
                    f"The capture began after this connection started: its first frame "
                    f"({c.first_frame}) is not a REQUEST. Its byte counts are what the capture "
                    f"saw; credit figures are lower bounds.",
                    "The connection was opened before the capture started.",
                    "Start the capture before the connection opens to see it whole.",
                    kind="start")
        if ctx.final and c.close in _OPEN_ENDS and c.stream not in ctx.open_end_explained:
            state = "still connecting" if c.close == Close.UNANSWERED else str(c.close)
            ctx.add("mid-capture", c, [c.last_frame],
                    f"The capture ended while this connection was {state} (last packet at "
                    f"frame {c.last_frame}).",
                    "The capture stopped before the connection closed.",
                    "Stop the capture after the connection closes to see how it ends.",
                    kind="end", time_ns=c.last_ts_ns)


def evaluate(conns: Iterable[Connection], digest: Digest, thresholds: Thresholds | None = None,
             end_ns: int | None = None, final: bool = True) -> list[Finding]:
    """Every finding, ranked (most severe first, then by stream and frame).

    ``conns`` are the tracker's connections in stream order (a ConnTable will do); ``end_ns``
    is when the capture ended (default: its last packet); ``final`` False leaves out what only
    the capture's end can tell (connections it cut off), for live use.
    """
    end = max(end_ns or 0, digest.end_ns or 0)
    ctx = _Context(list(conns), digest, thresholds or digest.t, end, final)
    _cid_mismatch(ctx)
    _state_lost(ctx)
    _refusals(ctx)
    _unanswered(ctx)
    _dial_retry(ctx)
    _window_full(ctx)
    _half_close(ctx)
    small = _small_packet_reset(ctx)
    _abrupt(ctx, small)
    _credit_violation(ctx)
    _tap_length(ctx)
    _mid_capture(ctx)
    return rank(ctx.findings)


def rank(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first; then by stream (capture-wide last) and first frame."""
    return sorted(findings, key=lambda f: (-f.severity, f.stream is None, f.stream or 0,
                                           f.frames[:1], f.rule))


# -- driving it -----------------------------------------------------------------------------


class Diagnosis:
    """Tracker and digest fed together; :meth:`findings` whenever you want them."""

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        self.thresholds = thresholds or Thresholds()
        self.tracker = ConnTracker()
        self.digest = Digest(self.thresholds)

    def feed(self, fb: FrameBatch) -> Tags:
        tags = self.tracker.feed(fb)
        self.digest.feed(fb, tags)
        return tags

    def connections(self) -> list[Connection]:
        return list(self.tracker.finish())

    def findings(self, end_ns: int | None = None, final: bool = True,
                 conns: Sequence[Connection] | None = None) -> list[Finding]:
        return evaluate(self.connections() if conns is None else conns, self.digest,
                        self.thresholds, end_ns, final)


@dataclass(frozen=True)
class Report:
    """A whole capture's diagnosis."""

    findings: list[Finding]
    connections: list[Connection]
    frames: int
    start_ns: int | None
    end_ns: int | None


def diagnose_batches(batches: Iterable[FrameBatch], thresholds: Thresholds | None = None,
                     end_ns: int | None = None) -> Report:
    """Diagnose a capture's decoded batches (see :func:`vsockmon.decode.frames.decode_batches`)."""
    d = Diagnosis(thresholds)
    for fb in batches:
        d.feed(fb)
    conns = d.connections()
    return Report(d.findings(end_ns, conns=conns), conns, d.digest.frames, d.digest.start_ns,
                  d.digest.end_ns)


class LiveDiagnosis(Diagnosis):
    """Findings reported once each, as soon as they are certain, during a capture.

    Call :meth:`update` with the current time after feeding (or on a timer while idle): it
    returns the findings not reported before. What depends on the capture's end waits for
    :meth:`close`.
    """

    def __init__(self, thresholds: Thresholds | None = None) -> None:
        super().__init__(thresholds)
        self._seen: set[tuple[str, str | None, int | None]] = set()
        self._next_frame = 1

    def feed(self, fb: FrameBatch) -> Tags:
        self._next_frame = fb.first + len(fb)
        return super().feed(fb)

    def feed_frames(self, frames: Sequence[tuple[int, bytes, int]]) -> Tags:
        """Feed captured ``(ts_ns, frame bytes, length on the wire)`` tuples, numbered on
        from the last frame fed (the live capture's frames, in the order it writes them)."""
        batch = RecordBatch(b"".join(data for _, data, _ in frames))
        offset = 0
        for ts, data, orig in frames:
            batch.offsets.append(offset)
            batch.caplens.append(len(data))
            batch.orig_lens.append(orig)
            batch.ts_ns.append(ts)
            offset += len(data)
        return self.feed(decode_batch(batch, self._next_frame))

    def update(self, now_ns: int) -> list[Finding]:
        return self._new(self.findings(now_ns, final=False))

    def close(self, now_ns: int | None = None) -> list[Finding]:
        return self._new(self.findings(now_ns, final=True))

    def _new(self, findings: list[Finding]) -> list[Finding]:
        out = []
        for f in findings:
            key = (f.rule, f.kind, f.stream)
            if key not in self._seen:
                self._seen.add(key)
                out.append(f)
        return out


def findings_by_stream(findings: Iterable[Finding]) -> dict[int | None, list[Finding]]:
    """Findings per connection (every stream a finding concerns), ranked; None: capture-wide."""
    out: dict[int | None, list[Finding]] = defaultdict(list)
    for f in findings:
        for s in f.streams or (None,):
            out[s].append(f)
    return {k: rank(v) for k, v in out.items()}


def findings_by_frame(findings: Iterable[Finding]) -> dict[int, list[Finding]]:
    """Findings per evidence frame: for markers, packet comments and expert info."""
    out: dict[int, list[Finding]] = defaultdict(list)
    for f in findings:
        for n in f.frames:
            out[n].append(f)
    return dict(out)


def frame_notes(findings: Iterable[Finding]) -> dict[int, list[str]]:
    """One line per finding at each of its frames — ``ERROR no-listener: <message>`` — for
    timeline markers and packet comments."""
    out: dict[int, list[str]] = defaultdict(list)
    for f in rank(findings):
        for n in f.frames:
            out[n].append(f"{str(f.severity).upper()} {f.rule_id}: {f.message}")
    return dict(out)


def markers(findings: Iterable[Finding], shown: Iterable[int]) -> dict[int, list[str]]:
    """Each finding once, at the last of its frames among ``shown`` (a drawing's frames):
    the line of :func:`frame_notes`, where the pattern has become visible."""
    frames = set(shown)
    out: dict[int, list[str]] = defaultdict(list)
    for f in rank(findings):
        mine = [n for n in f.frames if n in frames]
        if mine:
            out[max(mine)].append(f"{str(f.severity).upper()} {f.rule_id}: {f.message}")
    return dict(out)


def worst_by_stream(findings: Iterable[Finding]) -> dict[int, Finding]:
    """The most severe finding of each connection: for a one-column summary (``conns``)."""
    return {s: fs[0] for s, fs in findings_by_stream(findings).items() if s is not None}


def stream_summary(findings: Iterable[Finding], min_severity: Severity = Severity.WARNING
                   ) -> dict[int, str]:
    """Each connection's most severe finding (at ``min_severity`` and up) as
    ``severity rule`` plus ``+N`` for the N others: the diagnosis column of ``conns``."""
    shown = [f for f in findings if f.severity >= min_severity]
    out = {}
    for stream, found in findings_by_stream(shown).items():
        if stream is not None:
            more = f" +{len(found) - 1}" if len(found) > 1 else ""
            out[stream] = f"{found[0].severity} {found[0].rule_id}{more}"
    return out


def select(findings: Iterable[Finding], rules: Sequence[str] = (),
           min_severity: Severity = Severity.INFO) -> list[Finding]:
    """Findings of the given rules (``rule`` or ``rule/kind``) at or above a severity."""
    wanted = set(rules)
    return [f for f in findings if f.severity >= min_severity
            and (not wanted or f.rule in wanted or f.rule_id in wanted)]

