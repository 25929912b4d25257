"""The field tables and the scapy layers at their edges: what the kernel would write for unset
vsockmon fields, which transport gets a virtio layer, flag bits of all 32 positions.

Layouts and values from include/uapi/linux/vsockmon.h (32-byte header: cids u64, ports u32,
op/transport/len/reserved u16) and include/uapi/linux/virtio_vsock.h (44-byte header).
"""

from __future__ import annotations

import numpy as np
import pytest
from scapy.packet import Raw

from vsockmon.wire import protocol as p
from vsockmon.wire.layers import VirtioVsock, VsockMon


def test_header_sizes_offsets_and_dtype() -> None:
    assert (p.MON_HDR_LEN, p.VIRTIO_HDR_LEN) == (32, 44)
    assert p.VSOCKMON_HEADER.struct.format == "<QQIIHHHH"
    assert p.VIRTIO_HEADER.struct.format == "<QQIIIHHIII"
    dt = p.VIRTIO_HEADER.numpy_dtype()
    assert dt.itemsize == 44 and dt.fields["op"][1] == 30 and dt.fields["fwd_cnt"][1] == 40
    assert dt.fields["src_cid"][0] == np.dtype("<u8") and dt.fields["type"][0] == np.dtype("<u2")
    row = np.frombuffer(p.VIRTIO_HEADER.pack(op=5, fwd_cnt=7, src_cid=2**40), dtype=dt)[0]
    assert (int(row["op"]), int(row["fwd_cnt"]), int(row["src_cid"])) == (5, 7, 2**40)


def test_a_layout_with_a_gap_or_odd_size_is_refused() -> None:
    f = p.Field
    with pytest.raises(ValueError, match=r"^h\.b: bad layout$"):
        p.Header("h", (f("a", 0, 4, "x.a", "x.a"), f("b", 5, 4, "x.b", "x.b")))
    with pytest.raises(ValueError, match=r"^h\.a: bad layout$"):
        p.Header("h", (f("a", 0, 3, "x.a", "x.a"),))
    assert p.Header("h", (f("a", 0, 1, "x.a", "x.a"), f("b", 1, 8, "x.b", "x.b"))).size == 9


def test_json_and_wireshark_names() -> None:
    by_name = {f.name: f for f in p.VSOCKMON_HEADER.fields}
    assert by_name["transport"].json_key == "vsock.trans"
    assert by_name["transport"].wireshark == "vsock.trans"
    assert by_name["op"].json_key == "vsock.op"
    v = {f.name: f for f in p.VIRTIO_HEADER.fields}
    assert v["src_port"].json_key == "vsock.virtio.src_port"
    assert v["src_port"].wireshark == "vsock.virtio.src_prot"  # Wireshark's own spelling
    assert v["dst_port"].wireshark == "vsock.virtio.dst_prot"
    assert v["buf_alloc"].wireshark == "vsock.virtio.buf_alloc"


def test_unpack_and_pack() -> None:
    raw = p.VSOCKMON_HEADER.pack(src_cid=3, dst_port=9, reserved=1)
    assert p.VSOCKMON_HEADER.unpack(b"\xff" * 4 + raw, 4) == {
        "src_cid": 3, "dst_cid": 0, "src_port": 0, "dst_port": 9, "op": 0, "transport": 0,
        "trans_len": 0, "reserved": 1}


@pytest.mark.parametrize("bit", range(32))
def test_every_flag_bit_is_named_or_shown(bit: int) -> None:
    value = 1 << bit
    shutdown = {1: "RCV", 2: "SEND"}.get(value, f"{value:#x}")
    seq = {1: "EOM", 2: "EOR"}.get(value, f"{value:#x}")
    assert p.flag_names(p.Op.SHUTDOWN, 1, value) == [shutdown]
    assert p.flag_names(p.Op.SHUTDOWN, 2, value) == [shutdown]
    assert p.flag_names(p.Op.RW, 2, value) == [seq]
    assert p.flag_names(p.Op.RW, 1, value) == [f"{value:#x}"]
    assert p.flag_names(p.Op.CREDIT_UPDATE, 2, value) == [f"{value:#x}"]


def test_all_flag_bits_at_once() -> None:
    names = p.flag_names(p.Op.SHUTDOWN, 1, 0xFFFFFFFF)
    assert names[:2] == ["RCV", "SEND"] and len(names) == 32 and names[-1] == "0x80000000"
    assert p.flag_names(p.Op.RW, 2, 0) == []


def test_cid_labels_and_enum_names() -> None:
    assert [p.cid_label(c) for c in (0, 1, 2, 3, 0xFFFFFFFF)] == [
        "0(hypervisor)", "1(local)", "2(host)", "3", "4294967295(any)"]
    assert p.enum_name(p.SockType, 3) == "DGRAM" and p.enum_name(p.SockType, 0) == "UNKNOWN(0)"
    assert p.enum_name(p.MonOp, 4) == "PAYLOAD" and p.enum_name(p.Transport, 1) == "NO_INFO"
    assert p.LINKTYPE_VSOCK == 271 and p.ARPHRD_VSOCKMON == 826
    assert p.LINKTYPE_NAMES[271] == "VSOCK" and p.LINKTYPE_NAMES[1] == "Ethernet"


# -- scapy ------------------------------------------------------------------------------------

def test_unset_vsockmon_fields_without_a_transport_header() -> None:
    """No transport header below: the kernel's NO_INFO, length 0, op and addresses 0."""
    pkt = VsockMon(bytes(VsockMon() / b"raw"))
    assert (pkt.op, pkt.transport, pkt.trans_len, pkt.src_cid, pkt.dst_port) == (0, 1, 0, 0, 0)
    assert pkt[Raw].load == b"raw"
    assert bytes(VsockMon()) == p.VSOCKMON_HEADER.pack(transport=1)


def test_set_fields_win_over_derived_ones() -> None:
    built = VsockMon(op=3, trans_len=44, src_cid=9) / VirtioVsock(src_cid=3, op="RW") / b"ab"
    mon = p.VSOCKMON_HEADER.unpack(bytes(built))
    assert (mon["op"], mon["src_cid"], mon["transport"]) == (3, 9, 2)
    assert mon["reserved"] == 0 and mon["trans_len"] == 44
    virtio = p.VIRTIO_HEADER.unpack(bytes(VirtioVsock(len=10, op="RW") / b"ab"))
    assert virtio["len"] == 10 and virtio["type"] == 1


@pytest.mark.parametrize(("transport", "trans_len", "layer"), [
    (2, 44, VirtioVsock), (2, 48, VirtioVsock), (2, 43, Raw), (1, 44, Raw), (0, 44, Raw),
])
def test_which_transport_gets_a_virtio_layer(transport: int, trans_len: int,
                                              layer: type) -> None:
    body = bytes(VirtioVsock(op="RW") / b"xy")
    pkt = VsockMon(p.VSOCKMON_HEADER.pack(transport=transport, trans_len=trans_len) + body)
    assert type(pkt.payload) is layer


def test_summaries() -> None:
    pkt = VsockMon(bytes(VsockMon() / VirtioVsock(src_cid=3, dst_cid=2, src_port=1025,
                                                  dst_port=9999, op="RW", buf_alloc=5,
                                                  fwd_cnt=6) / b"hi"))
    assert pkt.mysummary() == "vsockmon PAYLOAD VIRTIO"
    assert pkt[VirtioVsock].mysummary() == (
        "3:1025 > 2:9999 STREAM RW len=2 buf_alloc=5 fwd_cnt=6")


def test_flags_of_other_ops_are_plain_numbers() -> None:
    pkt = VsockMon(bytes(VsockMon() / VirtioVsock(op="RW", type="STREAM", flags=1)))
    assert pkt[VirtioVsock].flags == 1 and str(pkt[VirtioVsock].flags) == "1"
    shut = VsockMon(bytes(VsockMon() / VirtioVsock(op="SHUTDOWN", type="SEQPACKET", flags=2)))
    assert str(shut[VirtioVsock].flags) == "SEND"


def test_field_naming_rules() -> None:
    """A field's JSON key is prefix.key-or-name; Wireshark's name is prefix.ws_name, else the
    same as the JSON key."""
    f = p._f("src_port", 16, 4, "vsock.virtio", ws_name="src_prot")
    assert f == p.Field("src_port", 16, 4, "vsock.virtio.src_port", "vsock.virtio.src_prot",
                        None, "")
    g = p._f("transport", 26, 2, "vsock", key="trans", enum=p.Transport, doc="kind")
    assert g == p.Field("transport", 26, 2, "vsock.trans", "vsock.trans", p.Transport, "kind")
    h = p._f("a", 0, 1, "x", ws_name="w", key="k")
    assert (h.json_key, h.wireshark) == ("x.k", "x.w")


def test_numpy_dtype_of_any_header() -> None:
    f = p.Field
    h = p.Header("h", (f("a", 0, 1, "x.a", "x.a"), f("b", 1, 8, "x.b", "x.b"),
                       f("c", 9, 2, "x.c", "x.c")))
    dt = h.numpy_dtype()
    assert dt.names == ("a", "b", "c") and dt.itemsize == 11
    assert [dt.fields[n][1] for n in dt.names] == [0, 1, 9]
    assert [dt.fields[n][0] for n in dt.names] == [np.dtype("<u1"), np.dtype("<u8"),
                                                   np.dtype("<u2")]
    row = np.frombuffer(bytes([7]) + (2**60).to_bytes(8, "little") + (513).to_bytes(2, "little"),
                        dtype=dt)[0]
    assert (int(row["a"]), int(row["b"]), int(row["c"])) == (7, 2**60, 513)
    assert h.names == ("a", "b", "c") and h.struct.format == "<BQH"


def test_layer_fields_built_afresh() -> None:
    """The scapy fields made from the table rows (built once at import, so built again here):
    widths, defaults, value names, and flag names chosen by op and type."""
    import struct

    from scapy.packet import Packet

    from vsockmon.wire import layers

    by = {f.name: f for f in p.VIRTIO_HEADER.fields}

    class T(Packet):
        name = "t"
        fields_desc = [layers._field(by["type"], 1), layers._field(by["op"], 0),  # noqa: RUF012
                       layers._flags_field(by["flags"]), layers._field(by["buf_alloc"], 7),
                       layers._field(by["src_cid"], 0)]

    assert bytes(T(type=2, op=5, flags=3, src_cid=2**40)) == struct.pack("<HHIIQ", 2, 5, 3, 7,
                                                                          2**40)
    assert (T().type, T().op, T().flags, T().buf_alloc) == (1, 0, 0, 7)
    seq = T(bytes(T(type=2, op=5, flags=3)))
    assert str(seq.flags) == "EOM+EOR" and seq.sprintf("%type% %op%") == "SEQPACKET RW"
    assert str(T(bytes(T(type=1, op=4, flags=1))).flags) == "RCV"
    assert str(T(bytes(T(type=2, op=4, flags=2))).flags) == "SEND"
    assert str(T(bytes(T(type=1, op=5, flags=1))).flags) == "1"
    assert str(T(bytes(T(type=2, op=6, flags=2))).flags) == "2"
    assert layers._enum_dict(p.ShutdownFlag) == {1: "RCV", 2: "SEND"}
    assert layers._enum_dict(p.SockType) == {1: "STREAM", 2: "SEQPACKET", 3: "DGRAM"}


def test_register_binds_the_file_and_the_socket_numbers() -> None:
    from scapy.config import conf

    from vsockmon.wire import layers

    conf.l2types.register(p.LINKTYPE_VSOCK, Raw)
    conf.l2types.register_num2layer(p.ARPHRD_VSOCKMON, Raw)
    try:
        layers.register()
        assert conf.l2types.num2layer[271] is VsockMon
        assert conf.l2types.num2layer[826] is VsockMon
        assert conf.l2types.layer2num[VsockMon] == 271
    finally:
        layers.register()


def test_flag_fields_are_little_endian() -> None:
    """Whatever names the bits, the flags word is little-endian on the wire."""
    from scapy.packet import Packet

    from vsockmon.wire import layers

    by = {f.name: f for f in p.VIRTIO_HEADER.fields}

    class T(Packet):
        name = "t"
        fields_desc = [layers._field(by["type"], 1), layers._field(by["op"], 0),  # noqa: RUF012
                       layers._flags_field(by["flags"])]

    for op, typ in ((4, 1), (5, 2), (5, 1)):
        assert bytes(T(op=op, type=typ, flags=1))[4:] == b"\x01\0\0\0"
