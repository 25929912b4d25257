"""The tracker against a plain per-packet reference, on random traffic cut into batches.

The tracker's per-row pass is compiled (conntrack/_track.c) and its state crosses batch
edges in table columns, spills and the key map; bugs hide at those edges. The reference
below follows the same rules one packet at a time, in the most obvious way; both must
produce equal :class:`Connection` objects for every random capture, whatever the batch size.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from helpers import frame, write_pcap

from vsockmon.conntrack.records import _or_per_key, first_per
from vsockmon.conntrack.tracker import (
    CLIENT,
    SERVER,
    Close,
    Connection,
    ConnTracker,
    Event,
    Evidence,
    Side,
    Stalls,
    Violation,
)
from vsockmon.decode.frames import decode_batches
from vsockmon.wire.pcapio import CaptureReader
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType

U32 = 1 << 32
CREDIT_OPS = {Op.REQUEST, Op.RESPONSE, Op.SHUTDOWN, Op.RW, Op.CREDIT_UPDATE, Op.CREDIT_REQUEST}


class RefConn:
    def __init__(self, stream: int, fr: object, v: dict[str, int]) -> None:
        src, dst = (v["src_cid"], v["src_port"]), (v["dst_cid"], v["dst_port"])
        op = v["op"]
        if op == Op.REQUEST:
            client_is_src = True
        elif op == Op.RESPONSE:
            client_is_src = False
        else:
            client_is_src = src[1] >= dst[1]
        self.client_ep = src if client_is_src else dst
        server_ep = dst if client_is_src else src
        self.sides = [Side("client", *self.client_ep), Side("server", *server_ep)]
        self.conn = Connection(stream, v["type"], self.sides[0], self.sides[1],
                               op == Op.REQUEST, fr.number, fr.number, fr.ts_ns, fr.ts_ns)
        self.events: list[Event] = []
        if v["type"] == SockType.SEQPACKET:
            for s in self.sides:
                s.messages = s.records = 0
        # advertised credit per side: [last raw, unwrapped last, max]
        self.adv: list[list[int] | None] = [None, None]
        self.tx = [0, 0]
        self.cmin: list[int | None] = [None, None]
        self.stall_start: list[tuple[int, int] | None] = [None, None]
        self.stalls = [[0, 0, -1, None, None] for _ in range(2)]  # count total max first longest
        self.viol: list[dict[Violation, list[int]]] = [{}, {}]
        self.response_frame: int | None = None
        self.shut_send: list[int | None] = [None, None]

    def credit(self, d: int) -> tuple[int, int] | None:
        """(in_flight, credit) for sender d, or None when the peer's credit is unknown."""
        adv = self.adv[1 - d]
        if adv is None:
            return None
        c = self.tx[d] - adv[2]
        assert self.cmin[d] is not None
        flight = c - self.cmin[d]
        return flight, adv[3] - flight

    def violation(self, d: int, kind: Violation, number: int) -> None:
        e = self.viol[d].setdefault(kind, [0, number, number])
        e[0] += 1
        e[2] = number

    def feed(self, fr: object, v: dict[str, int], tap_length: bool) -> None:
        conn = self.conn
        d = CLIENT if (v["src_cid"], v["src_port"]) == self.client_ep else SERVER
        side = self.sides[d]
        op, number = v["op"], fr.number
        conn.last_frame, conn.last_ts_ns = number, fr.ts_ns
        side.packets += 1
        before = [self.credit(0), self.credit(1)]
        if op == Op.RW:
            side.rw_packets += 1
            side.bytes += v["len"]
            self.tx[d] += v["len"]
            if side.first_rw_frame is None:
                side.first_rw_frame = number
            side.last_rw_frame = number
            if v["type"] == SockType.SEQPACKET:
                side.messages += bool(v["flags"] & SeqFlag.EOM)
                eom_eor = SeqFlag.EOM | SeqFlag.EOR
                side.records += (v["flags"] & eom_eor) == eom_eor
            if before[d] is not None and v["len"] > before[d][1]:
                self.violation(d, Violation.BEYOND_CREDIT, number)
        elif op == Op.CREDIT_UPDATE:
            side.credit_updates += 1
        else:
            if op == Op.CREDIT_REQUEST:
                side.credit_requests += 1
            self.events.append(Event(number, fr.ts_ns, op, d, v["flags"], v["len"],
                                     v["buf_alloc"], v["fwd_cnt"]))
        if op == Op.RESPONSE and self.response_frame is None:
            self.response_frame = number
        if op == Op.SHUTDOWN and v["flags"] & ShutdownFlag.SEND and self.shut_send[d] is None:
            self.shut_send[d] = number
        if op in CREDIT_OPS:
            raw = v["fwd_cnt"]
            if self.adv[d] is None:
                self.adv[d] = [raw, 0, 0, v["buf_alloc"]]
            else:
                last, unw, top, _ = self.adv[d]
                step = (raw - last) % U32
                unw += step - U32 if step >= U32 // 2 else step
                self.adv[d] = [raw, unw, max(top, unw), v["buf_alloc"]]
        for dd in (0, 1):  # running minimum of tx - fwd since the peer's credit is known
            adv = self.adv[1 - dd]
            if adv is not None:
                c = self.tx[dd] - adv[2]
                self.cmin[dd] = c if self.cmin[dd] is None else min(self.cmin[dd], c)
        for dd in (0, 1):
            now = self.credit(dd)
            if now is None:
                continue
            s = self.sides[dd]
            s.max_in_flight = max(s.max_in_flight or 0, now[0])
            s.min_credit = now[1] if s.min_credit is None else min(s.min_credit, now[1])
            st = self.stalls[dd]
            if now[1] <= 0 and self.stall_start[dd] is None:
                self.stall_start[dd] = (fr.ts_ns, number)
                st[0] += 1
                st[3] = st[3] or number
            elif now[1] > 0 and self.stall_start[dd] is not None:
                dur = fr.ts_ns - self.stall_start[dd][0]
                st[1] += dur
                if dur > st[2]:
                    st[2], st[4] = dur, self.stall_start[dd][1]
                self.stall_start[dd] = None
        if op == Op.RW and self.response_frame is None and conn.start_seen:
            self.violation(d, Violation.BEFORE_RESPONSE, number)
        if op == Op.RW and self.shut_send[d] is not None and number > self.shut_send[d]:
            self.violation(d, Violation.AFTER_SHUTDOWN, number)
        if tap_length:
            self.violation(d, Violation.TAP_LENGTH, number)

    def finish(self, end_ns: int) -> Connection:
        """The connection as the capture ended at ``end_ns`` (its latest timestamp): a stall
        still open lasts until then."""
        conn = self.conn
        for d, side in enumerate(self.sides):
            adv = self.adv[d]
            if adv is not None:
                side.buf_alloc = adv[3]
                side.fwd_cnt = (adv[0] - adv[1] + adv[2]) % U32
            count, total, top, first, longest = self.stalls[d]
            open_ = self.stall_start[d] is not None
            if open_:
                dur = end_ns - self.stall_start[d][0]
                total += dur
                if dur > top:
                    top, longest = dur, self.stall_start[d][1]
            side.stalls = Stalls(count, total, max(top, 0), first, longest, open_)
            side.violations = {k: Evidence(*self.viol[d][k])
                               for k in Violation if k in self.viol[d]}
        conn.events = tuple(self.events)
        classify(conn)
        return conn


def classify(conn: Connection) -> None:
    """Handshake, shutdowns, resets and the close kind, read off the events one by one."""
    closed = [False, False]
    first_rst = last_shut = request = None
    response_first = False
    for ev in conn.events:
        side = conn.sides[ev.sender]
        if ev.op == Op.REQUEST:
            request = ev
            conn.request_frame = ev.frame
        elif ev.op == Op.RESPONSE and conn.response_frame is None:
            conn.response_frame = ev.frame
            response_first = first_rst is None
            if request:
                conn.handshake_ns = ev.ts_ns - request.ts_ns
        elif ev.op == Op.SHUTDOWN:
            side.shutdown_flags |= ev.flags
            side.shutdown_frame = side.shutdown_frame or ev.frame
            if first_rst is None:
                closed[ev.sender] |= bool(ev.flags & ShutdownFlag.SEND)
                closed[1 - ev.sender] |= bool(ev.flags & ShutdownFlag.RCV)
                last_shut = ev
        elif ev.op == Op.RST:
            side.rst_count += 1
            side.rst_frame = side.rst_frame or ev.frame
            first_rst = first_rst or ev
    refused = (first_rst is not None and not all(closed) and request is not None
               and not response_first and first_rst.sender == SERVER)
    if first_rst is not None:
        if all(closed):
            conn.close = Close.GRACEFUL
        elif refused:
            conn.close = Close.REFUSED
            conn.handshake_ns = first_rst.ts_ns - request.ts_ns
        else:
            conn.close = Close.RESET_BY_CLIENT if first_rst.sender == CLIENT \
                else Close.RESET_BY_SERVER
    elif last_shut is not None:
        conn.close = Close.CLOSING if all(closed) else Close.HALF_CLOSED
    elif request is not None and conn.response_frame is None:
        conn.close = Close.UNANSWERED
    end = first_rst or last_shut
    if end is not None:
        conn.close_frame, conn.close_by = end.frame, ("client", "server")[end.sender]


def reference(path: Path) -> list[Connection]:
    current: dict[tuple, RefConn] = {}
    conns: list[RefConn] = []
    end_ns = 0
    with CaptureReader(str(path)) as reader:
        for fb in decode_batches(reader.batches()):
            for fr in fb.frames():
                end_ns = max(end_ns, fr.ts_ns)
                if not fr.has_virtio:
                    continue
                v = fr.virtio
                ends = frozenset({(v["src_cid"], v["src_port"]), (v["dst_cid"], v["dst_port"])})
                key = (v["type"], ends)
                if v["op"] == Op.REQUEST or key not in current:
                    current[key] = RefConn(len(conns), fr, v)
                    conns.append(current[key])
                current[key].feed(fr, v, "payload-len-mismatch" in fr.anomalies)
    return [c.finish(end_ns) for c in conns]


def tracked(path: Path, chunk: int) -> list[Connection]:
    tracker = ConnTracker()
    with CaptureReader(str(path), chunk=chunk) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    return list(tracker.finish())


def random_capture(rng: random.Random, path: Path, n: int) -> Path:
    """Interleaved connections with plausible and absurd credit, reuse, junk frames."""
    ports = [1024, 1025, 9999]
    live: list[dict] = []
    frames = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            frames.append(b"\x00" * rng.randrange(0, 40))  # no virtio header
            continue
        if not live or r < 0.15:
            c = {"c": (rng.choice([1, 2, 3, 1 << 40]),  # a CID beyond 32 bits: other keys
                       rng.choice([50000, 50001, 70000, 1025])),
                 "s": (rng.choice([1, 2, 3]), rng.choice(ports)),
                 "type": rng.choice([SockType.STREAM, SockType.SEQPACKET]),
                 "fwd": [rng.choice([0, U32 - 100, rng.randrange(U32)]) for _ in range(2)],
                 "buf": [rng.choice([4096, 65536, 262144, 100]) for _ in range(2)]}
            live.append(c)
            if rng.random() < 0.7:
                frames.append(frame(Op.REQUEST, src=c["c"], dst=c["s"], type_=c["type"],
                                    buf_alloc=c["buf"][0], fwd_cnt=c["fwd"][0]))
                continue
        c = rng.choice(live)
        d = rng.randrange(2)
        src, dst = (c["c"], c["s"]) if d == 0 else (c["s"], c["c"])
        op = rng.choices(list(Op), weights=[1, 2, 3, 4, 3, 30, 10, 2])[0]
        length = rng.choice([0, 1, 5, 100, 4096, 65536])
        payload = b"p" * min(length, 200)
        flags = rng.randrange(4) if op in (Op.SHUTDOWN, Op.RW) else 0
        if rng.random() < 0.7:
            c["fwd"][d] = (c["fwd"][d] + rng.choice([0, 0, 5, 100, 4096])) % U32
        fwd = c["fwd"][d]
        if rng.random() < 0.05:
            fwd = (fwd - rng.randrange(5000)) % U32  # a delayed packet with an older fwd_cnt
        if rng.random() < 0.03:
            fwd = rng.randrange(U32)
        buf = c["buf"][d] if rng.random() < 0.9 else rng.choice([0, 4096, 1 << 31])
        frames.append(frame(op, payload if op == Op.RW else b"", src=src, dst=dst,
                            type_=c["type"], flags=flags, buf_alloc=buf, fwd_cnt=fwd,
                            length=length if op == Op.RW else 0))
    write_pcap(path, frames, step_ns=rng.choice([1, 1000, 10**6]))
    return path


@pytest.mark.parametrize("seed", range(40))
def test_bulk_tracker_equals_reference(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path = random_capture(rng, tmp_path / "r.pcap", rng.choice([20, 200, 1500]))
    want = reference(path)
    assert want, "the generator made no connection"
    for chunk in (150, 1000, 1 << 20):
        got = tracked(path, chunk)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g == w, f"stream {w.stream}, chunk {chunk}"


# -- the results' per-end minimum ------------------------------------------------------

NONE = (1 << 63) - 1


def test_first_per_key_leaves_keys_without_values_unset() -> None:
    keys = np.array([2, 0, 2, 2])
    values = np.array([7, 9, 3, 5])
    assert first_per(keys, values, 4).tolist() == [9, NONE, 3, NONE]


def test_or_per_key_joins_each_run_of_a_key_and_leaves_the_others_zero() -> None:
    # keys ascending: key 1 ORs 1|2, key 3 is 4 alone, key 4 ORs 2|2|8; 0, 2 and 5 have none
    keys = np.array([1, 1, 3, 4, 4, 4])
    values = np.array([1, 2, 4, 2, 2, 8], dtype=np.uint32)
    assert _or_per_key(keys, values, 6).tolist() == [0, 3, 0, 4, 10, 0]
    assert _or_per_key(keys[:0], values[:0], 2).tolist() == [0, 0]
