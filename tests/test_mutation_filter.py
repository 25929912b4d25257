"""The display-filter language at its edges: every operator at the boundary, either-end fields,
flag names owned by their op and socket type, and the one-line errors.

Expected frame numbers are computed in the test from the frames it builds (the generator's
truth) with Python's own operators, never read from the filter's output.
"""

from __future__ import annotations

import operator
from pathlib import Path

import pytest
from helpers import frame, write_pcap

from vsockmon.decode.filter import FIELDS, MAX_DEPTH, FilterError, compile_filter
from vsockmon.decode.frames import decode_batches
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import VSOCKMON_HEADER, MonOp, Op, Transport

STREAM, SEQPACKET = 1, 2

# (virtio op, payload length, src, dst, type, flags, buf_alloc) of frames 1..N
SPECS = [
    (Op.REQUEST, 0, (3, 1025), (2, 9999), STREAM, 0, 1000),
    (Op.RW, 10, (3, 1025), (2, 9999), STREAM, 0, 1000),
    (Op.RW, 11, (2, 9999), (3, 1025), STREAM, 0, 1001),
    (Op.RW, 12, (3, 1025), (2, 9999), STREAM, 0, 999),
    (Op.SHUTDOWN, 0, (3, 1025), (2, 9999), STREAM, 1, 1000),      # RCV
    (Op.SHUTDOWN, 0, (2, 9999), (3, 1025), STREAM, 2, 1000),      # SEND
    (Op.RW, 5, (4, 2000), (5, 3000), SEQPACKET, 1, 1000),         # EOM
    (Op.RW, 5, (5, 3000), (4, 2000), SEQPACKET, 2, 1000),         # EOR
    (Op.RW, 5, (4, 2000), (5, 3000), STREAM, 3, 1000),            # bits 1|2, meaningless
    (Op.SHUTDOWN, 0, (5, 3000), (4, 2000), SEQPACKET, 3, 1000),   # RCV|SEND
    (Op.RST, 0, (2, 9999), (3, 1025), STREAM, 0, 0),
]
N_FULL = len(SPECS)
TRUNCATED = N_FULL + 1
"""A last frame with only the vsockmon header: no virtio field may match it."""


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frames = [frame(op, b"p" * n, src=s, dst=d, type_=t, flags=fl, buf_alloc=b)
              for op, n, s, d, t, fl, b in SPECS]
    frames.append(frame(Op.RW, b"p" * 20)[:VSOCKMON_HEADER.size])
    return write_pcap(tmp_path_factory.mktemp("flt") / "f.pcap", frames)


def matching(capture: Path, expr: str) -> list[int]:
    keep = compile_filter(expr)
    with open_capture(str(capture)) as r:
        return [fb.first + int(i) for fb in decode_batches(r.batches())
                for i in keep(fb).nonzero()[0]]


def where(pred) -> list[int]:  # type: ignore[no-untyped-def]
    return [i for i, spec in enumerate(SPECS, 1) if pred(*spec)]


OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
       ">": operator.gt, ">=": operator.ge}


@pytest.mark.parametrize("cmp", list(OPS))
@pytest.mark.parametrize("value", [10, 11, 12])
def test_every_operator_at_its_boundary(capture: Path, cmp: str, value: int) -> None:
    """``len CMP v`` for v just below, at and above a payload length present in the file."""
    want = where(lambda op, n, *_: OPS[cmp](n, value))
    assert matching(capture, f"len {cmp} {value}") == want


@pytest.mark.parametrize("cmp", list(OPS))
def test_operators_on_a_frame_column(capture: Path, cmp: str) -> None:
    """Frame fields exist on every frame, the truncated one too (``frame`` = its number)."""
    want = [i for i in range(1, TRUNCATED + 1) if OPS[cmp](i, 5)]
    assert matching(capture, f"frame {cmp} 5") == want
    assert matching(capture, f"frame.number {cmp} 0x5") == want


def test_either_end_fields(capture: Path) -> None:
    """cid/port match either end; ``!=`` means neither end; no header, no match."""
    assert matching(capture, "cid == 3") == where(lambda _o, _n, s, d, *_: 3 in (s[0], d[0]))
    assert matching(capture, "cid != 3") == where(lambda _o, _n, s, d, *_: 3 not in (s[0], d[0]))
    assert matching(capture, "port < 2000") == where(
        lambda _o, _n, s, d, *_: s[1] < 2000 or d[1] < 2000)
    assert matching(capture, "port >= 3000") == where(
        lambda _o, _n, s, d, *_: s[1] >= 3000 or d[1] >= 3000)
    assert matching(capture, "src_cid == 2") == where(lambda _o, _n, s, *_: s[0] == 2)
    assert matching(capture, "dst_port == 9999") == where(lambda _o, _n, _s, d, *_: d[1] == 9999)


def test_a_missing_header_matches_nothing_but_frame_fields(capture: Path) -> None:
    assert TRUNCATED not in matching(capture, "len != 5")
    assert TRUNCATED not in matching(capture, "cid != 77")
    assert TRUNCATED in matching(capture, "frame.cap_len == 32")
    assert matching(capture, "frame.cap_len == 32") == [TRUNCATED]
    # the vsockmon header is there: its fields match
    assert TRUNCATED in matching(capture, "mon.op == PAYLOAD")
    assert TRUNCATED in matching(capture, "anomaly has truncated")


def test_bare_field_is_true_when_non_zero(capture: Path) -> None:
    assert matching(capture, "len") == where(lambda _o, n, *_: n != 0)
    assert matching(capture, "flags") == where(lambda _o, _n, _s, _d, _t, fl, _b: fl != 0)
    assert matching(capture, "not buf_alloc") == [
        *where(lambda *spec: spec[6] == 0), TRUNCATED]


@pytest.mark.parametrize(("name", "bit", "op", "sock_type"), [
    ("RCV", 1, Op.SHUTDOWN, None), ("SEND", 2, Op.SHUTDOWN, None),
    ("EOM", 1, Op.RW, SEQPACKET), ("EOR", 2, Op.RW, SEQPACKET),
])
def test_flag_names_belong_to_their_op_and_type(capture: Path, name: str, bit: int, op: Op,
                                                sock_type: int | None) -> None:
    """virtio_vsock.h: RCV=1/SEND=2 are SHUTDOWN bits (either socket type), EOM=1/EOR=2 are
    RW bits of SEQPACKET only; the same bit on another op is not that flag."""
    want = where(lambda o, _n, _s, _d, t, fl, _b: o == op and fl & bit != 0
                 and (sock_type is None or t == sock_type))
    assert want  # the file has one
    assert matching(capture, f"flags has {name}") == want
    assert matching(capture, f"vsock.virtio.flags has {name.lower()}") == want


def test_anomaly_bits_by_name(capture: Path) -> None:
    assert matching(capture, "anomaly has truncated") == [TRUNCATED]
    assert matching(capture, "anomalies has TRUNCATED") == [TRUNCATED]
    assert matching(capture, "anomaly has snaplen") == []


def test_boolean_operators_and_precedence(capture: Path) -> None:
    """and binds tighter than or; not applies to what follows; && || ! are the same."""
    rw = where(lambda o, *_: o == Op.RW)
    small = where(lambda _o, n, *_: n < 11)
    rst = where(lambda o, *_: o == Op.RST)
    assert matching(capture, "op == RST or op == RW and len < 11") == sorted(
        set(rst) | (set(rw) & set(small)))
    assert matching(capture, "(op == RST || op == RW) && len < 11") == sorted(
        (set(rst) | set(rw)) & set(small))
    assert matching(capture, "! op == RW and len < 11") == sorted(
        (set(range(1, TRUNCATED + 1)) - set(rw)) & set(small))
    assert matching(capture, "not not op == RST") == rst
    assert matching(capture, "op == rst AND type == stream OR op == 99") == rst


def test_values_by_name_number_and_hex(capture: Path) -> None:
    shutdown = where(lambda o, *_: o == Op.SHUTDOWN)
    assert matching(capture, "op == SHUTDOWN") == shutdown
    assert matching(capture, f"op == {int(Op.SHUTDOWN)}") == shutdown
    assert matching(capture, "vsock.virtio.op == 0x4") == shutdown
    assert matching(capture, "type == SEQPACKET") == where(lambda *s: s[4] == SEQPACKET)
    disconnect = where(lambda o, *_: o in (Op.SHUTDOWN, Op.RST))
    assert matching(capture, "mon.op == disconnect") == disconnect
    assert matching(capture, "vsock.op == DISCONNECT") == disconnect
    assert MonOp.DISCONNECT == 2 and Transport.VIRTIO == 2
    everything = list(range(1, TRUNCATED + 1))
    assert matching(capture, "trans == VIRTIO") == everything
    assert matching(capture, "vsock.trans == virtio") == everything


def test_whitespace_and_case_do_not_matter(capture: Path) -> None:
    want = where(lambda o, n, *_: o == Op.RW and n <= 10)
    assert matching(capture, "OP==rw&&LEN<=10   ") == want
    assert matching(capture, "  ( op == RW ) and (len<=10)") == want


def test_every_header_field_has_a_filter_name() -> None:
    """Each field answers to its JSON key; virtio fields also to the bare name."""
    assert {"cid", "port", "trans", "frame", "anomaly", "payload_len"} <= FIELDS.keys()
    for name in ("src_cid", "len", "type", "op", "flags", "buf_alloc", "fwd_cnt",
                 "vsock.virtio.len", "mon.src_cid", "vsock.src_cid", "mon.trans_len",
                 "frame.len", "frame.cap_len", "anomalies"):
        assert name in FIELDS


@pytest.mark.parametrize(("expr", "message"), [
    ("", "bad filter: empty expression"),
    ("   ", "bad filter: empty expression"),
    ("cid ==", "bad filter: expression ends too early"),
    ("colour == 3", "bad filter: unknown field 'colour' (try cid, port, op, type, len, flags, "
                    "buf_alloc, fwd_cnt)"),
    ("op == BANANA", "bad filter: 'BANANA' is not a value of op (known: INVALID, REQUEST, "
                     "RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST)"),
    ("len == ten", "bad filter: 'ten' is not a number"),
    ("flags has XYZ", "bad filter: flags has no bit named 'XYZ' (known: eom, eor, rcv, send)"),
    ("len has EOM", "bad filter: len has no bit named 'EOM' (known: eom, eor, rcv, send)"),
    ("anomaly has oops", "bad filter: anomaly has no bit named 'oops' (known: addr-mismatch, "
                         "not-vsock, op-mismatch, payload-len-mismatch, snaplen, trans-len, "
                         "truncated, unknown-op, unknown-transport, unknown-type)"),
    ("cid == nonsense", "bad filter: 'nonsense' is not a CID (a number from 0 to 4294967295, "
                        "or hypervisor, local, host, any)"),
    ("(op == RW", "bad filter: missing ')'"),
    ("op == RW RW", "bad filter: unexpected 'RW'"),
    ("cid == 3 $ and more text", "bad filter: unexpected '$ and more' at column 10"),
])
def test_bad_filters_say_why_in_full(expr: str, message: str) -> None:
    with pytest.raises(FilterError) as e:
        compile_filter(expr)
    assert str(e.value) == message


def test_the_field_table_behind_the_names(capture: Path) -> None:
    """Each filter name reads the column it says, is present where its header is, and knows
    its field's value names: bare and vsock.virtio.* names are the virtio header, mon.* and
    vsock.* the vsockmon header, frame.* every frame. (Built afresh: FIELDS is built once.)"""
    from vsockmon.decode.filter import _build_fields
    from vsockmon.wire.protocol import VIRTIO_HEADER

    fields = _build_fields()
    with open_capture(str(capture)) as r:
        (fb,) = list(decode_batches(r.batches()))
    everywhere = [True] * len(fb)

    def reads(name: str, *cols: list[int], present: list[bool], enum: object = None) -> None:
        spec = fields[name]
        assert [c(fb).tolist() for c in spec.columns] == list(cols), name
        assert spec.present(fb).tolist() == present, name
        assert spec.enum is enum, name

    for f in VIRTIO_HEADER.fields:
        for name in (f.name, f.json_key):
            reads(name, fb.virtio[f.name].tolist(), present=fb.has_virtio.tolist(), enum=f.enum)
    for f in VSOCKMON_HEADER.fields:
        for name in (f"mon.{f.name}", f.json_key):
            reads(name, fb.mon[f.name].tolist(), present=fb.has_mon.tolist(), enum=f.enum)
    reads("trans", fb.mon["transport"].tolist(), present=fb.has_mon.tolist(), enum=Transport)
    reads("cid", fb.virtio["src_cid"].tolist(), fb.virtio["dst_cid"].tolist(),
          present=fb.has_virtio.tolist())
    reads("port", fb.virtio["src_port"].tolist(), fb.virtio["dst_port"].tolist(),
          present=fb.has_virtio.tolist())
    numbers = list(range(1, TRUNCATED + 1))
    for name in ("frame.number", "frame"):
        reads(name, numbers, present=everywhere)
    reads("frame.len", fb.orig_len.tolist(), present=everywhere)
    reads("frame.cap_len", fb.caplen.tolist(), present=everywhere)
    reads("payload_len", fb.payload_len.tolist(), present=everywhere)
    for name in ("anomaly", "anomalies"):
        reads(name, fb.anomalies.tolist(), present=everywhere)
    assert fb.caplen.tolist() == [76 + n for _o, n, *_ in SPECS] + [32]
    assert set(fields) == set(FIELDS)


def test_cids_by_their_names(capture: Path) -> None:
    """CID fields take the reserved CIDs' names (host = 2), in any case, on every spelling."""
    host_src = where(lambda _o, _n, s, *_: s[0] == 2)
    assert host_src and matching(capture, "src_cid == host") == host_src
    assert matching(capture, "vsock.virtio.src_cid == HOST") == host_src
    assert matching(capture, "cid == Host") == where(lambda _o, _n, s, d, *_: 2 in (s[0], d[0]))


def test_bare_two_ended_field_is_true_when_either_end_is_non_zero(tmp_path: Path) -> None:
    """``cid`` alone means "some end is not 0", so a frame from the hypervisor (CID 0) to the
    host matches, and only a frame with both ends 0 fails it; the same for ``port``."""
    path = write_pcap(tmp_path / "z.pcap", [
        frame(Op.REQUEST, src=(0, 0), dst=(2, 7)), frame(Op.REQUEST, src=(0, 5), dst=(0, 0)),
        frame(Op.REQUEST, src=(0, 0), dst=(0, 0))])
    assert matching(path, "cid") == [1]
    assert matching(path, "not cid") == [2, 3]
    assert matching(path, "port") == [1, 2]
    assert matching(path, "!port") == [3]


def test_the_nesting_limit_counts_depth_not_groups(capture: Path) -> None:
    """Groups side by side do not add up: two groups each nested exactly MAX_DEPTH deep
    pass; after a shallow group, one nested MAX_DEPTH + 1 deep is still refused."""
    deep = "(" * MAX_DEPTH + "op == RW" + ")" * MAX_DEPTH
    assert matching(capture, f"{deep} and {deep}") == matching(capture, "op == RW")
    assert matching(capture, " and ".join(["(op == RW)"] * (MAX_DEPTH + 5))) == \
        matching(capture, "op == RW")
    too_deep = "(" * (MAX_DEPTH + 1) + "op == RW" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(FilterError) as e:
        compile_filter(f"(op == RW) and {too_deep}")
    assert str(e.value) == f"bad filter: nested deeper than {MAX_DEPTH} levels"
