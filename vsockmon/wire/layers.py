"""Scapy layers for the vsockmon and virtio-vsock headers, derived from the field tables.

Scapy 2.8 knows ``DLT_VSOCK`` (271) and ``ARPHRD_VSOCKMON`` (826) but has no layer for
them, so ``rdpcap`` yields Raw. Importing this module binds :class:`VsockMon` to both: files
and live AF_PACKET sockets then decode. The fast paths of vsockmon do not use scapy; these
layers are for interactive use and for building test packets::

    >>> pkt = VsockMon() / VirtioVsock(src_cid=3, dst_cid=2, op="RW") / b"hi"
    >>> VsockMon(bytes(pkt))[VirtioVsock].len
    2

``VsockMon`` fields left unset are filled from the virtio header when built (CIDs, ports,
transport, its length and the coarse op the kernel would write), and ``VirtioVsock.len``
from the payload, so a hand-built packet is what the kernel would tap.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Any

from scapy.config import conf
from scapy.fields import (
    Field,
    FlagsField,
    LEIntField,
    LELongField,
    LEShortEnumField,
    LEShortField,
    MultipleTypeField,
)
from scapy.packet import Packet, Raw, bind_layers

from vsockmon.wire import protocol as p

_SCAPY_INT = {2: LEShortField, 4: LEIntField, 8: LELongField}


def _enum_dict(enum: type[IntEnum] | type[IntFlag]) -> dict[int, str]:
    return {int(m): name for name, m in enum.__members__.items()}


def _field(f: p.Field, default: int | None) -> Field[Any, Any]:
    """The scapy field for one row of a header table."""
    if f.enum is not None:
        return LEShortEnumField(f.name, default, _enum_dict(f.enum))
    return _SCAPY_INT[f.size](f.name, default)


def _flags_field(f: p.Field) -> MultipleTypeField:
    """Flags whose bit names depend on the op (and type): SHUTDOWN RCV/SEND, SEQPACKET EOM/EOR.

    A negative size is scapy's way of saying little-endian.
    """
    shutdown = FlagsField(f.name, 0, -32, _enum_dict(p.ShutdownFlag))
    seq = FlagsField(f.name, 0, -32, _enum_dict(p.SeqFlag))
    return MultipleTypeField(
        [
            (shutdown, lambda pkt: pkt.op == p.Op.SHUTDOWN),
            (seq, lambda pkt: pkt.op == p.Op.RW and pkt.type == p.SockType.SEQPACKET),
        ],
        LEIntField(f.name, 0),
    )


class VirtioVsock(Packet):
    """The 44-byte virtio-vsock header; the payload is the next ``len`` bytes."""

    name = "virtio-vsock"
    fields_desc = [  # noqa: RUF012 - scapy's declarative field list
        _flags_field(f) if f.name == "flags"
        else _field(f, {"len": None, "type": p.SockType.STREAM}.get(f.name, 0))
        for f in p.VIRTIO_HEADER.fields
    ]

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        if self.len is None:
            offset = p.VIRTIO_HEADER.fields[p.VIRTIO_HEADER.names.index("len")].offset
            pkt = pkt[:offset] + len(pay).to_bytes(4, "little") + pkt[offset + 4 :]
        return pkt + pay

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        """Trust ``len``: bytes past it (the kernel's tap-length bug) become Padding."""
        return s[: self.len], s[self.len :]

    def mysummary(self) -> str:
        return self.sprintf(
            "%src_cid%:%src_port% > %dst_cid%:%dst_port% %type% %op% len=%len% "
            "buf_alloc=%buf_alloc% fwd_cnt=%fwd_cnt%"
        )


_FROM_VIRTIO = ("src_cid", "dst_cid", "src_port", "dst_port")


class VsockMon(Packet):
    """The 32-byte vsockmon header the kernel prepends to every tapped vsock packet."""

    name = "vsockmon"
    fields_desc = [_field(f, None) for f in p.VSOCKMON_HEADER.fields]  # noqa: RUF012

    def post_build(self, pkt: bytes, pay: bytes) -> bytes:
        """Fill unset fields the way the kernel does, from the transport header below."""
        virtio = self.payload if isinstance(self.payload, VirtioVsock) else None
        values = {}
        for f in p.VSOCKMON_HEADER.fields:
            value = getattr(self, f.name)
            if value is None:
                value = _derived(f.name, virtio)
            values[f.name] = value
        return p.VSOCKMON_HEADER.pack(**values) + pay

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        if self.transport == p.Transport.VIRTIO and (self.trans_len or 0) >= p.VIRTIO_HDR_LEN:
            return VirtioVsock
        return Raw

    def mysummary(self) -> str:
        return self.sprintf("vsockmon %op% %transport%")


def _derived(name: str, virtio: VirtioVsock | None) -> int:
    """The value the kernel writes for an unset vsockmon field, given the virtio header."""
    if virtio is None:
        return {"transport": p.Transport.NO_INFO}.get(name, 0)
    if name in _FROM_VIRTIO:
        return int(getattr(virtio, name))
    if name == "op":
        return int(p.MON_OP_OF.get(virtio.op, p.MonOp.UNKNOWN))
    return {"transport": p.Transport.VIRTIO, "trans_len": p.VIRTIO_HDR_LEN}.get(name, 0)


def register() -> None:
    """Bind the layers to link type 271 (files) and netdevice type 826 (live sockets)."""
    conf.l2types.register(p.LINKTYPE_VSOCK, VsockMon)
    conf.l2types.register_num2layer(p.ARPHRD_VSOCKMON, VsockMon)


bind_layers(VsockMon, VirtioVsock, transport=p.Transport.VIRTIO)
register()
