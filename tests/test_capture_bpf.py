"""The capture filter: classic BPF compiled from the field tables, run by the host's real
kernel on an AF_UNIX datagram socket (the same sk_filter path a packet socket uses), so the
byte order of every comparison and the snap length are checked without any vsock."""

from __future__ import annotations

import socket

import pytest

from tests.helpers import frame
from vsockmon.live import bpf
from vsockmon.live.bpf import BpfFilterError, FrameFilter
from vsockmon.wire.protocol import Op, SockType

BIG_CID = 0x1_0000_0003  # differs from CID 3 only in the high 32 bits


def _through_kernel(flt: FrameFilter, frames: list[bytes]) -> list[bytes]:
    """The frames that come out of a socket with ``flt`` attached, as the kernel cut them."""
    rx, tx = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with rx, tx:
        bpf.attach(rx, flt.bytecode())
        for f in frames:
            tx.send(f)
        rx.setblocking(False)
        out = []
        while True:
            try:
                out.append(rx.recv(1 << 17))
            except BlockingIOError:
                return out


FRAMES = {
    "req 3>2": frame(Op.REQUEST, src=(3, 1025), dst=(2, 1024)),
    "rw 2>3": frame(Op.RW, b"x" * 40, src=(2, 1024), dst=(3, 1025)),
    "rw 4>2": frame(Op.RW, b"y" * 10, src=(4, 5000), dst=(2, 9999)),
    "credit 1>1": frame(Op.CREDIT_UPDATE, src=(1, 700), dst=(1, 9999)),
    "seq rw 5>2": frame(Op.RW, b"z", src=(5, 6), dst=(2, 7), type_=SockType.SEQPACKET, flags=1),
    "rst big": frame(Op.RST, src=(BIG_CID, 1025), dst=(2, 1024)),
    "shutdown port 0x10000": frame(Op.SHUTDOWN, src=(6, 0x10000 + 1024), dst=(2, 1)),
}


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (FrameFilter(), set(FRAMES)),
        (FrameFilter(cids=(3,)), {"req 3>2", "rw 2>3"}),
        (FrameFilter(cids=(BIG_CID,)), {"rst big"}),
        (FrameFilter(cids=(4, 5)), {"rw 4>2", "seq rw 5>2"}),
        (FrameFilter(ports=(1024,)), {"req 3>2", "rw 2>3", "rst big"}),
        (FrameFilter(ports=(9999,)), {"rw 4>2", "credit 1>1"}),
        (FrameFilter(ports=(0x10000 + 1024,)), {"shutdown port 0x10000"}),
        (FrameFilter(ops=(Op.RW,)), {"rw 2>3", "rw 4>2", "seq rw 5>2"}),
        (FrameFilter(ops=(Op.CREDIT_UPDATE, Op.RST)), {"credit 1>1", "rst big"}),
        (FrameFilter(types=(SockType.SEQPACKET,)), {"seq rw 5>2"}),
        (FrameFilter(cids=(3,), ops=(Op.RW,)), {"rw 2>3"}),
        (FrameFilter(cids=(2,), ports=(9999, 1), ops=(Op.RW, Op.SHUTDOWN)),
         {"rw 4>2", "shutdown port 0x10000"}),
        (FrameFilter(cids=(3,), types=(SockType.SEQPACKET,)), set()),
    ],
    ids=lambda v: v.describe() if isinstance(v, FrameFilter) else "",
)
def test_kernel_keeps_exactly_the_matching_frames(flt: FrameFilter, expected: set[str]) -> None:
    kept = _through_kernel(flt, list(FRAMES.values()))
    assert kept == [f for name, f in FRAMES.items() if name in expected]


def test_snaplen_truncates_in_the_kernel() -> None:
    big = frame(Op.RW, bytes(range(256)) * 4)
    kept = _through_kernel(FrameFilter(snaplen=100), [big, FRAMES["req 3>2"]])
    assert kept == [big[:100], FRAMES["req 3>2"][:76]]


def test_a_frame_too_short_for_the_filtered_field_is_dropped() -> None:
    short = FRAMES["rw 2>3"][:40]  # vsockmon header only: no virtio op to compare
    assert _through_kernel(FrameFilter(ops=(Op.RW,)), [short]) == []
    assert _through_kernel(FrameFilter(cids=(2,)), [short]) == [short]


def test_empty_filter_is_a_single_accept() -> None:
    assert FrameFilter(snaplen=1234).program() == [(bpf.RET_K, 0, 0, 1234)]


def test_little_endian_fields_are_compared_as_big_endian_pieces() -> None:
    pieces = bpf.BpfCheck(0, 8, 0x0000_0001_0000_0003).loads()
    assert pieces == [(0, 4, 0x0300_0000), (4, 4, 0x0100_0000)]
    assert bpf.BpfCheck(62, 2, 6).loads() == [(62, 2, 0x0600)]


def test_too_many_values_for_8_bit_jumps_is_a_clear_error() -> None:
    with pytest.raises(BpfFilterError, match="too long"):
        FrameFilter(cids=tuple(range(100, 200))).program()


def test_describe_reads_like_the_options() -> None:
    flt = FrameFilter(cids=(3,), ports=(1024, 1025), ops=(Op.RW,))
    assert flt.describe() == "cid 3 and (port 1024 or port 1025) and op RW"
    assert FrameFilter().describe() == "all frames"


def test_option_parsing() -> None:
    assert bpf.parse_enum(["rw,credit-update", "RST", "3"], Op) == (
        Op.RW, Op.CREDIT_UPDATE, Op.RST, Op.RST)
    assert bpf.parse_enum(["seqpacket"], SockType) == (SockType.SEQPACKET,)
    assert bpf.parse_ints(["3,0x10", "7"], "cid") == (3, 16, 7)
    # The reserved CIDs by the names decode prints (include/uapi/linux/vm_sockets.h:
    # VMADDR_CID_HYPERVISOR 0, VMADDR_CID_LOCAL 1, VMADDR_CID_HOST 2).
    assert bpf.parse_cids(["host,local", "hypervisor", "0x10"]) == (2, 1, 0, 16)
    with pytest.raises(BpfFilterError, match="bad cid: 'guest' is not a CID"):
        bpf.parse_cids(["guest"])
    with pytest.raises(BpfFilterError, match="unknown op 'bogus'"):
        bpf.parse_enum(["bogus"], Op)
    with pytest.raises(BpfFilterError, match="bad port 'x'"):
        bpf.parse_ints(["x"], "port")
    with pytest.raises(BpfFilterError, match="does not fit"):
        FrameFilter(ports=(1 << 32,))
