"""The decoder, its text views and the Wireshark comparison, one behaviour per test: each
anomaly on its own, payload shorter and longer than ``len``, both socket types' flag names.

Expected values come from the kernel headers (include/uapi/linux/virtio_vsock.h:
VIRTIO_VSOCK_SHUTDOWN_RCV=1, _SEND=2, VIRTIO_VSOCK_SEQ_EOM=1, _EOR=2, ops 1-7, types
STREAM=1/SEQPACKET=2; include/uapi/linux/vsockmon.h: CONNECT=1 … PAYLOAD=4, transports
UNKNOWN=0/NO_INFO=1/VIRTIO=2, headers of 32 and 44 bytes) and from the frames built here.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import T0, frame, write_pcap

from vsockmon.decode.frames import Frame, decode_batches, epoch_seconds
from vsockmon.decode.render import hexdump, preview, row, summary_line, summary_lines, tree
from vsockmon.decode.verify import (
    Report,
    VerifyError,
    build_report,
    compare,
    known_errors,
    our_records,
    payload_len_mismatch,
    tshark_records,
    verify_with_pyshark,
    ws_payload_len,
    ws_value,
)
from vsockmon.wire.pcapio import PcapWriter, open_capture
from vsockmon.wire.protocol import Op

STREAM, SEQPACKET = 1, 2
MON = struct.Struct("<QQIIHHHH")  # vsockmon.h: cids, ports, op, transport, trans_len, reserved


def decode(tmp_path: Path, frames: list[bytes], orig_lens: list[int] | None = None
           ) -> list[Frame]:
    path = tmp_path / "d.pcap"
    with open(path, "wb") as fp:
        w = PcapWriter(fp)
        for i, f in enumerate(frames):
            w.write(T0 + i * 1_000_000, f, None if orig_lens is None else orig_lens[i])
    with open_capture(str(path)) as r:
        return [f for fb in decode_batches(r.batches()) for f in fb.frames()]


def one(tmp_path: Path, data: bytes, orig_len: int | None = None) -> Frame:
    (f,) = decode(tmp_path, [data], None if orig_len is None else [orig_len])
    return f


def mon_header(op: int = 4, transport: int = 2, trans_len: int = 44,
               addr: tuple[int, int, int, int] = (3, 2, 1025, 9999)) -> bytes:
    return MON.pack(*addr, op, transport, trans_len, 0)


# -- payload length against the header's len -------------------------------------------------

@pytest.mark.parametrize("sock_type", [STREAM, SEQPACKET])
@pytest.mark.parametrize(("payload", "length", "flagged"), [
    (b"abc", 5, True),       # shorter than len
    (b"abcdefg", 5, True),   # longer than len
    (b"abcde", 5, False),
    (b"", 0, False),
    (b"", 1, True),
    (b"x", 0, True),
])
def test_payload_against_len(tmp_path: Path, sock_type: int, payload: bytes, length: int,
                             flagged: bool) -> None:
    f = one(tmp_path, frame(Op.RW, payload, type_=sock_type, length=length))
    assert f.payload == payload and f.payload_len == len(payload)
    assert f.anomalies == (["payload-len-mismatch"] if flagged else [])
    assert f.virtio["len"] == length


def test_a_snapped_payload_is_not_a_len_mismatch(tmp_path: Path) -> None:
    full = frame(Op.RW, b"y" * 50)
    f = one(tmp_path, full[:100], orig_len=len(full))
    assert f.anomalies == ["snaplen"] and f.payload_len == 100 - 76
    assert (f.caplen, f.orig_len) == (100, 126)


# -- one anomaly at a time --------------------------------------------------------------------

def test_each_address_field_mismatch(tmp_path: Path) -> None:
    virtio = frame(Op.RW, b"")[32:]
    addrs = [(3, 2, 1025, 9999), (4, 2, 1025, 9999), (3, 7, 1025, 9999),
             (3, 2, 1026, 9999), (3, 2, 1025, 9998)]
    got = decode(tmp_path, [mon_header(addr=a) + virtio for a in addrs])
    assert [f.anomalies for f in got] == [[]] + [["addr-mismatch"]] * 4
    # the ends shown come from the virtio header when there is one
    assert got[1].addr == (3, 1025, 2, 9999)


@pytest.mark.parametrize(("op", "mon_op"), [
    (Op.REQUEST, 1), (Op.RESPONSE, 1), (Op.RST, 2), (Op.SHUTDOWN, 2), (Op.RW, 4),
    (Op.CREDIT_UPDATE, 3), (Op.CREDIT_REQUEST, 3),
])
def test_the_kernel_op_map(tmp_path: Path, op: Op, mon_op: int) -> None:
    """net/vmw_vsock/virtio_transport_common.c maps each virtio op to one vsockmon op."""
    virtio = frame(op)[32:]
    right = mon_header(op=mon_op) + virtio
    wrong = mon_header(op=mon_op % 4 + 1) + virtio
    assert [f.anomalies for f in decode(tmp_path, [right, wrong])] == [[], ["op-mismatch"]]


def test_unknown_op_and_type(tmp_path: Path) -> None:
    got = decode(tmp_path, [frame(Op.RW, type_=3), frame(Op.RW, type_=4), frame(Op.RW, type_=0),
                            frame(8, type_=1), frame(0, type_=1)])  # type: ignore[arg-type]
    assert [f.anomalies for f in got] == [[], ["unknown-type"], ["unknown-type"],
                                          ["unknown-op"], ["unknown-op"]]
    # ops 0 (INVALID) and 8 are unknown on the wire; the kernel writes vsockmon op 0 for them


@pytest.mark.parametrize(("transport", "trans_len", "want"), [
    (2, 44, []), (2, 40, ["trans-len"]), (2, 48, ["trans-len"]),
    (1, 0, []), (0, 0, []), (3, 0, ["unknown-transport"]),
])
def test_transport_and_its_length(tmp_path: Path, transport: int, trans_len: int,
                                  want: list[str]) -> None:
    body = frame(Op.RW, b"0123456789", length=10)[32:]
    f = one(tmp_path, mon_header(transport=transport, trans_len=trans_len) + body)
    assert f.has_virtio == (transport == 2)
    assert [a for a in f.anomalies if a in ("trans-len", "unknown-transport")] == want
    # the payload starts where trans_len says
    assert f.payload == body[trans_len:]


def test_headers_cut_short(tmp_path: Path) -> None:
    full = frame(Op.RW, b"abc")
    got = decode(tmp_path, [full[:31], full[:32], full[:75], full[:76], b""])
    assert [f.has_mon for f in got] == [False, True, True, True, False]
    assert [f.has_virtio for f in got] == [False, False, False, True, False]
    assert [f.anomalies for f in got] == [["truncated"], ["truncated"], ["truncated"],
                                          ["payload-len-mismatch"], ["truncated"]]
    assert [f.payload_len for f in got] == [0, 0, 0, 0, 0]


def test_records_carry_exact_times_and_names(tmp_path: Path) -> None:
    (f,) = decode(tmp_path, [frame(Op.SHUTDOWN, type_=SEQPACKET, flags=3)])
    rec = f.fields()
    assert rec["frame.time_ns"] == T0 and rec["frame.time_epoch"] == T0 / 1e9
    assert rec["frame.number"] == 1 and rec["frame.len"] == rec["frame.cap_len"] == 76
    assert rec["vsock.op_name"] == "DISCONNECT" and rec["vsock.trans_name"] == "VIRTIO"
    assert rec["vsock.virtio.type_name"] == "SEQPACKET"
    assert rec["vsock.virtio.op_name"] == "SHUTDOWN"
    assert rec["vsock.virtio.flags_names"] == ["RCV", "SEND"]
    assert rec["anomalies"] == [] and rec["payload_len"] == 0


# -- the text views ---------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "sock_type", "flags", "shown"), [
    (Op.SHUTDOWN, STREAM, 1, "RCV"), (Op.SHUTDOWN, STREAM, 2, "SEND"),
    (Op.SHUTDOWN, SEQPACKET, 3, "RCV,SEND"), (Op.SHUTDOWN, SEQPACKET, 2, "SEND"),
    (Op.RW, SEQPACKET, 1, "EOM"), (Op.RW, SEQPACKET, 3, "EOM,EOR"),
    (Op.RW, STREAM, 1, "0x1"), (Op.RW, SEQPACKET, 4, "0x4"), (Op.RST, STREAM, 0x80000000,
                                                            "0x80000000"),
])
def test_flag_names_in_line_tree_and_json(tmp_path: Path, op: Op, sock_type: int, flags: int,
                                          shown: str) -> None:
    f = one(tmp_path, frame(op, type_=sock_type, flags=flags, buf_alloc=7, fwd_cnt=9))
    typ = {STREAM: "STREAM", SEQPACKET: "SEQPACKET"}[sock_type]
    want = (f"     1     0.000000  3:1025 → 2:9999  {typ} {op.name} len=0 [{shown}] "
            "buf_alloc=7 fwd_cnt=9")
    assert summary_line(f, T0) == want
    assert f.fields()["vsock.virtio.flags_names"] == shown.split(",")
    flag_line = next(x for x in tree(f) if x.lstrip().startswith("flags:"))
    assert flag_line == f"    flags:      {flags:#010x} ({shown.replace(',', ', ')})"


def lines_both_ways(tmp_path: Path, frames: list[bytes], t0: int = T0,
                    summary: Any = None) -> list[str]:
    """The per-frame and the bulk summary, which must agree; returns the per-frame ones."""
    path = write_pcap(tmp_path / "l.pcap", frames, step_ns=1_500_000)
    with open_capture(str(path)) as r:
        (fb,) = list(decode_batches(r.batches()))
    slow = [summary_line(f, t0, summary(f.payload[: f.virtio["len"]], 0, 0) if summary
                         and f.has_virtio and f.virtio["len"] else None) for f in fb.frames()]
    fast = summary_lines(fb, np.arange(len(fb)), t0, summary).decode().splitlines()
    assert fast == slow
    return slow


def test_summary_lines_for_every_kind_of_row(tmp_path: Path) -> None:
    got = lines_both_ways(tmp_path, [
        frame(Op.REQUEST, buf_alloc=65536),
        frame(Op.RW, b"hi\n", fwd_cnt=3),
        frame(Op.RW, b"\x00\x01\xff", length=2),
        frame(Op.RW, b"x")[:40],
        b"\x01\x02",
        frame(Op.RW, b"")[:32],
    ], t0=T0 - 250_000_000)
    assert got == [
        "     1     0.250000  3:1025 → 2:9999  STREAM REQUEST len=0 buf_alloc=65536 fwd_cnt=0",
        '     2     0.251500  3:1025 → 2:9999  STREAM RW len=3 buf_alloc=262144 fwd_cnt=3 '
        '"hi\\n"',
        "     3     0.253000  3:1025 → 2:9999  STREAM RW len=2 buf_alloc=262144 fwd_cnt=0 0001 "
        "!payload-len-mismatch",
        "     4     0.254500  3:1025 → 2:9999  - PAYLOAD !truncated",
        "     5     0.256000  ? → ?  - - !truncated",
        "     6     0.257500  3:1025 → 2:9999  - PAYLOAD !truncated",
    ]


def test_times_far_from_the_start_keep_every_microsecond(tmp_path: Path) -> None:
    # 1000 s and 250 µs after t0: exactly 1000.000250 (a divisor off by one part in 10^9
    # would make it 999.999249)
    got = lines_both_ways(tmp_path, [frame(Op.REQUEST)], t0=T0 - 1000 * 10**9 - 250_000)
    assert got[0].startswith("     1  1000.000250  3:1025 → 2:9999  STREAM REQUEST")


def test_several_anomalies_are_all_named_in_order(tmp_path: Path) -> None:
    """A frame whose ends differ between the headers and whose payload is shorter than its
    len: both anomalies, in the order of the anomaly table, in the line and the tree."""
    virtio = frame(Op.RW, b"abc", src=(5, 6), dst=(7, 8), length=5)[32:]
    data = mon_header(addr=(3, 2, 1025, 9999)) + virtio
    (line,) = lines_both_ways(tmp_path, [data])
    assert line.endswith(' "abc" !payload-len-mismatch,addr-mismatch')
    assert tree(one(tmp_path, data))[-1] == "anomalies: payload-len-mismatch, addr-mismatch"


def test_table_row_of_every_kind_of_frame(tmp_path: Path) -> None:
    """The table's columns (see TABLE_HEADERS): "-" for each virtio column a frame does not
    have, "?" for ends it does not have."""
    got = [row(f, T0) for f in decode(tmp_path, [
        frame(Op.RW, b"hi", fwd_cnt=7), frame(Op.RW, b"x")[:40], b"\x01\x02"])]
    assert got == [
        (1, "0.000000", "3:1025", "2:9999", "STREAM", "RW", 2, "-", 262144, 7, '"hi"'),
        # cut at 40 bytes: the payload would start at 32 + trans_len 44, past the end
        (2, "0.001000", "3:1025", "2:9999", "-", "PAYLOAD", "-", "-", "-", "-", ""),
        # shorter than a vsockmon header: no header, so no payload either
        (3, "0.002000", "?", "?", "-", "-", "-", "-", "-", "-", ""),
    ]


def test_payload_summaries_follow_a_bar(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def summary(payload: bytes, _sp: int, _dp: int) -> str | None:
        seen.append(payload)
        return "GET /" if payload.startswith(b"GET") else None

    got = lines_both_ways(tmp_path, [frame(Op.RW, b"GET / HTTP/1.0"), frame(Op.RW, b"zz"),
                                     frame(Op.REQUEST)], summary=summary)
    assert got[0].endswith('"GET / HTTP/1.0" | GET /')
    assert got[1].endswith('"zz"') and "|" not in got[1] and "|" not in got[2]
    assert b"" not in seen  # frames without payload are not asked about


@pytest.mark.parametrize(("data", "want"), [
    (b"", ""),
    (b"abc", '"abc"'),
    (b'say "hi"\t\r\n', '"say \\"hi\\"\\t\\r\\n"'),
    (b"a" * 24, '"' + "a" * 24 + '"'),
    (b"a" * 25, '"' + "a" * 24 + '"…'),
    (b"\x1f", "1f"),
    (b"~\x7f", "7e7f"),
    (b" ~", '" ~"'),
    (bytes(range(30)), bytes(range(24)).hex() + "…"),
])
def test_preview_text_or_hex(data: bytes, want: str) -> None:
    assert preview(data) == want


def test_preview_limit_argument() -> None:
    assert preview(b"abcdef", limit=3) == '"abc"…'
    assert preview(b"abc", limit=3) == '"abc"'


def test_hexdump_lines_and_limits() -> None:
    data = bytes(range(0x1E, 0x1E + 40))
    assert hexdump(data) == [
        "0000  1e 1f 20 21 22 23 24 25 26 27 28 29 2a 2b 2c 2d  .. !\"#$%&'()*+,-",
        "0010  2e 2f 30 31 32 33 34 35 36 37 38 39 3a 3b 3c 3d  ./0123456789:;<=",
        "0020  3e 3f 40 41 42 43 44 45                          >?@ABCDE",
    ]
    assert hexdump(data, limit=16) == [hexdump(data)[0], "… 24 more bytes"]
    assert hexdump(data, limit=17)[-1] == "… 23 more bytes"
    assert hexdump(b"\x7e\x7f" * 9, limit=None, offset_digits=8)[1] == (
        "00000010  7e 7f" + " " * 42 + "  ~.")
    assert hexdump(b"") == []
    assert hexdump(b"x" * 300)[-1] == "… 44 more bytes"
    assert len(hexdump(b"x" * 300, limit=None)) == 19


def test_tree_lists_every_field_with_names(tmp_path: Path) -> None:
    f = one(tmp_path, frame(Op.CREDIT_REQUEST, b"", src=(2, 5), dst=(0xFFFFFFFF, 6),
                            type_=SEQPACKET, buf_alloc=100, fwd_cnt=200))
    ts = f"{T0 // 10**9}.{T0 % 10**9:09d}"
    assert tree(f) == [
        f"Frame 1: 76 bytes captured (76 on the wire), time {ts}",
        "vsockmon header",
        "    src_cid:    2(host)", "    dst_cid:    4294967295(any)", "    src_port:   5",
        "    dst_port:   6", "    op:         3 (CONTROL)", "    transport:  2 (VIRTIO)",
        "    trans_len:  44", "    reserved:   0",
        "virtio-vsock header",
        "    src_cid:    2(host)", "    dst_cid:    4294967295(any)", "    src_port:   5",
        "    dst_port:   6", "    len:        0", "    type:       2 (SEQPACKET)",
        "    op:         7 (CREDIT_REQUEST)", "    flags:      0x00000000",
        "    buf_alloc:  100", "    fwd_cnt:    200",
        "payload: 0 bytes captured",
    ]
    extra = tree(one(tmp_path, frame(Op.RW, b"ab", length=3)), ["decoded: ab"])
    assert extra[-4:] == ["payload: 2 bytes captured", "    0000  61 62" + " " * 42 + "  ab",
                          "    decoded: ab", "anomalies: payload-len-mismatch"]


# -- the Wireshark comparison ----------------------------------------------------------------

def test_ws_value_reads_every_tshark_spelling() -> None:
    assert ws_value("") is None
    assert ws_value("12") == 12
    assert ws_value("0x0010") == 16
    assert ws_value("de:ad:be:ef") == 0xDEADBEEF
    assert ws_value("dead") == 0xDEAD
    assert ws_value("0") == 0


def ours_and_theirs(tmp_path: Path, data: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    path = write_pcap(tmp_path / "o.pcap", [data])
    (rec,) = list(our_records(str(path)))
    (ws,) = list(tshark_records(str(path)))
    return rec, ws


def test_compare_finds_each_field_and_the_payload_length(tmp_path: Path) -> None:
    rec, ws = ours_and_theirs(tmp_path, frame(Op.RW, b"abc", length=3))
    assert compare(rec, ws) == []
    bad = dict(ws, **{"vsock.virtio.dst_prot": "1"})
    (d,) = compare(rec, bad)
    assert (d.frame, d.key, d.ours, d.wireshark) == (1, "vsock.virtio.dst_port", 9999, 1)
    missing = {k: v for k, v in ws.items() if k != "vsock.virtio.fwd_cnt"}
    assert [x.key for x in compare(rec, missing)] == ["vsock.virtio.fwd_cnt"]


def test_known_wireshark_errors_by_frame() -> None:
    whole = {"frame.len": 76, "frame.cap_len": 76, "payload_len": 0}
    assert known_errors({"vsock.virtio.op": 7, "vsock.virtio.type": 2,
                         "vsock.virtio.flags": 1, **whole}) == [
        "op 7 is CREDIT_REQUEST, Wireshark says 'Credit response'",
        "type 2 is SEQPACKET, Wireshark says 'Unknown (2)'",
        "flag bits not decoded by Wireshark (we name them)",
    ]
    assert known_errors({"vsock.virtio.op": 6, "vsock.virtio.type": 1,
                         "vsock.virtio.flags": 0, **whole}) == []
    assert known_errors(whole) == []


def test_report_lines(tmp_path: Path) -> None:
    eleven = Report(frames=12, wireshark_errors={"x": list(range(1, 12))})
    assert eleven.lines() == ["known Wireshark error: x (frames 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 …)",
                              "12 frames compared: vsockmon and Wireshark agree on every field"]
    ten = Report(frames=10, wireshark_errors={"x": list(range(1, 11))})
    assert ten.lines() == ["known Wireshark error: x (frames 1, 2, 3, 4, 5, 6, 7, 8, 9, 10)",
                           "10 frames compared: vsockmon and Wireshark agree on every field"]
    rec, ws = ours_and_theirs(tmp_path, frame(Op.CREDIT_REQUEST))
    r = build_report([rec, rec], [dict(ws, **{"vsock.virtio.fwd_cnt": "5"})])
    assert r.frames == 1  # the shorter side
    assert r.lines() == ["frame 1: vsock.virtio.fwd_cnt: vsockmon 0, Wireshark 5",
                         "known Wireshark error: op 7 is CREDIT_REQUEST, Wireshark says "
                         "'Credit response' (frames 1)",
                         "1 frames compared: 1 fields differ"]


def test_our_records_stop_at_count(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "c.pcap", [frame(Op.RW, b"a")] * 5)
    assert [r["frame.number"] for r in our_records(str(path), 3)] == [1, 2, 3]
    assert list(our_records(str(path), 0)) == []
    assert len(list(our_records(str(path)))) == 5


def test_tshark_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(VerifyError) as e:
        list(tshark_records(str(tmp_path / "missing.pcap")))
    assert str(e.value).startswith("tshark failed: ") and "\n" not in str(e.value)


def test_verify_through_pyshark_agrees_and_names_wireshark_errors(tmp_path: Path) -> None:
    """``decode --verify``'s path: Wireshark's dissector via pyshark, every field compared."""
    from vsockmon.decode.verify import verify_with_pyshark

    path = write_pcap(tmp_path / "v.pcap", [
        frame(Op.CREDIT_REQUEST), frame(Op.RW, b"abc", type_=SEQPACKET, flags=1),
        frame(Op.RW, b"xyz")])
    report = verify_with_pyshark(str(path))
    assert report.frames == 3 and report.disagreements == []
    assert report.wireshark_errors == {
        "op 7 is CREDIT_REQUEST, Wireshark says 'Credit response'": [1],
        "type 2 is SEQPACKET, Wireshark says 'Unknown (2)'": [2],
        "flag bits not decoded by Wireshark (we name them)": [2],
    }
    assert verify_with_pyshark(str(path), count=1).frames == 1


def test_bulk_lines_show_virtio_ends_flags_and_one_byte_payloads(tmp_path: Path) -> None:
    """The compiled summary agrees with the per-frame one where the two headers disagree on
    the ends, on every flag naming, and at a 1-byte payload (shown, and summarised with the
    ports it travelled between)."""
    virtio = frame(Op.RW, b"", src=(5, 6), dst=(7, 8))[32:]
    mismatch = mon_header(addr=(3, 2, 1025, 9999)) + virtio
    frames = [mismatch,
              frame(Op.SHUTDOWN, type_=SEQPACKET, flags=3),
              frame(Op.RW, b"m", type_=SEQPACKET, flags=1, src=(3, 40), dst=(2, 41)),
              frame(Op.RW, b"s", type_=STREAM, flags=1),
              frame(Op.CREDIT_UPDATE, type_=STREAM, flags=2)]

    def summary(payload: bytes, sp: int, dp: int) -> str | None:
        return f"{payload.decode()} {sp}>{dp}"

    path = write_pcap(tmp_path / "b.pcap", frames)
    with open_capture(str(path)) as r:
        (fb,) = list(decode_batches(r.batches()))
    fast = summary_lines(fb, np.arange(len(fb)), T0, summary).decode().splitlines()
    assert fast[0] == ("     1     0.000000  5:6 → 7:8  STREAM RW len=0 buf_alloc=262144 "
                       "fwd_cnt=0 !addr-mismatch")
    assert "  SEQPACKET SHUTDOWN len=0 [RCV,SEND] buf_alloc" in fast[1]
    assert fast[2].endswith('SEQPACKET RW len=1 [EOM] buf_alloc=262144 fwd_cnt=0 "m" | m 40>41')
    assert fast[3].endswith('STREAM RW len=1 [0x1] buf_alloc=262144 fwd_cnt=0 "s" | s 1025>9999')
    assert "STREAM CREDIT_UPDATE len=0 [0x2] buf_alloc" in fast[4]
    slow = [summary_line(f, T0, summary(f.payload, f.virtio["src_port"], f.virtio["dst_port"])
                         if f.virtio["len"] else None) for f in fb.frames()]
    assert fast == slow


# -- bulk columns: exact float times, a subset of rows, one frame of a batch -----------------

def test_epoch_seconds_are_the_nearest_double_to_the_exact_time() -> None:
    """Python's ``int / int`` is correctly rounded: the reference for every time. Among them
    relative times of 1 s and 1000 s where whole seconds plus the rounded fraction miss by
    one unit in the last place, a negative one, the last second before 2^29 s, and real
    capture times."""
    times = [0, 5, 999_999_999, 1_144_272_509, 1_000_377_652_372, -1_144_272_509,
             2**29 * 10**9 - 1, 2**29 * 10**9, T0, T0 + 123_456_789, 1_795_000_000_123_456_789,
             1_700_000_000_397_236_329]  # as a float first: 105 ns off, a different double
    assert 1_144_272_509 / 10**9 != 1 + 144_272_509 / 1e9  # the case the slow path exists for
    got = epoch_seconds(np.array(times, dtype=np.int64)).tolist()
    assert got == [t / 10**9 for t in times]


def test_json_and_lines_of_some_rows_only(tmp_path: Path) -> None:
    """``json_text`` and ``summary_lines`` of a subset of rows (as ``decode -Y`` selects them)
    are those rows' own, also where a row lacks a header (the slow path)."""
    frames = [frame(Op.REQUEST, src=(3, 100 + i)) for i in range(5)]
    frames[3] = frames[3][:40]  # no room for the virtio header
    path = write_pcap(tmp_path / "s.pcap", frames)
    with open_capture(str(path)) as r:
        (fb,) = list(decode_batches(r.batches()))
    records = fb.records()
    for rows in ([1, 3], [0, 4], [3], [0, 1, 2, 3]):
        idx = np.array(rows, dtype=np.int64)
        lines = fb.json_text(idx).decode().splitlines()
        assert [json.loads(x) for x in lines] == [records[i] for i in rows]
        text = summary_lines(fb, idx, T0).decode().splitlines()
        assert text == [summary_line(fb.frame(i), T0) for i in rows]
        assert [line.split()[0] for line in text] == [str(i + 1) for i in rows]


def test_a_frame_of_a_batch_is_its_row(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "f.pcap", [frame(Op.RW, bytes([i]) * i) for i in range(1, 4)])
    with open_capture(str(path)) as r:
        (fb,) = list(decode_batches(r.batches()))
    f = fb.frame(2)
    assert (f.number, f.payload, f.ts_ns) == (3, b"\x03\x03\x03", T0 + 2000)


# -- verify: when Wireshark cannot be run ----------------------------------------------------

def test_without_tshark_both_ways_of_verifying_say_so(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_pcap(tmp_path / "v.pcap", [frame(Op.REQUEST)])
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no tshark on it
    want = "tshark is not installed (apt-get install tshark)"
    with pytest.raises(VerifyError) as e:
        list(tshark_records(str(path)))
    assert str(e.value) == want
    with pytest.raises(VerifyError) as e:
        verify_with_pyshark(str(path))
    assert str(e.value) == want


def test_a_tshark_that_cannot_run_is_one_line(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed tshark that is no program (here: not an executable format) is named."""
    path = write_pcap(tmp_path / "v.pcap", [frame(Op.REQUEST)])
    broken = tmp_path / "bin" / "tshark"
    broken.parent.mkdir()
    broken.write_bytes(b"\0\1\2\3")
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", str(broken.parent))
    with pytest.raises(VerifyError) as e:
        verify_with_pyshark(str(path))
    assert str(e.value).startswith("cannot run tshark through pyshark: ")
    assert "Exec format error" in str(e.value)


def test_without_pyshark_verify_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    path = write_pcap(tmp_path / "v.pcap", [frame(Op.REQUEST)])
    for name in [m for m in sys.modules if m == "pyshark" or m.startswith("pyshark.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyshark", None)  # import pyshark raises ImportError
    with pytest.raises(VerifyError) as e:
        verify_with_pyshark(str(path))
    assert str(e.value) == "pyshark is not installed (pip install pyshark)"


def test_tshark_failure_names_its_last_line(tmp_path: Path) -> None:
    """tshark on a file cut inside a packet fails (exit 2) saying so on its last line."""
    raw = write_pcap(tmp_path / "w.pcap", [frame(Op.RW, b"x" * 40)]).read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(raw[:60])
    with pytest.raises(VerifyError) as e:
        list(tshark_records(str(cut)))
    assert str(e.value) == (f'tshark failed: tshark: The file "{cut}" appears to have been '
                            "cut short in the middle of a packet.")


# -- verify: what Wireshark's own fields say about the payload -------------------------------
# Field names as ``tshark -T fields`` prints them; 76 = 32 (vsockmon) + 44 (trans_len).

def ws_fields(wire: int, cap: int, payload: str, vlen: int | None = None,
              trans_len: int | None = 44) -> dict[str, str]:
    out = {"frame.len": str(wire), "frame.cap_len": str(cap), "vsock.payload": payload}
    if trans_len is not None:
        out["vsock.trans_len"] = str(trans_len)
    if vlen is not None:
        out["vsock.virtio.len"] = str(vlen)
    return out


@pytest.mark.parametrize(("theirs", "due"), [
    (ws_fields(79, 79, "61:62:63", vlen=3), False),    # whole, 3 bytes of len 3
    (ws_fields(78, 78, "61:62", vlen=3), True),        # whole, 2 bytes of len 3
    (ws_fields(80, 80, "61:62:63:64", vlen=3), True),  # whole, 4 bytes of len 3 (tap bug)
    (ws_fields(76, 76, "", vlen=5), True),             # exactly the headers, len 5
    (ws_fields(76, 76, "", vlen=0), False),
    (ws_fields(100, 79, "61:62:63", vlen=5), False),   # cut by the snap length: not whole
    (ws_fields(79, 79, "", vlen=5, trans_len=60), False),  # headers claim more than is there
    (ws_fields(79, 79, "61:62:63"), None),             # no virtio header
    (ws_fields(79, 79, "61:62:63", vlen=3, trans_len=None), None),  # no vsockmon header
    ({}, None),
])
def test_payload_len_mismatch_from_wiresharks_fields(theirs: dict[str, str], due: bool | None
                                                     ) -> None:
    assert payload_len_mismatch(theirs) is due


@pytest.mark.parametrize(("theirs", "shown"), [
    (ws_fields(79, 79, "61:62:63", vlen=3), 3),
    (ws_fields(100, 79, "", vlen=24), 3),    # cut: Wireshark shows none, its lengths leave 3
    (ws_fields(100, 70, "", vlen=24), 0),    # cut inside the headers: nothing left
    (ws_fields(100, 79, "", vlen=24, trans_len=None), 0),  # no header to count from
    (ws_fields(79, 79, "", vlen=3), 0),      # whole and empty
    ({"frame.cap_len": "79", "vsock.trans_len": "44"}, 0),  # no wire length: nothing to add
    ({}, 0),
])
def test_payload_length_wireshark_has(theirs: dict[str, str], shown: int) -> None:
    got = ws_payload_len(theirs)
    assert got == shown and type(got) is int  # a count of bytes


def test_known_error_of_a_snapped_payload() -> None:
    cut = {"frame.len": 100, "frame.cap_len": 79, "payload_len": 3}
    assert known_errors(cut) == ["payload of a frame cut by the snap length not shown by "
                                 "Wireshark (compared with the length its headers leave)"]
    assert known_errors({**cut, "payload_len": 0}) == []
    assert known_errors({**cut, "frame.len": 79}) == []


def test_pyshark_verify_of_a_frame_wireshark_does_not_call_vsock(tmp_path: Path) -> None:
    """A pcapng whose second interface is Ethernet: Wireshark gives that frame no vsock
    fields, which is reported as disagreements on it, not a crash."""
    from test_mutation_pcapio import epb, idb, shb

    path = tmp_path / "mixed.pcapng"
    ether = b"\xff" * 12 + b"\x88\xb5" + b"\0" * 46  # a 60-byte frame of a local EtherType
    path.write_bytes(shb() + idb() + idb(linktype=1) + epb(1, frame(Op.REQUEST))
                     + epb(2, ether, iface=1))
    report = verify_with_pyshark(str(path))
    assert report.frames == 2
    assert {d.frame for d in report.disagreements} == {2}


def test_compare_names_each_frame_field_and_the_anomaly(tmp_path: Path) -> None:
    """The time (to the ns), both lengths and the payload-length anomaly are compared, and a
    field Wireshark does not give is a disagreement with None."""
    rec, ws = ours_and_theirs(tmp_path, frame(Op.RW, b"abc", length=5))
    assert "payload-len-mismatch" in rec["anomalies"] and compare(rec, ws) == []
    t = rec["frame.time_ns"] + 1
    off = dict(ws, **{"frame.time_epoch": f"{t // 10**9}.{t % 10**9:09d}",
                      "frame.len": "1000", "frame.cap_len": "999"})
    assert [(d.key, d.ours, d.wireshark) for d in compare(rec, off)] == [
        ("frame.time_ns", rec["frame.time_ns"], t), ("frame.len", 79, 1000),
        ("frame.cap_len", 79, 999),
        # by these lengths the frame was cut short, so the anomaly would not be due
        ("anomalies: payload-len-mismatch", True, False)]
    assert [(d.key, d.wireshark) for d in compare(rec, {})][:3] == [
        ("frame.time_ns", None), ("frame.len", None), ("frame.cap_len", None)]
    (d,) = compare(dict(rec, anomalies=[]), ws)
    assert (d.key, d.ours, d.wireshark) == ("anomalies: payload-len-mismatch", False, True)


def test_ws_value_of_bytes_printed_without_colons() -> None:
    # pyshark's raw value of a 2-byte field holding 0x0001 little-endian: the bytes, in hex
    assert ws_value("0100") == 0x0100


def test_records_of_a_range_of_rows(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "r.pcap", [frame(Op.RW, b"x" * i) for i in range(5)])
    with open_capture(str(path)) as r:
        (fb,) = list(decode_batches(r.batches()))
    assert [x["frame.number"] for x in fb.records(1, 3)] == [2, 3]
    assert [x["payload_len"] for x in fb.records(3)] == [3, 4]



def test_only_the_frames_of_other_link_types_are_not_vsock(tmp_path: Path) -> None:
    from test_mutation_pcapio import epb, idb, shb

    path = tmp_path / "mixed.pcapng"
    path.write_bytes(shb() + idb() + idb(linktype=1) + epb(1, frame(Op.REQUEST))
                     + epb(2, b"\0" * 60, iface=1) + epb(3, frame(Op.RESPONSE)))
    with open_capture(str(path)) as r:
        got = [f.anomalies for fb in decode_batches(r.batches()) for f in fb.frames()]
    assert ["not-vsock" in a for a in got] == [False, True, False]
