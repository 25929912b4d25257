"""Synthetic connections for the connection-analysis tests, written the way Linux sends them.

A :class:`Conv` plays both ends of one connection and keeps the credit counters honest
(tx, fwd_cnt) unless a scenario wants them broken; scenarios interleave several and write
one capture with exact timestamps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from helpers import T0, frame

from vsockmon.wire.pcapio import PcapWriter
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType

MS = 1_000_000


@dataclass
class Conv:
    """One connection between ``client`` and ``server``; methods append frames to ``out``."""

    out: list[tuple[int, bytes]]
    client: tuple[int, int] = (1, 50000)
    server: tuple[int, int] = (1, 1234)
    type_: int = SockType.STREAM
    buf: list[int] = field(default_factory=lambda: [262144, 262144])
    fwd: list[int] = field(default_factory=lambda: [0, 0])
    unread: list[int] = field(default_factory=lambda: [0, 0])

    def send(self, side: int, op: Op, payload: bytes = b"", *, flags: int = 0,
             delay: int = 1000, fwd: int | None = None, buf: int | None = None,
             captured: bytes | None = None) -> None:
        """Append one frame from ``side`` (0 client, 1 server), ``delay`` ns after the
        capture's previous frame. ``captured`` replaces the payload bytes written to the
        file (the header's len stays that of ``payload``)."""
        ends = (self.client, self.server)
        src, dst = ends[side], ends[1 - side]
        t = (self.out[-1][0] if self.out else T0) + delay
        data = frame(op, payload if captured is None else captured, src=src, dst=dst,
                     type_=self.type_, flags=flags,
                     buf_alloc=self.buf[side] if buf is None else buf,
                     fwd_cnt=(self.fwd[side] if fwd is None else fwd) % (1 << 32),
                     length=len(payload))
        self.out.append((t, data))

    def open(self) -> None:
        self.send(0, Op.REQUEST)
        self.send(1, Op.RESPONSE)

    def data(self, side: int, payload: bytes, *, flags: int = 0, consume: bool = True,
             update: bool = True) -> None:
        """An RW, then (if ``consume``) the peer reads all it has and says so with a
        CREDIT_UPDATE."""
        self.send(side, Op.RW, payload, flags=flags)
        self.unread[1 - side] += len(payload)
        if consume:
            self.fwd[1 - side] += self.unread[1 - side]
            self.unread[1 - side] = 0
            if update:
                self.send(1 - side, Op.CREDIT_UPDATE)

    def close(self, side: int = 0) -> None:
        """Linux close(): SHUTDOWN(RCV|SEND) from ``side``, two RSTs from the peer."""
        self.send(side, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
        self.send(1 - side, Op.RST)
        self.send(1 - side, Op.RST)


def write(path: Path, frames: list[tuple[int, bytes]]) -> Path:
    """A pcap of ``(time, frame)`` pairs."""
    with open(path, "wb") as fp:
        w = PcapWriter(fp)
        for t, data in frames:
            w.write(t, data)
    return path


def echo_capture(path: Path) -> Path:
    """Every close kind, port reuse, SEQPACKET, a mid-capture start, a no-listener refusal."""
    out: list[tuple[int, bytes]] = []
    # 0: graceful STREAM echo
    c = Conv(out)
    c.open()
    c.data(0, b"hello vsock\n")
    c.data(1, b"hello vsock\n")
    c.close(0)
    # 1: the same ports again (port reuse): a new stream; the server resets it
    c = Conv(out)
    c.open()
    c.data(0, b"again")
    c.send(1, Op.RST)
    # 2: refused (nobody listens): REQUEST, RST with buf_alloc 0
    c = Conv(out, client=(1, 50001), server=(1, 5999))
    c.send(0, Op.REQUEST)
    c.send(1, Op.RST, buf=0)
    # 3: SEQPACKET, three messages client→server (one split in two packets), one back
    c = Conv(out, client=(3, 60000), server=(2, 5002), type_=SockType.SEQPACKET)
    c.open()
    c.data(0, b"one", flags=SeqFlag.EOM)
    c.data(0, b"two-a", consume=False)
    c.data(0, b"two-b", flags=SeqFlag.EOM | SeqFlag.EOR)
    c.data(0, b"three", flags=SeqFlag.EOM)
    c.data(1, b"ack", flags=SeqFlag.EOM)
    c.close(1)
    # 4: half-closed: the client shuts its sending side, nothing more
    c = Conv(out, client=(1, 50002), server=(1, 5006))
    c.open()
    c.data(0, b"request")
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    # 5: unanswered REQUEST
    c = Conv(out, client=(3, 50003), server=(2, 1024))
    c.send(0, Op.REQUEST)
    # 6: open at the end, started mid-connection (no handshake, roles by port)
    c = Conv(out, client=(2, 1_500_000), server=(3, 5007))
    c.fwd = [4000, 7000]
    c.data(1, b"x" * 100)
    c.data(0, b"y" * 100)
    return write(path, out)
