"""The timeline's model: each packet's step (what its arrow says: op, length, flags, the
sender's credit after it) and which steps a long ladder shows. Labels are reasoned from the
scenario's packets and credit arithmetic (free credit = peer buf_alloc - bytes in flight)."""

from __future__ import annotations

from pathlib import Path

from conntrack_scenarios import Conv, write

import vsockmon
from vsockmon.analysis.timeline import ladder, text_lines
from vsockmon.conntrack.tracker import StreamRows
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType


def steps_of(tmp_path: Path, out: list[tuple[int, bytes]]) -> list[str]:
    rows = StreamRows([0])
    table = vsockmon.open(write(tmp_path / "t.pcap", out)).scan(rows).table
    return [s.label for s in ladder(table[0], rows.columns(0)).steps]


def test_labels_show_credit_down_to_a_stall_and_beyond(tmp_path: Path) -> None:
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 100])
    c.open()
    c.send(0, Op.RW, bytes(60))  # 100 - 60 = 40 left
    c.send(0, Op.RW, bytes(40))  # 0 left: a stall
    c.send(0, Op.RW, bytes(10))  # beyond the buffer by 10
    c.fwd[1] = 110
    c.send(1, Op.CREDIT_UPDATE)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)
    c.send(1, Op.RST)
    assert steps_of(tmp_path, out) == [
        "REQUEST buf=262144 fwd=0", "RESPONSE buf=100 fwd=0", "RW len=60 credit=40",
        "RW len=40 credit=0 stall", "RW len=10 credit=-10 OVER",
        "CREDIT_UPDATE buf=100 fwd=110", "SHUTDOWN RCV|SEND", "RST"]


def test_seqpacket_rw_flags_are_named_and_unknown_credit_is_left_out(tmp_path: Path) -> None:
    """Captured mid-connection: the client's first RW comes before any advertisement of
    the server's, so its credit is unknown and not shown."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, client=(3, 50000), server=(2, 1024), type_=SockType.SEQPACKET)
    c.send(0, Op.RW, b"abc", flags=SeqFlag.EOM | SeqFlag.EOR)
    c.send(1, Op.RW, b"ok", flags=SeqFlag.EOM)
    assert steps_of(tmp_path, out) == ["RW len=3 EOM|EOR", "RW len=2 EOM credit=262142"]


def test_a_long_ladder_shows_its_first_and_last_halves(tmp_path: Path) -> None:
    """10 packets in 5 rows: the first 2, '… 5 packets …', the last 3."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.open()
    for i in range(8):
        c.send(i % 2, Op.RW, bytes(i + 1))
    rows = StreamRows([0])
    table = vsockmon.open(write(tmp_path / "l.pcap", out)).scan(rows).table
    lines = text_lines(ladder(table[0], rows.columns(0)), max_rows=5)
    frames = [int(ln.split()[1]) for ln in lines[2:] if ln.split()[0].startswith("+")]
    assert frames == [1, 2, 8, 9, 10]
    assert sum("… 5 packets …" in ln for ln in lines) == 1
    assert len(lines) == 2 + 5 + 1
    # frame 3 + i is RW number i, sent by the client when i is even
    server_rw = next(ln for ln in lines if " 8  " in ln)
    assert "◀" in server_rw and "▶" not in server_rw and "RW len=6 " in server_rw
    client_rw = next(ln for ln in lines if " 9  " in ln)
    assert "▶" in client_rw and "◀" not in client_rw and "RW len=7 " in client_rw
