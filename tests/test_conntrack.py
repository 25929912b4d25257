"""Connection tracking on synthetic captures: streams, roles, closes, messages, credit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conntrack_scenarios import MS, Conv, echo_capture, write
from helpers import T0, frame

from vsockmon.analysis import pipeline
from vsockmon.conntrack.model import stall_end_ns
from vsockmon.conntrack.tracker import (
    CLIENT,
    RECORD_FIELDS,
    SERVER,
    Close,
    ConnTable,
    ConnTracker,
    StreamRows,
    Tags,
    Violation,
)
from vsockmon.decode.frames import decode_batches
from vsockmon.wire.pcapio import CaptureReader
from vsockmon.wire.protocol import Op, SeqFlag, ShutdownFlag, SockType


def analyse(path: Path, chunk: int = 1 << 20) -> ConnTable:
    """The analysis pass over ``path``, read ``chunk`` bytes at a time (small chunks put
    connections across batch edges)."""
    with CaptureReader(str(path), chunk=chunk) as reader:
        return pipeline.analyse(reader).table


@pytest.fixture
def echo(tmp_path: Path) -> ConnTable:
    return analyse(echo_capture(tmp_path / "echo.pcap"))


def test_every_connection_found_with_its_close(echo: ConnTable) -> None:
    got = [(c.stream, c.type_name, c.client.addr, c.server.addr, c.close) for c in echo]
    assert got == [
        (0, "STREAM", "1:50000", "1:1234", Close.GRACEFUL),
        (1, "STREAM", "1:50000", "1:1234", Close.RESET_BY_SERVER),
        (2, "STREAM", "1:50001", "1:5999", Close.REFUSED),
        (3, "SEQPACKET", "3:60000", "2:5002", Close.GRACEFUL),
        (4, "STREAM", "1:50002", "1:5006", Close.HALF_CLOSED),
        (5, "STREAM", "3:50003", "2:1024", Close.UNANSWERED),
        (6, "STREAM", "2:1500000", "3:5007", Close.OPEN),
    ]


def test_counts_bytes_packets_and_key_frames(echo: ConnTable) -> None:
    c = echo[0]
    assert (c.client.bytes, c.server.bytes) == (12, 12)
    assert (c.client.packets, c.server.packets) == (4, 5)
    assert (c.client.rw_packets, c.client.credit_updates) == (1, 1)
    assert (c.request_frame, c.response_frame) == (1, 2)
    assert (c.client.first_rw_frame, c.server.last_rw_frame) == (3, 5)
    assert (c.client.shutdown_flags, c.client.shutdown_frame) == (3, 7)
    assert (c.server.rst_count, c.server.rst_frame) == (2, 8)
    assert (c.close_frame, c.close_by) == (8, "server")
    assert c.handshake_ns == 1000
    assert [e.op_name for e in c.events] == ["REQUEST", "RESPONSE", "SHUTDOWN", "RST", "RST"]
    assert [e.sender_role for e in c.events] == ["client", "server", "client", "server",
                                                 "server"]
    assert c.start_seen and c.client.messages is None
    assert (c.client.buf_alloc, c.server.fwd_cnt) == (262144, 12)
    assert (c.client.max_in_flight, c.client.min_credit) == (12, 262144 - 12)


def test_refused_has_handshake_to_the_rst(echo: ConnTable) -> None:
    c = echo[2]
    assert c.handshake_ns == 1000 and c.response_frame is None
    assert c.server.buf_alloc is None  # an RST carries no credit


def test_seqpacket_messages_and_records(echo: ConnTable) -> None:
    c = echo[3]
    assert (c.client.messages, c.client.records, c.server.messages) == (3, 1, 1)
    assert c.client.rw_packets == 4 and c.client.bytes == 18


def test_records_count_messages_whose_last_piece_has_eor(tmp_path: Path) -> None:
    """EOR counts where it ends a message (with EOM), as the receiving kernel reads it: a
    stray EOR on a piece without EOM, and EOR on a first piece whose last piece lacks it,
    mark no record."""
    out: list = []
    c = Conv(out, type_=SockType.SEQPACKET)
    c.open()
    c.data(0, b"a1", flags=SeqFlag.EOR)  # EOR without EOM: not the message's end
    c.data(0, b"a2", flags=SeqFlag.EOM)  # message a ends without EOR
    c.data(0, b"b", flags=SeqFlag.EOM | SeqFlag.EOR)  # message b: the one record
    c.data(0, b"c", flags=SeqFlag.EOR)  # a piece that never ends
    c.data(1, b"r", flags=SeqFlag.EOM | SeqFlag.EOR)
    t = analyse(write(tmp_path / "eor.pcap", out))
    side = t[0].client
    assert (side.messages, side.records) == (2, 1)
    assert (t[0].server.messages, t[0].server.records) == (1, 1)
    [rec] = t.records()
    assert (rec["records_c2s"], rec["records_s2c"]) == (1, 1)


def test_mid_capture_guesses_roles_by_port(echo: ConnTable) -> None:
    c = echo[6]
    assert not c.start_seen and c.request_frame is None and c.handshake_ns is None
    assert (c.server.bytes, c.client.bytes) == (100, 100)
    # Counting starts at the peer's first advertisement: the server's 100 bytes went out
    # before the client's first packet, so they are not known to be in flight (a lower
    # bound, never a false stall); the client's 100 bytes are.
    assert (c.client.max_in_flight, c.server.max_in_flight) == (100, 0)
    assert (c.client.fwd_cnt, c.server.fwd_cnt) == (4100, 7100)


def test_mid_capture_response_sender_is_the_server(tmp_path: Path) -> None:
    out: list = []
    c = Conv(out, client=(3, 80), server=(2, 9000))  # ports would say otherwise
    c.send(1, Op.RESPONSE)
    c.data(0, b"hi")
    t = analyse(write(tmp_path / "r.pcap", out))
    assert (t[0].client.addr, t[0].server.addr) == ("3:80", "2:9000")


def test_closing_and_reset_by_client(tmp_path: Path) -> None:
    out: list = []
    a = Conv(out)
    a.open()
    a.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    a.send(1, Op.SHUTDOWN, flags=ShutdownFlag.SEND)  # both directions shut, no RST yet
    b = Conv(out, client=(1, 50001))
    b.open()
    b.data(0, b"abc")
    b.send(0, Op.RST)  # abrupt: no shutdown first
    t = analyse(write(tmp_path / "c.pcap", out))
    assert [c.close for c in t] == [Close.CLOSING, Close.RESET_BY_CLIENT]
    assert t[0].close_frame == 4 and t[0].close_by == "server"


def test_rst_after_half_close_is_a_reset(tmp_path: Path) -> None:
    out: list = []
    c = Conv(out)
    c.open()
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.send(1, Op.RST)
    assert analyse(write(tmp_path / "h.pcap", out))[0].close == Close.RESET_BY_SERVER


def test_stream_numbering_rule(tmp_path: Path) -> None:
    """REQUEST starts a new stream of its key; anything else joins the key's current one;
    numbers follow first frames; the socket type is part of the key."""
    a, b, s = (1, 40000), (1, 40001), (1, 1234)
    frames = [
        frame(Op.RW, b"x", src=b, dst=s),                     # 0: b's key, no stream yet
        frame(Op.REQUEST, src=a, dst=s),                      # 1
        frame(Op.RESPONSE, src=s, dst=a),                     # 1
        frame(Op.REQUEST, src=a, dst=s),                      # 2: same key, new stream
        frame(Op.RW, b"y", src=s, dst=b),                     # 0
        frame(Op.RST, src=s, dst=a),                          # 2
        frame(Op.RST, src=s, dst=a),                          # 2 (after close: joins)
        frame(Op.RW, b"z", src=a, dst=s, type_=SockType.SEQPACKET),  # 3: other type
        b"\x00" * 10,                                         # no virtio header: -1
        frame(Op.REQUEST, src=s, dst=a),                      # 4: reversed ends, same key
    ]
    path = tmp_path / "n.pcap"
    write(path, [(T0 + i, f) for i, f in enumerate(frames)])
    want = [0, 1, 1, 2, 0, 2, 2, 3, -1, 4]
    for chunk in (40, 200, 1 << 20):  # batch edges must not matter
        tracker = ConnTracker()
        got: list[int] = []
        with CaptureReader(str(path), chunk=chunk) as reader:
            for fb in decode_batches(reader.batches()):
                got += tracker.feed(fb).stream.tolist()
        assert got == want
        table = tracker.finish()
        assert [c.first_frame for c in table] == [1, 2, 4, 8, 10]
        assert tracker.frames_without_stream == 1
    assert table[4].client.addr == "1:1234"  # the REQUEST's sender


def test_credit_stall_counted_with_its_duration(tmp_path: Path) -> None:
    out: list = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    for i in range(3):  # each 4096-byte write fills the server's 4 KiB buffer
        c.send(0, Op.RW, b"d" * 4096)
        c.fwd[1] += 4096
        c.send(1, Op.CREDIT_UPDATE, delay=(i + 1) * MS)
    c.send(0, Op.RW, b"d" * 4096)  # the last one is still waiting at the end
    t = analyse(write(tmp_path / "s.pcap", out))
    st = t[0].client.stalls
    assert st.count == 4 and st.open
    assert st.max_ns == 3 * MS and st.total_ns == 6 * MS
    assert st.first_frame == 3 and st.longest_frame == 7
    assert t[0].client.min_credit == 0 and not t[0].client.violations
    rec = t.records()[0]
    assert rec["credit_stalls"] == 4 and rec["stall_time"] == pytest.approx(0.006)


def test_delayed_older_fwd_cnt_never_takes_credit_back(tmp_path: Path) -> None:
    out: list = []
    c = Conv(out, buf=[262144, 8192])
    c.open()
    c.data(0, b"a" * 8192)  # fills, then the update gives it all back
    c.send(1, Op.RW, b"late", fwd=0)  # a delayed packet with the old fwd_cnt
    c.data(0, b"b" * 100)
    t = analyse(write(tmp_path / "d.pcap", out))
    side = t[0].client
    assert side.stalls.count == 1 and not side.stalls.open
    assert not side.violations and side.fwd_cnt == 0
    assert t[0].server.fwd_cnt == 8292


def test_fwd_cnt_wraps_around_u32(tmp_path: Path) -> None:
    out: list = []
    c = Conv(out, buf=[262144, 4096])
    c.fwd = [0, (1 << 32) - 100]  # mid-capture, the server's counter about to wrap
    c.send(1, Op.CREDIT_UPDATE)
    for _ in range(3):
        c.data(0, b"w" * 1000)
    t = analyse(write(tmp_path / "w.pcap", out))
    side = t[0].client
    assert not side.violations and side.stalls.count == 0
    assert side.max_in_flight == 1000
    assert t[0].server.fwd_cnt == ((1 << 32) - 100 + 3000) % (1 << 32)


def test_violations_with_first_and_last_frames(tmp_path: Path) -> None:
    out: list = []
    c = Conv(out, buf=[262144, 1000])
    c.send(0, Op.REQUEST)
    c.send(0, Op.RW, b"early")                             # 2: before the RESPONSE
    c.send(1, Op.RESPONSE)
    c.send(0, Op.RW, b"x" * 1200)                          # 4: beyond the 995 left
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.SEND)
    c.send(0, Op.RW, b"late")                              # 6: after SHUTDOWN(SEND)
    c.send(1, Op.RW, b"t" * 10, captured=b"t" * 50)        # 7: tap-length anomaly
    c.send(1, Op.RW, b"u" * 10, captured=b"u" * 40)        # 8
    t = analyse(write(tmp_path / "v.pcap", out))
    v = t[0].client.violations
    assert {k: (e.count, e.first_frame, e.last_frame) for k, e in v.items()} == {
        Violation.BEFORE_RESPONSE: (1, 2, 2), Violation.BEYOND_CREDIT: (2, 4, 6),
        Violation.AFTER_SHUTDOWN: (1, 6, 6)}
    tap = t[0].server.violations[Violation.TAP_LENGTH]
    assert (tap.count, tap.first_frame, tap.last_frame) == (2, 7, 8)
    assert t[0].server.bytes == 20  # the header's len, not the captured length
    rec = t.records()[0]
    # 1 before the RESPONSE + 2 beyond credit + 1 after SHUTDOWN: the server's two
    # tap-length frames are the capturing kernel's, counted apart and not as violations.
    assert (rec["violations"], rec["beyond_credit"], rec["tap_length"]) == (4, 2, 2)
    assert rec["first_violation_frame"] == 2


def test_tags_give_stream_sender_and_credit_per_row(tmp_path: Path) -> None:
    out: list = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.data(0, b"a" * 1000)
    tracker = ConnTracker()
    with CaptureReader(str(write(tmp_path / "t.pcap", out))) as reader:
        tags = tracker.feed(next(decode_batches(reader.batches())))
    assert tags.sender.tolist() == [CLIENT, SERVER, CLIENT, SERVER]
    assert tags.in_flight[:, CLIENT].tolist() == [-1, 0, 1000, 0]
    assert tags.limit[:, CLIENT].tolist() == [-1, 4096, 4096, 4096]
    assert tags.in_flight[:, SERVER].tolist() == [0, 0, 0, 0]


def test_stream_rows_keep_payloads_and_tags(tmp_path: Path) -> None:
    path = echo_capture(tmp_path / "e.pcap")
    rows = StreamRows([3], payloads=True)
    with CaptureReader(str(path), chunk=300) as reader:
        tracker = ConnTracker()
        for fb in decode_batches(reader.batches()):
            rows(fb, tracker.feed(fb))
    cols = rows.columns(3)
    assert rows.streams == [3]
    rw = cols["op"] == Op.RW
    assert [p for p, r in zip(rows.payload(3), rw, strict=True) if r] == [
        b"one", b"two-a", b"two-b", b"three", b"ack"]
    assert np.all(np.diff(cols["frame"]) > 0)


def test_records_have_every_field(echo: ConnTable) -> None:
    recs = echo.records()
    assert [list(r) for r in recs] == [[f.name for f in RECORD_FIELDS]] * len(echo)
    r = recs[0]
    assert (r["client"], r["server"], r["bytes_c2s"], r["bytes_s2c"]) == ("1:50000", "1:1234",
                                                                          12, 12)
    assert (r["close"], r["shutdown_client"], r["rst_server"]) == ("graceful", "RCV|SEND", 2)
    assert recs[3]["messages_c2s"] == 3 and recs[0]["messages_c2s"] is None


def test_empty_capture_has_no_connection(tmp_path: Path) -> None:
    t = analyse(write(tmp_path / "empty.pcap", []))
    assert len(t) == 0 and t.records() == [] and list(t) == []
    with pytest.raises(IndexError):
        t[0]


def test_user_guide_documents_every_field_and_close() -> None:
    root = Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "analysis.md").read_text()
    for f in RECORD_FIELDS:
        assert f"`{f.name}`" in guide, f.name
    for kind in Close:
        assert f"`{kind.value}`" in guide, kind
    assert "A **REQUEST** always starts a new stream for its key." in guide
    image = root / "docs" / "img" / "timeline.png"
    assert "img/timeline.png" in guide and image.stat().st_size < 200_000


def test_forgotten_streams_leave_the_working_set_and_numbering_goes_on(tmp_path: Path) -> None:
    """A live view forgets closed streams: the tracker drops their state, keeps numbering,
    and a later frame of a forgotten key starts a new (mid-connection) stream."""
    a, b, s = (3, 50000), (3, 50001), (2, 1234)
    first = [frame(Op.REQUEST, src=a, dst=s), frame(Op.RESPONSE, src=s, dst=a),
             frame(Op.REQUEST, src=b, dst=s), frame(Op.RST, src=s, dst=b),  # 1: refused
             frame(Op.RW, b"x" * 10, src=a, dst=s)]
    later = [frame(Op.RST, src=b, dst=s),  # the forgotten key again, without a REQUEST
             frame(Op.RW, b"y" * 7, src=a, dst=s)]
    tracker = ConnTracker()
    for name, frames in (("1", first), ("2", later)):
        path = write(tmp_path / f"{name}.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
        with CaptureReader(str(path)) as reader:
            for fb in decode_batches(reader.batches()):
                got = tracker.feed(fb).stream.tolist()
        if name == "1":
            assert got == [0, 0, 1, 1, 0]
            tracker.forget({1})
            assert tracker.working_set == 1 and tracker.streams == 2
    assert got == [2, 0]
    table = tracker.finish()
    assert [c.stream for c in table] == [0, 2] and len(table) == 2
    assert table[0].client.bytes == 17 and table[0].client.rw_packets == 2
    new = table[1]
    # mid-connection roles: the RST's sender has the higher port, so it is the client
    assert not new.start_seen and new.packets == 1 and new.close == Close.RESET_BY_CLIENT
    assert new.client.addr == "3:50001"
    assert [r["stream"] for r in table.records()] == [0, 2]


def _gather(path: Path, rows: StreamRows) -> StreamRows:
    """Feed ``rows`` every batch of ``path`` with the tracker's tags, as the pipeline does."""
    tracker = ConnTracker()
    with CaptureReader(str(path), chunk=300) as reader:
        for fb in decode_batches(reader.batches()):
            rows(fb, tracker.feed(fb))
    return rows


def test_stream_rows_without_wanted_take_the_first_streams(tmp_path: Path) -> None:
    """``first=n`` gathers streams 0 … n-1 (the echo scenario has seven); the default (0)
    gathers none, and payloads are kept only when asked for."""
    path = echo_capture(tmp_path / "e.pcap")
    assert _gather(path, StreamRows()).streams == []
    two = _gather(path, StreamRows(first=2))
    assert two.streams == [0, 1]
    # stream 0 has two RW packets (12 bytes each way), yet no payload was asked for
    assert int((two.columns(0)["op"] == Op.RW).sum()) == 2 and two.payload(0) == []


def test_stream_rows_columns_are_integers(tmp_path: Path) -> None:
    """Every column holds int64 (timeline and follow print them as integers: a float column
    would print frame 3 as 3.0); in_flight and limit have one column per side."""
    rows = _gather(echo_capture(tmp_path / "e.pcap"), StreamRows([0]))
    cols = rows.columns(0)
    assert list(cols) == list(StreamRows.COLUMNS)
    for name, col in cols.items():
        assert col.dtype == np.int64, name
        assert col.shape == ((9, 2) if name in ("in_flight", "limit") else (9,)), name


def test_stream_rows_of_a_stream_never_seen_are_empty_columns() -> None:
    rows = StreamRows([5], payloads=True)
    cols = rows.columns(5)
    assert list(cols) == list(StreamRows.COLUMNS)
    for name, col in cols.items():
        assert col.dtype == np.int64, name
        assert col.shape == ((0, 2) if name in ("in_flight", "limit") else (0,)), name
    assert rows.payload(5) == []


def test_stream_rows_take_the_largest_stream_number_and_skip_impossible_ones(
        tmp_path: Path) -> None:
    """Stream numbers are int64: 2**63 - 1 is one, 2**63 and beyond name none (and must not
    break the int64 selection); negative numbers (rows without a stream) name none."""
    path = write(tmp_path / "one.pcap", [(T0, frame(Op.REQUEST))])
    with CaptureReader(str(path)) as reader:
        fb = next(decode_batches(reader.batches()))
    big = 2**63 - 1
    tags = Tags(np.array([big]), np.zeros(1, np.int8), np.full((1, 2), -1), np.full((1, 2), -1),
                np.zeros(1, bool))
    rows = StreamRows([-1, big, 2**63, 2**64 + 5])
    rows(fb, tags)
    assert rows.streams == [big]
    assert rows.columns(big)["frame"].tolist() == [1]


def _stalls_of_equal_length(path: Path) -> Path:
    """Two zero-credit stalls of the client of 2 ms each (frames 3 and 5 start them), then a
    third of 1 ms (frame 7)."""
    out: list = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    for ms in (2, 2, 1):  # each 4096-byte write fills the server's 4 KiB buffer
        c.send(0, Op.RW, b"d" * 4096)
        c.fwd[1] += 4096
        c.send(1, Op.CREDIT_UPDATE, delay=ms * MS)
    return write(path, out)


@pytest.mark.parametrize("chunk", [120, 1 << 20])  # about a frame per batch; one batch
def test_the_longest_stall_is_the_earliest_of_equals(tmp_path: Path, chunk: int) -> None:
    """Of two longest stalls of equal length the first is reported, whether both ended in
    one batch or in different ones."""
    st = analyse(_stalls_of_equal_length(tmp_path / "s.pcap"), chunk)[0].client.stalls
    assert (st.count, st.max_ns, st.total_ns) == (3, 2 * MS, 5 * MS)
    assert (st.first_frame, st.longest_frame, st.open) == (3, 3, False)


def test_tables_end_an_open_stall_where_told(tmp_path: Path) -> None:
    """``tables(end_ns)`` closes the capture off at ``end_ns`` as ``finish(end_ns)`` does: a
    stall still open then lasts until it (live: until now)."""
    out: list = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, b"d" * 4096)  # frame 3 fills the server's buffer; no update follows
    last_ts = out[-1][0]
    tracker = ConnTracker()
    with CaptureReader(str(write(tmp_path / "o.pcap", out))) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    for table in (tracker.finish(last_ts + 5 * MS), *tracker.tables(last_ts + 5 * MS)):
        st = table[0].client.stalls
        assert (st.count, st.total_ns, st.max_ns, st.longest_frame, st.open) == (
            1, 5 * MS, 5 * MS, 3, True)
    assert tracker.finish().records()[0]["stall_time"] == 0  # without: the last frame


def test_records_give_times_in_seconds_and_shutdown_flags_by_name(echo: ConnTable) -> None:
    """Conv writes stream 0's nine frames 1000 ns apart from T0 + 1000 ns; stream 4's client
    sends SHUTDOWN(SEND) only and its server none."""
    recs = echo.records()
    assert recs[0]["start"] == pytest.approx((T0 + 1000) / 1e9, abs=1e-6)
    assert recs[0]["end"] == pytest.approx((T0 + 9000) / 1e9, abs=1e-6)
    assert recs[0]["duration"] == 8000 / 1e9  # exact: the difference is taken in ns
    assert (recs[4]["shutdown_client"], recs[4]["shutdown_server"]) == ("SEND", "")


def test_a_stall_ends_at_the_packet_that_gave_credit_back_else_at_the_end() -> None:
    """The one definition conns and diagnose share: the peer's packet ends a stall; only
    one that none ended runs to the end observed."""
    assert stall_end_ns(5 * MS, 9 * MS) == 5 * MS
    assert stall_end_ns(None, 9 * MS) == 9 * MS


def test_records_say_null_for_what_was_never_seen(echo: ConnTable) -> None:
    """Stream 2 is refused (REQUEST, then an RST that carries no credit): no RW, no
    SHUTDOWN, the server's buffer never advertised; stream 0 is STREAM (no records)."""
    r = echo.records()[2]
    assert (r["first_rw_frame"], r["last_rw_frame"]) == (None, None)
    assert (r["shutdown_client_frame"], r["shutdown_server_frame"]) == (None, None)
    assert (r["buf_alloc_client"], r["buf_alloc_server"]) == (262144, None)
    assert (r["max_in_flight_c2s"], r["max_in_flight_s2c"]) == (None, 0)
    assert echo.records()[0]["records_c2s"] is None
    assert echo.records()[3]["records_c2s"] == 1


def test_records_keep_frame_1_and_a_single_byte_in_flight(tmp_path: Path) -> None:
    """Frame 1, an RW of a connection begun before the capture, is its last RW frame;
    a 1-byte write on an answered connection leaves 1 byte in flight."""
    a, s = (3, 50000), (2, 1234)
    b = (3, 50001)
    frames = [frame(Op.RW, b"z", src=s, dst=a),
              frame(Op.REQUEST, src=b, dst=s), frame(Op.RESPONSE, src=s, dst=b),
              frame(Op.RW, b"1", src=b, dst=s)]
    recs = analyse(write(tmp_path / "one.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
                   ).records()
    assert (recs[0]["first_rw_frame"], recs[0]["last_rw_frame"]) == (1, 1)
    assert (recs[1]["last_rw_frame"], recs[1]["max_in_flight_c2s"]) == (4, 1)


def test_an_open_stall_as_long_as_the_longest_is_not_the_longest(tmp_path: Path) -> None:
    """A stall of 2 ms (frame 3), then one still open at the end, 2 ms long too (frame 5):
    the earliest of equals stays the longest."""
    out: list = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, b"d" * 4096)
    c.fwd[1] += 4096
    c.send(1, Op.CREDIT_UPDATE, delay=2 * MS)
    c.send(0, Op.RW, b"d" * 4096)  # frame 5: the buffer full again, no update follows
    last_ts = out[-1][0]
    tracker = ConnTracker()
    with CaptureReader(str(write(tmp_path / "e.pcap", out))) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    st = tracker.finish(last_ts + 2 * MS)[0].client.stalls
    assert (st.count, st.max_ns, st.total_ns, st.open) == (2, 2 * MS, 4 * MS, True)
    assert st.longest_frame == 3


def test_records_of_a_connection_without_stalls_say_zero(echo: ConnTable) -> None:
    r = echo.records()[0]  # the echo: every write consumed at once
    assert (r["credit_stalls"], r["stall_time"], r["max_stall_ms"]) == (0, 0, 0)
    assert r["stalled_at_end"] is False


def test_a_table_says_which_stream_it_does_not_have(echo: ConnTable) -> None:
    with pytest.raises(IndexError, match=r"^no stream 7$"):
        echo[7]  # streams 0-6
    with pytest.raises(IndexError, match=r"^no stream -1$"):
        echo[-1]


def test_a_capture_that_begins_with_a_full_shutdown_is_closing(tmp_path: Path) -> None:
    """The first frame, a SHUTDOWN(RCV|SEND), shuts both directions of a connection begun
    before the capture; no RST follows: it is closing, closed by that frame."""
    a, s = (3, 50000), (2, 1234)
    frames = [frame(Op.SHUTDOWN, src=a, dst=s, flags=ShutdownFlag.RCV | ShutdownFlag.SEND)]
    t = analyse(write(tmp_path / "shut.pcap", [(T0, f) for f in frames]))
    assert (t[0].close, t[0].close_frame, t[0].close_by) == (Close.CLOSING, 1, "client")


def test_each_connection_gets_its_own_events_when_keys_sort_against_stream_order(
        tmp_path: Path) -> None:
    """One batch, two REQUESTs: stream 0 from CID 3, stream 1 from CID 1. The batch is
    grouped by connection key, where CID 1's comes first, so its two control events arrive
    against stream order; each connection must still list its own REQUEST."""
    s = (2, 1234)
    frames = [frame(Op.REQUEST, src=(3, 50000), dst=s), frame(Op.REQUEST, src=(1, 40000), dst=s)]
    t = analyse(write(tmp_path / "two.pcap", [(T0 + i, f) for i, f in enumerate(frames)]))
    assert [[(e.frame, e.op_name) for e in c.events] for c in t] == [[(1, "REQUEST")],
                                                                   [(2, "REQUEST")]]
    assert [c.client.cid for c in t] == [3, 1]


def test_a_table_of_some_rows_holds_their_connections_whole(tmp_path: Path) -> None:
    """``take`` then ``concat``: the connections of the rows kept, events and all, equal to
    the whole table's (what ``conns --sort F -n N`` keeps of each range)."""
    import vsockmon
    from vsockmon.conntrack.records import ConnTable

    whole = vsockmon.open(echo_capture(tmp_path / "echo.pcap")).analysis().table
    picks = [[1, 3], [], [4, 5, len(whole) - 1]]
    kept = ConnTable.concat([whole.take(np.array(p, dtype=np.int64)) for p in picks])
    assert list(kept) == [whole[i] for p in picks for i in p]
    assert any(c.events for c in kept)  # events came along with their connections


def test_the_record_columns_are_the_records_field_by_field(tmp_path: Path) -> None:
    """``columns()`` (documented for scripts) holds, per field, each record's value."""
    import vsockmon
    from vsockmon.conntrack.tracker import RECORD_FIELDS

    table = vsockmon.open(echo_capture(tmp_path / "echo.pcap")).analysis().table
    cols = table.columns()
    assert sorted(cols) == sorted(f.name for f in RECORD_FIELDS)
    for i, record in enumerate(table.records()):
        row = {k: (c[i].item() if isinstance(c, np.ndarray) else c[i]) for k, c in cols.items()}
        assert row == record
