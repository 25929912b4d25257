"""The bytes of a connection, each direction in order, from its RW packets.

A packet contributes the first ``len`` bytes of its captured payload: the virtio header's
``len`` is the truth (the kernel's tap-length bug can put more after it). Bytes that a snap
length cut off are counted as missing, never invented. On SEQPACKET, EOM closes a message.
No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vsockmon.conntrack.tracker import CLIENT, SERVER
from vsockmon.wire.protocol import Op, SeqFlag


@dataclass(frozen=True, slots=True)
class Chunk:
    """The payload of one RW packet."""

    frame: int
    sender: int
    data: bytes
    missing: int
    """Bytes of ``len`` the capture did not keep (snap length)."""
    flags: int

    @property
    def eom(self) -> bool:
        return bool(self.flags & SeqFlag.EOM)

    @property
    def eor(self) -> bool:
        return bool(self.flags & SeqFlag.EOR)


@dataclass(slots=True)
class Segment:
    """Consecutive chunks of one sender: a STREAM run of bytes, or a SEQPACKET message."""

    sender: int
    frames: list[int] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    missing: int = 0
    eor: bool = False
    complete: bool = False
    """SEQPACKET: the message ended with EOM (False: the capture ended inside it)."""

    def add(self, chunk: Chunk) -> None:
        self.frames.append(chunk.frame)
        self.data += chunk.data
        self.missing += chunk.missing


def chunks(cols: dict[str, np.ndarray], payloads: list[bytes]) -> list[Chunk]:
    """The RW packets of one stream (:class:`StreamRows` columns and payloads), in order."""
    out = []
    for frame, sender, op, length, flags, data in zip(
            cols["frame"].tolist(), cols["sender"].tolist(), cols["op"].tolist(),
            cols["len"].tolist(), cols["flags"].tolist(), payloads, strict=True):
        if op == Op.RW:
            out.append(Chunk(frame, sender, data, length - len(data), flags))
    return out


def segments(parts: list[Chunk], seqpacket: bool) -> list[Segment]:
    """STREAM: runs of consecutive chunks per sender, in capture order. SEQPACKET: whole
    messages, each listed where its EOM was captured (the other side may interleave)."""
    out: list[Segment] = []
    if not seqpacket:
        for ch in parts:
            if not out or out[-1].sender != ch.sender:
                out.append(Segment(ch.sender))
            out[-1].add(ch)
        return out
    open_msg: dict[int, Segment] = {}
    for ch in parts:
        msg = open_msg.setdefault(ch.sender, Segment(ch.sender))
        msg.add(ch)
        if ch.eom:
            msg.complete, msg.eor = True, ch.eor
            out.append(open_msg.pop(ch.sender))
    out += [m for m in open_msg.values() if m.frames]
    return out


def direction_bytes(parts: list[Chunk], sender: int) -> tuple[bytes, int]:
    """Everything one end sent, and how many of those bytes the capture missed."""
    mine = [ch for ch in parts if ch.sender == sender]
    return b"".join(ch.data for ch in mine), sum(ch.missing for ch in mine)


DIRECTIONS = {"c2s": CLIENT, "s2c": SERVER}


def printable(data: bytes) -> str:
    """Text as is where it is printable ASCII (newlines and tabs kept), ``\\xNN`` elsewhere."""
    return "".join(chr(b) if 32 <= b < 127 or b in (9, 10) else f"\\x{b:02x}" for b in data)
