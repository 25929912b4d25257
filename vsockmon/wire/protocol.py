"""The vsockmon and virtio-vsock wire formats: constants, enums and one field table per header.

Everything that knows a field's offset or size derives it from :data:`VSOCKMON_HEADER` and
:data:`VIRTIO_HEADER` — the ``struct`` formats of the per-packet path, the numpy dtypes of the
bulk path, the scapy ``fields_desc``, the JSON keys and the Wireshark field names — so a new
field or a fix is one line here. This module does no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

LINKTYPE_VSOCK = 271
"""pcap link type of vsockmon captures (``DLT_VSOCK``)."""
ARPHRD_VSOCKMON = 826
"""Linux netdevice type of a vsockmon link, as AF_PACKET reports it."""

LINKTYPE_NAMES: Mapping[int, str] = {
    0: "NULL",
    1: "Ethernet",
    101: "Raw IP",
    113: "Linux cooked (SLL)",
    127: "802.11 radiotap",
    228: "IPv4",
    229: "IPv6",
    271: "VSOCK",
    276: "Linux cooked v2 (SLL2)",
}


class MonOp(IntEnum):
    """The vsockmon header's coarse op, mapped by the kernel from the transport's op."""

    UNKNOWN = 0
    CONNECT = 1
    DISCONNECT = 2
    CONTROL = 3
    PAYLOAD = 4


class Transport(IntEnum):
    """Which transport header follows the vsockmon header."""

    UNKNOWN = 0
    NO_INFO = 1
    VIRTIO = 2


class Op(IntEnum):
    """virtio-vsock packet op. Wireshark calls 7 "Credit response"; it is a request."""

    INVALID = 0
    REQUEST = 1
    RESPONSE = 2
    RST = 3
    SHUTDOWN = 4
    RW = 5
    CREDIT_UPDATE = 6
    CREDIT_REQUEST = 7


class SockType(IntEnum):
    """virtio-vsock socket type. Wireshark and tcpdump know only STREAM."""

    STREAM = 1
    SEQPACKET = 2
    DGRAM = 3


class ShutdownFlag(IntFlag):
    """Flag bits of a SHUTDOWN packet: which directions the sender closes."""

    RCV = 1
    SEND = 2


class SeqFlag(IntFlag):
    """Flag bits of an RW packet on a SEQPACKET socket: message and record boundaries."""

    EOM = 1
    EOR = 2


MON_OP_OF: Mapping[Op, MonOp] = {
    Op.REQUEST: MonOp.CONNECT,
    Op.RESPONSE: MonOp.CONNECT,
    Op.RST: MonOp.DISCONNECT,
    Op.SHUTDOWN: MonOp.DISCONNECT,
    Op.RW: MonOp.PAYLOAD,
    Op.CREDIT_UPDATE: MonOp.CONTROL,
    Op.CREDIT_REQUEST: MonOp.CONTROL,
}
"""The kernel's mapping of a virtio op to the vsockmon op it writes in the tap header."""

VIRTIO_HDR_LEN = 44
MON_HDR_LEN = 32

CID_NAMES: Mapping[int, str] = {0: "hypervisor", 1: "local", 2: "host", 0xFFFFFFFF: "any"}
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF


def parse_cid(text: str) -> int:
    """A CID as a user writes it: a number (``3``, ``0x3``) or a reserved CID's name as
    :func:`cid_label` prints it (``host``, ``local``, ``hypervisor``, ``any``). Raises
    ValueError naming the choices."""
    by_name = {name: cid for cid, name in CID_NAMES.items()}
    try:
        cid = by_name[text.lower()] if text.lower() in by_name else int(text, 0)
    except ValueError:
        cid = -1
    if not 0 <= cid <= VMADDR_CID_ANY:
        raise ValueError(f"{text!r} is not a CID (a number from 0 to {VMADDR_CID_ANY}, or "
                         f"{', '.join(by_name)})")
    return cid

_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


@dataclass(frozen=True)
class Field:
    """One header field: where it lies, how wide it is, what it is called and its enum."""

    name: str
    offset: int
    size: int
    json_key: str
    wireshark: str
    enum: type[IntEnum] | None = None
    doc: str = ""


@dataclass(frozen=True)
class Header:
    """A fixed little-endian header described by its fields, in wire order, without gaps."""

    name: str
    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        offset = 0
        for f in self.fields:
            if f.offset != offset or f.size not in _STRUCT_CODES:
                raise ValueError(f"{self.name}.{f.name}: bad layout")
            offset += f.size

    @cached_property
    def size(self) -> int:
        return sum(f.size for f in self.fields)

    @cached_property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join(_STRUCT_CODES[f.size] for f in self.fields))

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def numpy_dtype(self) -> np.dtype[np.void]:
        """A packed numpy dtype with the same layout (numpy is imported only here)."""
        import numpy as np

        return np.dtype(
            {
                "names": list(self.names),
                "formats": [f"<u{f.size}" for f in self.fields],
                "offsets": [f.offset for f in self.fields],
                "itemsize": self.size,
            }
        )

    def unpack(self, buf: bytes | memoryview, offset: int = 0) -> dict[str, int]:
        """Field name → value for the header at ``offset``."""
        return dict(zip(self.names, self.struct.unpack_from(buf, offset), strict=True))

    def pack(self, **values: int) -> bytes:
        """Bytes of a header; missing fields are 0."""
        return self.struct.pack(*(values.get(n, 0) for n in self.names))


def _f(name: str, offset: int, size: int, prefix: str, ws_name: str | None = None,
       enum: type[IntEnum] | None = None, doc: str = "", key: str | None = None) -> Field:
    json_key = f"{prefix}.{key or name}"
    return Field(name, offset, size, json_key, f"{prefix}.{ws_name or key or name}", enum, doc)


VSOCKMON_HEADER = Header(
    "vsockmon",
    (
        _f("src_cid", 0, 8, "vsock", doc="source context id"),
        _f("dst_cid", 8, 8, "vsock", doc="destination context id"),
        _f("src_port", 16, 4, "vsock", doc="source port"),
        _f("dst_port", 20, 4, "vsock", doc="destination port"),
        _f("op", 24, 2, "vsock", enum=MonOp, doc="coarse op: connect/disconnect/control/payload"),
        _f("transport", 26, 2, "vsock", key="trans", enum=Transport, doc="transport header kind"),
        _f("trans_len", 28, 2, "vsock", doc="length of the transport header that follows"),
        _f("reserved", 30, 2, "vsock", doc="reserved, zero"),
    ),
)

VIRTIO_HEADER = Header(
    "virtio",
    (
        _f("src_cid", 0, 8, "vsock.virtio"),
        _f("dst_cid", 8, 8, "vsock.virtio"),
        _f("src_port", 16, 4, "vsock.virtio", ws_name="src_prot"),
        _f("dst_port", 20, 4, "vsock.virtio", ws_name="dst_prot"),
        _f("len", 24, 4, "vsock.virtio", doc="payload length"),
        _f("type", 28, 2, "vsock.virtio", enum=SockType, doc="socket type"),
        _f("op", 30, 2, "vsock.virtio", enum=Op, doc="packet op"),
        _f("flags", 32, 4, "vsock.virtio", doc="SHUTDOWN: RCV/SEND; SEQPACKET RW: EOM/EOR"),
        _f("buf_alloc", 36, 4, "vsock.virtio", doc="sender's receive buffer size"),
        _f("fwd_cnt", 40, 4, "vsock.virtio", doc="bytes the sender has consumed so far"),
    ),
)

assert VSOCKMON_HEADER.size == MON_HDR_LEN and VIRTIO_HEADER.size == VIRTIO_HDR_LEN


@lru_cache(maxsize=4096)
def enum_name(enum: type[IntEnum], value: int) -> str:
    """The member's name, or ``UNKNOWN(n)`` for a value the enum does not define."""
    try:
        return enum(value).name
    except ValueError:
        return f"UNKNOWN({value})"


def flag_names(op: int, sock_type: int, flags: int) -> list[str]:
    """Names of the set flag bits, whose meaning depends on the op (and the type for RW).

    SHUTDOWN uses RCV/SEND; an RW on a SEQPACKET socket uses EOM/EOR. A bit that means nothing
    for that op is named by its value (``0x4``) rather than dropped, so nothing is hidden.
    """
    known: Mapping[int, str] = {}
    if op == Op.SHUTDOWN:
        known = _BIT_NAMES[ShutdownFlag]
    elif op == Op.RW and sock_type == SockType.SEQPACKET:
        known = _BIT_NAMES[SeqFlag]
    names = []
    for bit in range(32):
        value = 1 << bit
        if flags & value:
            names.append(known.get(value, f"{value:#x}"))
    return names


_BIT_NAMES: Mapping[type[IntFlag], Mapping[int, str]] = {
    kind: {int(member): name for name, member in kind.__members__.items()}
    for kind in (ShutdownFlag, SeqFlag)
}


def cid_label(cid: int) -> str:
    """A CID as printed: the number, with the reserved CIDs' names."""
    name = CID_NAMES.get(cid)
    return f"{cid}({name})" if name else str(cid)
