"""The field tables and the scapy layers derived from them."""

from __future__ import annotations

import itertools
import struct

import pytest

import vsockmon  # noqa: F401 - registers the layers when scapy is imported
from vsockmon.wire import protocol as p


def test_tables_match_the_kernel_layouts() -> None:
    assert p.VSOCKMON_HEADER.size == 32 and p.VSOCKMON_HEADER.struct.format == "<QQIIHHHH"
    assert p.VIRTIO_HEADER.size == 44 and p.VIRTIO_HEADER.struct.format == "<QQIIIHHIII"
    ws = [f.wireshark for f in p.VIRTIO_HEADER.fields]
    assert "vsock.virtio.src_prot" in ws and "vsock.virtio.src_port" not in ws
    keys = [f.json_key for f in p.VIRTIO_HEADER.fields]
    assert "vsock.virtio.src_port" in keys


def test_layout_gaps_are_rejected() -> None:
    with pytest.raises(ValueError):
        p.Header("bad", (p.Field("a", 0, 4, "x.a", "x.a"), p.Field("b", 6, 2, "x.b", "x.b")))


def test_pack_unpack_round_trip() -> None:
    values = {"src_cid": 2**40, "dst_cid": 3, "src_port": 2**32 - 1, "dst_port": 1024,
              "len": 7, "type": 2, "op": 5, "flags": 3, "buf_alloc": 4096, "fwd_cnt": 99}
    assert p.VIRTIO_HEADER.unpack(p.VIRTIO_HEADER.pack(**values)) == values


@pytest.mark.parametrize(("op", "type_", "flags", "names"), [
    (p.Op.SHUTDOWN, 1, 3, ["RCV", "SEND"]),
    (p.Op.RW, 2, 1, ["EOM"]),
    (p.Op.RW, 2, 3, ["EOM", "EOR"]),
    (p.Op.RW, 1, 1, ["0x1"]),
    (p.Op.SHUTDOWN, 1, 6, ["SEND", "0x4"]),
    (p.Op.RST, 1, 0, []),
])
def test_flag_names_depend_on_op_and_type(op: int, type_: int, flags: int,
                                          names: list[str]) -> None:
    assert p.flag_names(op, type_, flags) == names


def test_enum_names_cover_wireshark_gaps() -> None:
    assert p.enum_name(p.Op, 7) == "CREDIT_REQUEST"
    assert p.enum_name(p.SockType, 2) == "SEQPACKET"
    assert p.enum_name(p.Op, 42) == "UNKNOWN(42)"


FLAGS_FOR = {p.Op.SHUTDOWN: (0, 1, 2, 3), p.Op.RW: (0, 1, 2, 3)}


@pytest.mark.parametrize(("op", "type_"), list(itertools.product(p.Op, (1, 2))))
def test_scapy_round_trip_every_op_type_and_flag(op: p.Op, type_: int) -> None:
    from scapy.compat import raw

    from vsockmon.wire.layers import VirtioVsock, VsockMon

    for flags in FLAGS_FOR.get(op, (0,)):
        payload = b"data" if op == p.Op.RW else b""
        built = VsockMon() / VirtioVsock(src_cid=3, dst_cid=2, src_port=1025, dst_port=9999,
                                         op=int(op), type=type_, flags=flags, buf_alloc=65536,
                                         fwd_cnt=12) / payload
        data = raw(built)
        mon = p.VSOCKMON_HEADER.unpack(data)
        virtio = p.VIRTIO_HEADER.unpack(data, 32)
        assert mon["op"] == p.MON_OP_OF.get(op, p.MonOp.UNKNOWN)
        assert (mon["transport"], mon["trans_len"]) == (p.Transport.VIRTIO, 44)
        assert mon["src_cid"] == 3 and mon["dst_port"] == 9999
        assert virtio == {"src_cid": 3, "dst_cid": 2, "src_port": 1025, "dst_port": 9999,
                          "len": len(payload), "type": type_, "op": op, "flags": flags,
                          "buf_alloc": 65536, "fwd_cnt": 12}
        again = VsockMon(data)
        assert raw(again) == data
        assert again[VirtioVsock].op == op and int(again[VirtioVsock].flags) == flags
        assert again[VirtioVsock].payload.load == payload if payload else True


def test_scapy_names_flags_by_op() -> None:
    from vsockmon.wire.layers import VirtioVsock, VsockMon

    shut = VsockMon(bytes(VsockMon() / VirtioVsock(op="SHUTDOWN", flags=3)))
    seq = VsockMon(bytes(VsockMon() / VirtioVsock(op="RW", type="SEQPACKET", flags=1) / b"m"))
    assert str(shut[VirtioVsock].flags) == "RCV+SEND"
    assert str(seq[VirtioVsock].flags) == "EOM"


def test_scapy_trusts_len_over_surplus_tap_bytes() -> None:
    from scapy.packet import Padding

    from vsockmon.wire.layers import VirtioVsock, VsockMon

    data = bytes(VsockMon() / VirtioVsock(op="RW") / b"abc") + b"surplus"
    pkt = VsockMon(data)
    assert pkt[VirtioVsock].payload.load == b"abc"
    assert pkt[Padding].load == b"surplus"


def test_scapy_no_info_transport_is_header_plus_payload() -> None:
    from scapy.packet import Raw

    from vsockmon.wire.layers import VsockMon

    data = p.VSOCKMON_HEADER.pack(src_cid=1, dst_cid=1, transport=1, op=4) + b"opaque"
    pkt = VsockMon(data)
    assert pkt[Raw].load == b"opaque"


def test_rdpcap_decodes_after_import(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from scapy.config import conf
    from scapy.utils import rdpcap

    from vsockmon.wire.layers import VirtioVsock, VsockMon

    path = tmp_path / "one.pcap"
    frame = bytes(VsockMon() / VirtioVsock(op="REQUEST", src_cid=3, dst_cid=2))
    path.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 271)
                     + struct.pack("<IIII", 1, 0, len(frame), len(frame)) + frame)
    pkt = rdpcap(str(path))[0]
    assert isinstance(pkt, VsockMon) and pkt[VirtioVsock].op == p.Op.REQUEST
    assert conf.l2types.num2layer[p.ARPHRD_VSOCKMON] is VsockMon


def test_import_hook_registers_when_scapy_comes_later() -> None:
    import subprocess
    import sys

    code = ("import sys, vsockmon; assert 'scapy' not in sys.modules; "
            "from scapy.config import conf; import scapy.packet; "
            "print(conf.l2types.num2layer[271].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "VsockMon"


@pytest.mark.parametrize(("text", "cid"), [
    ("host", 2), ("HOST", 2), ("Local", 1), ("hypervisor", 0), ("any", 0xFFFFFFFF),
    ("3", 3), ("0x10", 16), ("0o17", 15),
    ("0", 0), ("4294967295", 0xFFFFFFFF),  # both ends of the u32 CID range are CIDs
])
def test_parse_cid_takes_names_in_any_case_and_numbers_in_any_base(text: str, cid: int) -> None:
    assert p.parse_cid(text) == cid


@pytest.mark.parametrize("text", ["nonsense", "-1", "4294967296", "", "3.5"])
def test_parse_cid_refuses_what_is_not_a_u32_or_a_name(text: str) -> None:
    # the message names the text, the range and every name, in CID_NAMES' order
    want = (f"{text!r} is not a CID (a number from 0 to 4294967295, or "
            "hypervisor, local, host, any)")
    with pytest.raises(ValueError) as info:
        p.parse_cid(text)
    assert str(info.value) == want
