"""Every close ladder, on both socket types: how a connection ended, by which frame and whom.

The expected values are the protocol's rules as docs/analysis.md states them: a SHUTDOWN's
SEND flag shuts its sender's direction and RCV its peer's; an RST after both directions are
shut ends a graceful close; an RST from the server that answers a REQUEST is a refusal. The
ladders are written frame by frame (numbered from 1) with the scenario builder.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conntrack_scenarios import Conv, write

import vsockmon
from vsockmon.conntrack.tracker import Close
from vsockmon.wire.protocol import Op, ShutdownFlag, SockType

C, S = 0, 1
RCV, SEND = ShutdownFlag.RCV, ShutdownFlag.SEND
BOTH = RCV | SEND

# (name, the packets after the handshake as (side, op, flags), close, close frame, closer)
Ladder = tuple[str, list[tuple[int, int, int]], Close, int | None, str | None]
LADDERS: list[Ladder] = [
    ("linux-close", [(C, Op.SHUTDOWN, BOTH), (S, Op.RST, 0), (S, Op.RST, 0)],
     Close.GRACEFUL, 4, "server"),
    ("send-both-ways-then-rst", [(C, Op.SHUTDOWN, SEND), (S, Op.SHUTDOWN, SEND), (C, Op.RST, 0)],
     Close.GRACEFUL, 5, "client"),
    ("rcv-both-ways", [(C, Op.SHUTDOWN, RCV), (S, Op.SHUTDOWN, RCV)], Close.CLOSING, 4, "server"),
    ("one-side-both-flags-apart", [(C, Op.SHUTDOWN, SEND), (C, Op.SHUTDOWN, RCV)],
     Close.CLOSING, 4, "client"),
    ("send-only", [(C, Op.SHUTDOWN, SEND)], Close.HALF_CLOSED, 3, "client"),
    ("rcv-only", [(S, Op.SHUTDOWN, RCV)], Close.HALF_CLOSED, 3, "server"),
    ("same-direction-twice", [(C, Op.SHUTDOWN, SEND), (S, Op.SHUTDOWN, RCV)],
     Close.HALF_CLOSED, 4, "server"),
    ("rst-by-client", [(C, Op.RW, 0), (C, Op.RST, 0)], Close.RESET_BY_CLIENT, 4, "client"),
    ("rst-by-server", [(S, Op.RST, 0)], Close.RESET_BY_SERVER, 3, "server"),
    ("rst-after-half-close", [(C, Op.SHUTDOWN, SEND), (S, Op.RST, 0)],
     Close.RESET_BY_SERVER, 4, "server"),
    ("shutdown-after-rst", [(S, Op.RST, 0), (C, Op.SHUTDOWN, BOTH)],
     Close.RESET_BY_SERVER, 3, "server"),
    ("open", [(C, Op.RW, 0), (S, Op.CREDIT_UPDATE, 0)], Close.OPEN, None, None),
]


@pytest.mark.parametrize("typ", [SockType.STREAM, SockType.SEQPACKET])
@pytest.mark.parametrize(("name", "ladder", "close", "frame", "by"), LADDERS,
                         ids=[x[0] for x in LADDERS])
def test_close_ladder(tmp_path: Path, typ: int, name: str, ladder: list[tuple[int, int, int]],
                      close: Close, frame: int | None, by: str | None) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, type_=typ)
    c.open()
    for side, op, flags in ladder:
        c.send(side, Op(op), b"data" if op == Op.RW else b"", flags=flags)
    (conn,) = vsockmon.open(write(tmp_path / "c.pcap", out)).analysis().table
    assert (conn.type, conn.close, conn.close_frame, conn.close_by) == (typ, close, frame, by)
    assert (conn.request_frame, conn.response_frame, conn.handshake_ns) == (1, 2, 1000)
    sent = {C: 0, S: 0}
    for side, op, flags in ladder:
        if op == Op.SHUTDOWN:
            sent[side] |= flags
    assert (conn.client.shutdown_flags, conn.server.shutdown_flags) == (sent[C], sent[S])
    rsts = [3 + i for i, (_, op, _) in enumerate(ladder) if op == Op.RST]
    assert conn.client.rst_count + conn.server.rst_count == len(rsts)


@pytest.mark.parametrize("typ", [SockType.STREAM, SockType.SEQPACKET])
@pytest.mark.parametrize(("rst_side", "close", "handshake"), [
    (S, Close.REFUSED, 1000),          # the dialled end refused: handshake to its RST
    (C, Close.RESET_BY_CLIENT, None),  # the client gave up before any answer
])
def test_request_answered_by_rst(tmp_path: Path, typ: int, rst_side: int, close: Close,
                                 handshake: int | None) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, type_=typ)
    c.send(C, Op.REQUEST)
    c.send(rst_side, Op.RST, buf=0)
    (conn,) = vsockmon.open(write(tmp_path / "r.pcap", out)).analysis().table
    assert (conn.close, conn.close_frame, conn.handshake_ns) == (close, 2, handshake)
    assert conn.response_frame is None


@pytest.mark.parametrize("typ", [SockType.STREAM, SockType.SEQPACKET])
def test_unanswered_request(tmp_path: Path, typ: int) -> None:
    out: list[tuple[int, bytes]] = []
    Conv(out, type_=typ).send(C, Op.REQUEST)
    (conn,) = vsockmon.open(write(tmp_path / "u.pcap", out)).analysis().table
    assert (conn.close, conn.close_frame, conn.close_by, conn.handshake_ns) == (
        Close.UNANSWERED, None, None, None)


def test_a_reset_without_request_is_never_a_refusal(tmp_path: Path) -> None:
    """Captured mid-connection: the server's RST ends a connection, it refuses nothing."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.send(C, Op.RW, b"late")
    c.send(S, Op.RST)
    (conn,) = vsockmon.open(write(tmp_path / "m.pcap", out)).analysis().table
    assert (conn.close, conn.close_frame, conn.start_seen) == (Close.RESET_BY_SERVER, 2, False)


def test_close_counts_in_the_records(tmp_path: Path) -> None:
    """conns --json: close, close_frame and close_by of each ladder, as strings and ints."""
    out: list[tuple[int, bytes]] = []
    for i, (_, ladder, _, _, _) in enumerate(LADDERS):
        c = Conv(out, client=(1, 50000 + i))
        c.open()
        for side, op, flags in ladder:
            c.send(side, Op(op), b"data" if op == Op.RW else b"", flags=flags)
    recs = vsockmon.open(write(tmp_path / "all.pcap", out)).analysis().table.records()
    assert [r["close"] for r in recs] == [x[2].value for x in LADDERS]
    assert [r["close_by"] for r in recs] == [x[4] for x in LADDERS]
    starts = [r["first_frame"] for r in recs]
    assert [r["close_frame"] and r["close_frame"] - s + 1 for r, s in zip(recs, starts,
                                                                           strict=True)] == [
        x[3] for x in LADDERS]
