"""Types of the compiled record walk and header gather (``_walk.c``)."""

from collections.abc import Sequence
from typing import Any

from numpy.typing import NDArray
from typing_extensions import Buffer

_Column = Buffer | NDArray[Any]

WALK_END: int
WALK_BAD_RECORD: int
WALK_BAD_BLOCK: int
WALK_CONTROL: int
WALK_BAD_IFACE: int
WALK_BAD_PACKET: int

_Walked = tuple[int, bytes, bytes, bytes, bytes, bytes, int, int, int]

def walk_pcap(buf: Buffer, big_endian: bool, ts_scale: int, linktype: int,
              max_record: int) -> _Walked: ...
def walk_pcapng(buf: Buffer, start: int, big_endian: bool,
                interfaces: Sequence[tuple[int, int, int]], max_record: int) -> _Walked: ...
def gather(buf: Buffer, offsets: _Column, caplens: _Column, mon_len: int, mon_out: _Column,
           virtio_len: int, virtio_out: _Column, transport_at: int,
           transport_virtio: int) -> None: ...
