"""Property-based tests (Hypothesis): the capture reader and writers, and the filter language.

- Reader: any records (times, lengths, bytes), any snap length, pcap in µs and ns, pcapng in
  any ``if_tsresol`` (or none), both byte orders, gzipped or not, written by an encoder in
  this file that follows the file-format specifications — the reader must give back exactly
  the records.
- Writers: whatever vsockmon's pcap and pcapng writers write, the reader reads back the same.
- Filters: random expressions over the header fields (every operator, names and numbers,
  ``has``, ``and or not`` and their symbols, parentheses, either case) are generated as a
  tree, printed as text for ``compile_filter``, and evaluated by a small evaluator written
  here over the same decoded fields; the two must select the same frames. (The filter
  compiles straight to closures and has no printer, so there is no parse→print→parse
  round trip to check.)

Runs are kept short (``max_examples`` modest, no deadline) so the suite stays fast.
"""

from __future__ import annotations

import gzip
import io
import operator
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsockmon.decode.filter import compile_filter
from vsockmon.decode.frames import FrameBatch, decode_batches, epoch_seconds
from vsockmon.wire.pcapio import CaptureReader, PcapngWriter, PcapWriter, Record

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

# -- an encoder written from the specifications ------------------------------------------------

PCAP_US, PCAP_NS = 0xA1B2C3D4, 0xA1B23C4D


@dataclass(frozen=True)
class Rec:
    ts_ns: int
    data: bytes
    orig_len: int


def encode_pcap(recs: list[Rec], endian: str, ns: bool, snaplen: int, linktype: int) -> bytes:
    """Classic pcap (tcpdump's savefile format): a 24-byte header, then per record seconds,
    fraction (µs or ns, by the magic), captured and original lengths, data."""
    out = [struct.pack(endian + "IHHiIII", PCAP_NS if ns else PCAP_US, 2, 4, 0, 0, snaplen,
                       linktype)]
    unit = 1 if ns else 1000
    for r in recs:
        sec, frac = divmod(r.ts_ns, 10**9)
        out.append(struct.pack(endian + "IIII", sec, frac // unit, len(r.data), r.orig_len))
        out.append(r.data)
    return b"".join(out)


def _block(endian: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def encode_pcapng(recs: list[Rec], endian: str, tsresol: int | None, snaplen: int,
                  linktype: int) -> bytes:
    """pcapng: a section header, one interface (``if_tsresol`` option when given), one
    enhanced packet block per record with its time in ticks of the interface's unit."""
    shb = _block(endian, 0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = b""
    if tsresol is not None:
        opts = struct.pack(endian + "HH", 9, 1) + bytes([tsresol]) + b"\0\0\0"
    idb = _block(endian, 1, struct.pack(endian + "HHI", linktype, 0, snaplen) + opts
                 + struct.pack(endian + "HH", 0, 0))
    out = [shb, idb]
    for r in recs:
        ticks = r.ts_ns * ticks_per_second(tsresol) // 10**9
        out.append(_block(endian, 6, struct.pack(endian + "IIIII", 0, ticks >> 32,
                                                 ticks & 0xFFFFFFFF, len(r.data), r.orig_len)
                          + r.data))
    return b"".join(out)


def ticks_per_second(tsresol: int | None) -> int:
    """The specification: 10^-n seconds per tick, 2^-n with the high bit set, 10^-6 without
    the option."""
    if tsresol is None:
        return 10**6
    return 2 ** (tsresol & 0x7F) if tsresol & 0x80 else 10 ** tsresol


def read_all(raw: bytes, chunk: int) -> tuple[list[Record], str | None]:
    with CaptureReader(io.BytesIO(raw), chunk=chunk) as reader:
        return list(reader.records()), reader.stopped


# -- the reader -------------------------------------------------------------------------------

record_data = st.binary(max_size=300)


@st.composite
def records(draw: st.DrawFn, unit_ns: int, max_ts: int) -> list[Rec]:
    """Records whose times are whole units of the format (µs, ns or a tick)."""
    out = []
    for data in draw(st.lists(record_data, max_size=12)):
        ts = draw(st.integers(0, max_ts // unit_ns)) * unit_ns
        out.append(Rec(ts, data, len(data) + draw(st.integers(0, 70000))))
    return out


@SETTINGS
@given(st.data(), st.sampled_from("<>"), st.booleans(), st.booleans(),
       st.integers(0, 2**32 - 1), st.sampled_from([1, 7, 64, 1 << 16]))
def test_pcap_reader_reads_any_records(data: st.DataObject, endian: str, ns: bool,
                                       gzipped: bool, snaplen: int, chunk: int) -> None:
    recs = data.draw(records(1 if ns else 1000, 2**32 * 10**9 - 1))
    raw = encode_pcap(recs, endian, ns, snaplen, 271)
    got, stopped = read_all(gzip.compress(raw) if gzipped else raw, chunk)
    assert stopped is None
    assert got == [Record(r.ts_ns, r.orig_len, r.data, 271) for r in recs]


@SETTINGS
@given(st.data(), st.sampled_from("<>"), st.sampled_from([None, 0, 3, 6, 9, 0x80 | 10, 0x80 | 20]),
       st.booleans(), st.integers(0, 2**32 - 1), st.sampled_from([1, 13, 1 << 16]))
def test_pcapng_reader_reads_any_records(data: st.DataObject, endian: str, tsresol: int | None,
                                         gzipped: bool, snaplen: int, chunk: int) -> None:
    per_sec = ticks_per_second(tsresol)
    unit = max(1, 10**9 // per_sec) if 10**9 % per_sec == 0 else 1
    recs = data.draw(records(unit, 2**62))
    raw = encode_pcapng(recs, endian, tsresol, snaplen, 271)
    got, stopped = read_all(gzip.compress(raw) if gzipped else raw, chunk)
    assert stopped is None
    # a time the unit cannot hold is floored to a tick, then read back in ns, floored again
    want = [Record((r.ts_ns * per_sec // 10**9) * 10**9 // per_sec, r.orig_len, r.data, 271)
            for r in recs]
    assert got == want


@pytest.mark.parametrize("chunk", [1, 2, 5, 12, 24, 28, 4096])
def test_pcapng_without_packets_in_small_chunks(chunk: int) -> None:
    """Found by the property above: read one byte at a time, a pcapng that ends with its
    interface description (24 bytes, after a 28-byte section header) was refused as
    "without an interface description" — the reader asked for the section header's size
    again, more than the file had left."""
    raw = encode_pcapng([], "<", None, 0, 271)
    assert len(raw) == 28 + 24
    assert read_all(raw, chunk) == ([], None)


@SETTINGS
@given(st.sampled_from([PcapWriter, PcapngWriter]), st.integers(1, 2**32 - 1),
       records(1, 2**32 * 10**9 - 1), st.booleans())
def test_our_writers_round_trip(writer: type, snaplen: int, recs: list[Rec],
                                gzipped: bool) -> None:
    buf = io.BytesIO()
    w = writer(buf, snaplen=snaplen)
    for r in recs:
        w.write(r.ts_ns, r.data, r.orig_len, comment="c" if len(r.data) % 2 else None)
    raw = buf.getvalue()
    got, stopped = read_all(gzip.compress(raw) if gzipped else raw, 1 << 16)
    assert stopped is None
    assert got == [Record(r.ts_ns, r.orig_len, r.data, 271) for r in recs]


# -- the filter language ------------------------------------------------------------------------

OPS = {"INVALID": 0, "REQUEST": 1, "RESPONSE": 2, "RST": 3, "SHUTDOWN": 4, "RW": 5,
       "CREDIT_UPDATE": 6, "CREDIT_REQUEST": 7}
TYPES = {"STREAM": 1, "SEQPACKET": 2}
FLAG_BITS = {"rcv": (1, 4, None), "send": (2, 4, None), "eom": (1, 5, 2), "eor": (2, 5, 2)}
"""Flag name → (bit, op, type): the kernel's virtio_vsock.h (SHUTDOWN's RCV/SEND, RW's
SEQ_EOM/SEQ_EOR on SEQPACKET)."""
CMPS: dict[str, Callable[[int, int], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
    ">": operator.gt, ">=": operator.ge}
VIRTIO_FIELDS = {"len": "vsock.virtio.len", "op": "vsock.virtio.op",
                 "type": "vsock.virtio.type", "flags": "vsock.virtio.flags",
                 "buf_alloc": "vsock.virtio.buf_alloc", "fwd_cnt": "vsock.virtio.fwd_cnt",
                 "src_port": "vsock.virtio.src_port", "dst_cid": "vsock.virtio.dst_cid",
                 "vsock.virtio.len": "vsock.virtio.len"}
FRAME_FIELDS = {"payload_len": "payload_len", "frame.len": "frame.len",
                "frame.cap_len": "frame.cap_len", "frame": "frame.number"}
EITHER_END = {"cid": ("vsock.virtio.src_cid", "vsock.virtio.dst_cid"),
              "port": ("vsock.virtio.src_port", "vsock.virtio.dst_port")}
NAMES = {"op": OPS, "type": TYPES}


def eval_cmp(rec: dict[str, Any], name: str, cmp: str, value: int) -> bool:
    """``name CMP value`` on one frame, as docs/decode.md defines it: a field of an absent
    header matches nothing; ``cid``/``port`` match when either end does, and ``!=`` there
    means neither end is the value."""
    f = CMPS[cmp]
    if name in EITHER_END:
        if EITHER_END[name][0] not in rec:
            return False
        ends = [rec[k] for k in EITHER_END[name]]
        return all(e != value for e in ends) if cmp == "!=" else any(f(e, value) for e in ends)
    key = VIRTIO_FIELDS.get(name) or FRAME_FIELDS[name]
    return key in rec and f(rec[key], value)


def eval_has(rec: dict[str, Any], flag: str) -> bool:
    bit, op, typ = FLAG_BITS[flag.lower()]
    return ("vsock.virtio.flags" in rec and bool(rec["vsock.virtio.flags"] & bit)
            and rec["vsock.virtio.op"] == op and (typ is None or rec["vsock.virtio.type"] == typ))



def spell(word: str, upper: bool) -> str:
    return word.upper() if upper else word


@st.composite
def leaf(draw: st.DrawFn) -> tuple[str, Callable[[dict[str, Any]], bool]]:
    """A test: ``field CMP value`` (a number, hex, or a name), ``flags has NAME``, or a
    bare field."""
    kind = draw(st.sampled_from(["cmp", "cmp", "cmp", "has", "bare"]))
    if kind == "has":
        flag = draw(st.sampled_from(sorted(FLAG_BITS)))
        text = f"flags has {spell(flag, draw(st.booleans()))}"
        return text, lambda r: eval_has(r, flag)
    names = [*VIRTIO_FIELDS, *FRAME_FIELDS, *EITHER_END]
    name = draw(st.sampled_from(names))
    if kind == "bare":
        return name, lambda r: eval_cmp(r, name, "!=", 0) if name not in EITHER_END else (
            EITHER_END[name][0] in r and any(r[k] != 0 for k in EITHER_END[name]))
    cmp = draw(st.sampled_from(sorted(CMPS)))
    if name in NAMES and draw(st.booleans()):
        word = draw(st.sampled_from(sorted(NAMES[name])))
        value, shown = NAMES[name][word], spell(word.lower(), draw(st.booleans()))
    else:
        value = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 7, 12, 13, 44, 76, 100, 1024, 4096,
                                      9999, 16384, 49152, 65536, 262144]))
        shown = hex(value) if draw(st.booleans()) else str(value)
    return f"{name} {cmp} {shown}", lambda r: eval_cmp(r, name, cmp, value)


def expressions() -> st.SearchStrategy[tuple[str, Callable[[dict[str, Any]], bool]]]:
    def extend(inner: st.SearchStrategy[tuple[str, Callable[[dict[str, Any]], bool]]]
               ) -> st.SearchStrategy[tuple[str, Callable[[dict[str, Any]], bool]]]:
        def conj(pair: tuple[Any, Any, str]) -> tuple[str, Callable[[dict[str, Any]], bool]]:
            (ta, fa), (tb, fb), word = pair
            if word in ("and", "AND", "&&"):
                return f"({ta}) {word} ({tb})", lambda r: fa(r) and fb(r)
            return f"({ta}) {word} ({tb})", lambda r: fa(r) or fb(r)

        def neg(pair: tuple[Any, str]) -> tuple[str, Callable[[dict[str, Any]], bool]]:
            (ta, fa), word = pair
            sep = "" if word == "!" else " "
            return f"{word}{sep}({ta})", lambda r: not fa(r)

        return st.one_of(
            st.tuples(inner, inner, st.sampled_from(["and", "AND", "&&", "or", "Or", "||"]))
            .map(conj),
            st.tuples(inner, st.sampled_from(["not", "NOT", "!"])).map(neg),
        )

    return st.recursive(leaf(), extend, max_leaves=6)


@pytest.fixture(scope="module")
def decoded() -> list[tuple[FrameBatch, list[dict[str, Any]]]]:
    """Every fixture frame of three captures with every op, both types, every flag and the
    odd frames (absent headers), decoded once."""
    from vsockmon.wire.pcapio import open_capture

    out = []
    for name in ("synthetic/stream-all-ops.pcap", "synthetic/seqpacket-ns.pcapng",
                 "synthetic/odd-frames.pcap", "real/host-guest.pcap"):
        with open_capture(str(ROOT / "fixtures" / name)) as reader:
            for fb in decode_batches(reader.batches()):
                out.append((fb, fb.records()))
    return out


@SETTINGS
@given(expressions())
def test_filter_equals_an_independent_evaluator(
        decoded: list[tuple[FrameBatch, list[dict[str, Any]]]],
        expr: tuple[str, Callable[[dict[str, Any]], bool]]) -> None:
    text, truth = expr
    keep = compile_filter(text)
    for fb, recs in decoded:
        assert keep(fb).tolist() == [truth(r) for r in recs], text


@pytest.mark.parametrize("cmp", ["<=", "<", ">=", ">", "==", "!="])
def test_every_operator_at_its_boundary(
        decoded: list[tuple[FrameBatch, list[dict[str, Any]]]], cmp: str) -> None:
    """``len CMP v`` for every v that some frame's len equals, so ``<=`` and ``<`` (or ``>=``
    and ``>``) differ on the very frames that equal v."""
    lens = sorted({r["vsock.virtio.len"] for _fb, recs in decoded for r in recs
                   if "vsock.virtio.len" in r})
    assert len(lens) > 10
    for v in lens:
        keep = compile_filter(f"len {cmp} {v}")
        for fb, recs in decoded:
            assert keep(fb).tolist() == [eval_cmp(r, "len", cmp, v) for r in recs], v


# -- float seconds ------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 10**12),
                          st.integers(2**29 * 10**9 - 10**9, 2**29 * 10**9 + 10**9)),
                min_size=1, max_size=50))
def test_bulk_epoch_seconds_are_the_nearest_double(stamps: list[int]) -> None:
    """Export's ``frame.time_epoch`` column: Python's correctly rounded int / int, in bulk."""
    got = epoch_seconds(np.array(stamps, dtype=np.int64)).tolist()
    assert got == [t / 10**9 for t in stamps]
