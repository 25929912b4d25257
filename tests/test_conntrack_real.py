"""Connection analysis of the real lab captures (fixtures/real, made by traffic.py in the lab
VM with Debian's kernel): what the tracker finds must be what the traffic script did.

Timing, ports and the number of CREDIT_UPDATEs change from one generation to the next; the
assertions hold only what the script fixes: bytes, messages, closes, roles.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import tshark_rows
from click.testing import CliRunner

import vsockmon
from vsockmon.analysis.reassembly import chunks, direction_bytes, segments
from vsockmon.cli import main
from vsockmon.conntrack.tracker import Close, ConnTable, StreamRows, Violation

REAL = Path(__file__).resolve().parent.parent / "fixtures" / "real"


def traffic() -> ModuleType:
    """The generator script itself, for its payload patterns."""
    spec = importlib.util.spec_from_file_location("traffic", REAL / "traffic.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def analyse(name: str, *streams: int) -> tuple[ConnTable, StreamRows]:
    rows = StreamRows(streams, payloads=True)
    cap = vsockmon.open(REAL / name)
    table = cap.scan(rows).table
    assert cap.stopped is None
    return table, rows


def sent(rows: StreamRows, stream: int, side: int) -> bytes:
    data, missing = direction_bytes(chunks(rows.columns(stream), rows.payload(stream)), side)
    assert missing == 0
    return data


def test_source_constants_still_hold() -> None:
    """The numbers below mirror traffic.py; if it changes, so must they."""
    src = (REAL / "traffic.py").read_text()
    for line in ("total = 128 * 1024", "buffer_size=16 * 1024", "time.sleep(0.01)",
                 "pattern(10000, 11)", "for i in range(3, 6):", "count: int = 8"):
        assert line in src, line


def test_stream_echo() -> None:
    table, rows = analyse("stream-echo.pcap", 0)
    assert len(table) == 1
    c = table[0]
    message = b"hello vsock\n" + traffic().pattern(1000) + b"bye\n"
    assert (c.type_name, c.close, c.start_seen, c.server.port) == ("STREAM", Close.GRACEFUL,
                                                                   True, 5001)
    assert c.client.bytes == c.server.bytes == len(message) == 1016
    assert sent(rows, 0, 0) == sent(rows, 0, 1) == message
    assert c.handshake_ns is not None and c.handshake_ns > 0
    assert c.server.rst_count >= 1 and not c.client.violations and not c.server.violations


def test_seqpacket_messages() -> None:
    table, rows = analyse("seqpacket-echo.pcap", 0)
    c = table[0]
    want = [b"one", b"two", traffic().pattern(5000, 7), b"last"]
    assert (c.type_name, c.close) == ("SEQPACKET", Close.GRACEFUL)
    assert (c.client.messages, c.server.messages) == (4, 4)
    assert (c.client.records, c.server.records) == (2, 2)  # the two sent with MSG_EOR
    msgs = segments(chunks(rows.columns(0), rows.payload(0)), seqpacket=True)
    assert [bytes(m.data) for m in msgs if m.sender == 0] == want
    assert [bytes(m.data) for m in msgs if m.sender == 1] == want
    assert [m.eor for m in msgs if m.sender == 0] == [False, True, False, True]


def test_no_listener_is_refused() -> None:
    table, _ = analyse("no-listener.pcap")
    c = table[0]
    assert (len(table), c.close, c.server.port, c.close_by) == (1, Close.REFUSED, 5999,
                                                                "server")
    assert [e.op_name for e in c.events] == ["REQUEST", "RST"]
    assert c.handshake_ns is not None and c.response_frame is None


def test_credit_stall_has_exactly_the_stalls_tshark_shows() -> None:
    table, rows = analyse("credit-stall.pcap", 0)
    c = table[0]
    assert c.client.bytes == 128 * 1024 and sent(rows, 0, 0) == traffic().pattern(128 * 1024,
                                                                                 3)
    assert c.server.buf_alloc == 16 * 1024
    assert c.client.max_in_flight == 16 * 1024 and c.client.min_credit == 0
    st = c.client.stalls
    want = client_stalls_by_tshark(REAL / "credit-stall.pcap")
    assert len(want) == 8  # 128 KiB through a 16 KiB buffer, each RW filling it
    durations = [end - start for _, start, end in want]
    assert (st.count, st.total_ns, st.max_ns) == (8, sum(durations), max(durations))
    assert st.first_frame == want[0][0] and not st.open
    assert st.longest_frame == want[durations.index(max(durations))][0]
    assert Violation.BEYOND_CREDIT not in c.client.violations
    assert c.server.stalls.count == 0 and c.close == Close.GRACEFUL
    rec = json.loads(CliRunner().invoke(main, ["conns", str(REAL / "credit-stall.pcap"),
                                               "--json"]).stdout)
    assert (rec["credit_stalls"], rec["stalls_c2s"], rec["stalls_s2c"]) == (8, 8, 0)
    assert rec["stall_time"] == sum(durations) / 1e9
    assert rec["max_stall_ms"] == max(durations) / 1e6 and rec["stalled_at_end"] is False


def client_stalls_by_tshark(path: Path) -> list[tuple[int, int, int]]:
    """(start frame, start ns, end ns) of each zero-credit period of the client, reasoned
    from tshark's fields: the client may have ``buf_alloc - (bytes sent - fwd_cnt)`` bytes
    unconsumed, with the server's last advertised buf_alloc and fwd_cnt (its RSTs carry no
    credit). A period starts at the frame after which none is left, and ends at the first
    frame after which some is."""
    (conn,) = tshark_rows.streams(tshark_rows.rows(path))
    client = conn[0].src
    sent = 0
    buf = fwd = None
    out: list[tuple[int, int, int]] = []
    start: tuple[int, int] | None = None
    for r in conn:
        if r.src == client and r.op == tshark_rows.RW:
            sent += r.len
        elif r.src != client and r.op != tshark_rows.RST:
            buf, fwd = r.buf_alloc, r.fwd_cnt
        full = buf is not None and fwd is not None and buf - (sent - fwd) <= 0
        if full and start is None:
            start = (r.frame, r.ts_ns)
        elif not full and start is not None:
            out.append((*start, r.ts_ns))
            start = None
    assert start is None  # the capture's client ends with credit
    return out


def test_many_connections() -> None:
    table, _ = analyse("many-connections.pcap")
    sizes = sorted(len(f"client {i} says hello\n".encode()) * (i + 1) for i in range(8))
    assert len(table) == 8
    assert sorted(c.client.bytes for c in table) == sizes
    assert all(c.server.bytes == c.client.bytes for c in table)
    assert {c.server.addr for c in table} == {"1:5005"}
    assert len({c.client.port for c in table}) == 8
    assert {c.close for c in table} == {Close.GRACEFUL}
    assert [c.stream for c in table] == list(range(8))
    assert [c.first_frame for c in table] == sorted(c.first_frame for c in table)


def test_half_close() -> None:
    table, rows = analyse("half-close.pcap", 0)
    c = table[0]
    assert sent(rows, 0, 0) == b"request, then SHUT_WR\n"
    assert sent(rows, 0, 1) == b"got 22 bytes, closing now\n"
    first_shutdown = next(e for e in c.events if e.op_name == "SHUTDOWN")
    assert first_shutdown.sender_role == "client" and first_shutdown.flags == 2  # SEND only
    answer = c.server.first_rw_frame
    assert answer is not None and answer > first_shutdown.frame  # the answer came after it
    assert Violation.AFTER_SHUTDOWN not in c.client.violations


def test_mid_connection_capture_has_an_unknown_start() -> None:
    table, rows = analyse("mid-connection.pcap", 0)
    c = table[0]
    assert len(table) == 1 and not c.start_seen and c.request_frame is None
    assert c.server.port == 5007 and c.client.port != 5007  # roles guessed by port
    pat = traffic().pattern
    assert sent(rows, 0, 0) == sent(rows, 0, 1) == b"".join(pat(100, i) for i in range(3, 6))
    result = CliRunner().invoke(main, ["conns", str(REAL / "mid-connection.pcap")])
    assert result.exit_code == 0 and "?" in result.stdout.splitlines()[2]


def test_host_guest_over_vhost_is_tracked_like_loopback() -> None:
    """CID 2 (the lab VM) and 3 (its nested guest): vhost splits host→guest packets into
    3732-byte fragments and its tap keeps the rest of the packet after each one."""
    table, rows = analyse("host-guest.pcap", 0, 1, 3)
    assert [(c.type_name, c.client.cid, c.server.cid, c.close) for c in table] == [
        ("STREAM", 2, 3, Close.GRACEFUL), ("SEQPACKET", 2, 3, Close.GRACEFUL),
        ("STREAM", 2, 3, Close.GRACEFUL), ("STREAM", 3, 2, Close.GRACEFUL)]
    data = traffic().pattern(10000, 11)
    c = table[0]
    assert c.client.bytes == c.server.bytes == 10000
    assert sent(rows, 0, 0) == sent(rows, 0, 1) == data  # first len bytes of each frame
    # 10000 bytes in 3732-byte fragments: 3732, 3732, 2536 — the two non-final ones carry
    # the rest of the packet (Debian 6.1's tap). The kernel's doing, not a violation.
    assert c.client.violations[Violation.TAP_LENGTH].count == 2
    rec = table.records([0])[0]
    assert (rec["violations"], rec["tap_length"], rec["first_violation_frame"]) == (0, 2, None)
    seq = table[1]
    assert (seq.client.messages, seq.client.records) == (2, 1)
    assert sent(rows, 1, 0) == b"seq oneseq two"
    assert table[2].client.bytes == len(b"7000\n")
    guest = table[3]
    assert guest.server.addr == "2:7000" and guest.start_seen
    assert sent(rows, 3, 1) == sent(rows, 3, 0) == b"hello guest, echo this\n"
