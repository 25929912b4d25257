"""Live diagnosis fed frame by frame, the way a capture hands over its frames: numbering
carries on across calls, each finding is reported once, and the capture's end decides what
only it can tell."""

from __future__ import annotations

from helpers import T0, frame

from vsockmon.decode.frames import FrameBatch, decode_batch
from vsockmon.diagnose.engine import Diagnosis, LiveDiagnosis
from vsockmon.diagnose.model import Finding, Thresholds
from vsockmon.wire.pcapio import RecordBatch
from vsockmon.wire.protocol import Op

MS = 1_000_000
CLIENT, SERVER = (3, 50000), (2, 1024)


def test_frames_are_numbered_on_across_calls_and_reported_once() -> None:
    live = LiveDiagnosis()
    req = frame(Op.REQUEST, src=CLIENT, dst=SERVER)
    rst = frame(Op.RST, src=SERVER, dst=CLIENT, buf_alloc=0)
    live.feed_frames([(T0, req, len(req))])  # frame 1
    assert live.update(T0 + MS) == []  # a REQUEST 1 ms old: nothing certain yet
    live.feed_frames([(T0 + 2 * MS, rst, len(rst))])  # frame 2
    (f,) = live.update(T0 + 3 * MS)
    assert (f.rule, f.stream, f.frames, f.time_ns) == ("no-listener", 0, (1, 2), T0)
    assert f.evidence["rst_delay_ms"] == 2.0
    assert live.update(T0 + 4 * MS) == [] and live.close(T0 + 4 * MS) == []


def test_only_the_end_of_the_capture_reports_a_cut_off_connection() -> None:
    live = LiveDiagnosis(Thresholds(no_transport_s=5))
    data = frame(Op.RW, b"x", src=CLIENT, dst=SERVER)
    live.feed_frames([(T0, data, len(data))])  # captured mid-connection, still open
    assert [f.rule_id for f in live.update(T0 + MS)] == ["mid-capture/start"]
    assert [(f.rule_id, f.frames) for f in live.close(T0 + MS)] == [("mid-capture/end", (1,))]


def test_live_thresholds_are_the_ones_given() -> None:
    """A REQUEST unanswered for 3 s: no-transport with the 2 s default, nothing with 5 s."""
    req = frame(Op.REQUEST, src=CLIENT, dst=SERVER)
    for thresholds, want in ((None, ["no-transport/no-transport"]),
                             (Thresholds(no_transport_s=5), [])):
        live = LiveDiagnosis(thresholds)
        live.feed_frames([(T0, req, len(req))])
        assert [f.rule_id for f in live.update(T0 + 3000 * MS)] == want


def test_a_diagnosis_is_final_unless_told_and_reads_the_connections_given() -> None:
    """Fed a mid-connection RW: by default the capture has ended (start and end cut off);
    given no connections, nothing concerns one."""
    diag = Diagnosis()
    diag.feed(live_batch(frame(Op.RW, b"x", src=CLIENT, dst=SERVER)))
    assert sorted(f.rule_id for f in diag.findings()) == ["mid-capture/end",
                                                          "mid-capture/start"]
    assert [f.rule_id for f in diag.findings(final=False)] == ["mid-capture/start"]
    assert diag.findings(conns=[]) == []


def live_batch(data: bytes) -> FrameBatch:
    """One frame at T0 as a decoded batch, numbered from 1."""
    batch = RecordBatch(data)
    batch.offsets.append(0)
    batch.caplens.append(len(data))
    batch.orig_lens.append(len(data))
    batch.ts_ns.append(T0)
    return decode_batch(batch, 1)


def test_several_frames_in_one_call() -> None:
    """A REQUEST and its refusing RST handed over together: frames 1 and 2, each its own."""
    live = LiveDiagnosis()
    req = frame(Op.REQUEST, src=CLIENT, dst=SERVER)
    rst = frame(Op.RST, src=SERVER, dst=CLIENT, buf_alloc=0)
    live.feed_frames([(T0, req, len(req)), (T0 + MS, rst, len(rst))])
    (f,) = live.update(T0 + 2 * MS)
    assert (f.rule, f.frames, f.evidence["rst_delay_ms"]) == ("no-listener", (1, 2), 1.0)


# -- a live view that forgot connections; where an open stall ends -----------------------------

def _open(client: tuple[int, int]) -> list[bytes]:
    return [frame(Op.REQUEST, src=client, dst=SERVER),
            frame(Op.RESPONSE, src=SERVER, dst=client)]


def _tap(client: tuple[int, int]) -> bytes:
    """An RW whose header says 10 bytes and whose capture holds 20: the tap-length bug."""
    return frame(Op.RW, bytes(20), src=client, dst=SERVER, length=10)


def _live(*frames: bytes) -> LiveDiagnosis:
    live = LiveDiagnosis()
    live.feed_frames([(T0 + i * MS, f, len(f)) for i, f in enumerate(frames)])
    return live


def _tap_finding(live: LiveDiagnosis) -> Finding:
    (f,) = [f for f in live.findings(final=False) if f.rule == "tap-length"]
    assert (f.evidence["example_len"], f.evidence["example_captured"]) == (10, 20)
    return f


A, B = (3, 50000), (3, 50001)


def test_tap_length_of_a_forgotten_last_connection_names_none() -> None:
    """Streams 0 (A) and 1 (B, the bad frame, its 3rd: frame 5); stream 1 is forgotten: the
    capture-wide fact stays, but no connection that is still known is named."""
    live = _live(*_open(A), *_open(B), _tap(B))
    assert _tap_finding(live).streams == (1,)
    live.forget({1})
    f = _tap_finding(live)
    assert (f.stream, f.streams, f.frames, f.connection) == (None, (), (5,), "")


def test_tap_length_of_a_forgotten_first_connection_leaves_a_gap() -> None:
    """The bad frame on stream 0 (frame 3), stream 1 still open: forgetting stream 0 leaves
    the live view with stream 1 only, and the finding names no connection."""
    live = _live(*_open(A), _tap(A), *_open(B))
    live.forget({0})
    f = _tap_finding(live)
    assert (f.stream, f.streams, f.frames) == (None, (), (3,))


def test_tap_length_names_a_connection_the_live_view_still_has_after_a_gap() -> None:
    """Stream 0 forgotten, the bad frame on stream 1 (frame 5): stream 1 is named."""
    live = _live(*_open(A), *_open(B), _tap(B))
    live.forget({0})
    f = _tap_finding(live)
    assert (f.stream, f.streams, f.frames) == (1, (1,), (5,))
    assert f.connection == "3:50001 → 2:1024 STREAM"


def test_tap_length_lists_the_first_twenty_frames_and_counts_them_all() -> None:
    """25 bad frames after the handshake (frames 3-27): the finding shows frames 3-22 (its
    20 examples, as cid-mismatch does) and counts 25."""
    live = _live(*_open(A), *[_tap(A)] * 25)
    f = _tap_finding(live)
    assert f.frames == tuple(range(3, 23)) and f.evidence["frames_affected"] == 25
    assert "25 frame(s)" in f.message and "first at frame 3" in f.message


def test_a_diagnosis_ends_an_open_stall_when_it_is_told() -> None:
    """The server's buffer is 100 bytes; the client's RW of 100 at frame 3 (T0 + 2 ms) fills
    it and nothing frees it: the stall runs to the end given (T0 + 5 s), else to the last
    frame fed (the RW itself, so 0 s)."""
    diag = LiveDiagnosis()
    diag.feed_frames([(T0, frame(Op.REQUEST, src=A, dst=SERVER), 44),
                      (T0 + MS, frame(Op.RESPONSE, src=SERVER, dst=A, buf_alloc=100), 44),
                      (T0 + 2 * MS, frame(Op.RW, bytes(100), src=A, dst=SERVER), 144)])
    (until_end,) = diag.connections(T0 + 5000 * MS)
    assert (until_end.client.stalls.count, until_end.client.stalls.total_ns) == (
        1, 5000 * MS - 2 * MS)
    (until_last,) = diag.connections()
    assert until_last.client.stalls.total_ns == 0


def test_the_digest_spans_the_earliest_to_the_latest_time_fed() -> None:
    """Two batches: the first holds the earliest (T0) and the latest (T0 + 5 ms) times, the
    second only times between them: the span stays T0 to T0 + 5 ms."""
    live = LiveDiagnosis()
    req = frame(Op.REQUEST, src=CLIENT, dst=SERVER)
    live.feed_frames([(T0 + 5 * MS, req, len(req)), (T0, req, len(req))])
    live.feed_frames([(T0 + 3 * MS, req, len(req)), (T0 + 2 * MS, req, len(req))])
    assert (live.digest.start_ns, live.digest.end_ns) == (T0, T0 + 5 * MS)


def test_forgetting_a_connection_drops_what_was_kept_for_it_and_nothing_else() -> None:
    """Streams 0 (A) and 1 (B) each send 100 unread bytes and are reset by the server: both
    abrupt closes are reported once. Forgetting stream 0 drops its reset and its waiting
    bytes from the digest, keeps stream 1's, and reports nothing again."""
    live = LiveDiagnosis()
    frames = []
    for client in (A, B):
        frames += [*_open(client), frame(Op.RW, bytes(100), src=client, dst=SERVER),
                   frame(Op.RST, src=SERVER, dst=client)]
    live.feed_frames([(T0 + i * MS, f, len(f)) for i, f in enumerate(frames)])
    first = live.update(T0 + 100 * MS)
    assert sorted((f.rule_id, f.stream, f.streams) for f in first) == [
        ("abrupt-close/reset", 0, (0,)), ("abrupt-close/reset", 1, (1,))]
    assert set(live.digest.resets) == {0, 1} and set(live.digest.pending) == {(0, 0), (1, 0)}
    live.forget({0})
    assert set(live.digest.resets) == {1} and set(live.digest.pending) == {(1, 0)}
    assert [c.stream for c in live.connections()] == [1]
    assert live.update(T0 + 200 * MS) == []


def test_forgetting_a_connection_keeps_the_stalls_of_the_others() -> None:
    """Stream 0 (A) opens and stays idle; on stream 1 (B) the server's 100-byte buffer is
    filled by the RW at frame 5 (T0 + 4 ms) and freed by its CREDIT_UPDATE 1.5 s later:
    a finished 1.5 s stall of stream 1, kept when stream 0 is forgotten, dropped with
    stream 1."""
    live = LiveDiagnosis()
    frames = [(T0, frame(Op.REQUEST, src=A, dst=SERVER)),
              (T0 + MS, frame(Op.RESPONSE, src=SERVER, dst=A)),
              (T0 + 2 * MS, frame(Op.REQUEST, src=B, dst=SERVER)),
              (T0 + 3 * MS, frame(Op.RESPONSE, src=SERVER, dst=B, buf_alloc=100)),
              (T0 + 4 * MS, frame(Op.RW, bytes(100), src=B, dst=SERVER)),
              (T0 + 1504 * MS, frame(Op.CREDIT_UPDATE, src=SERVER, dst=B, buf_alloc=100,
                                     fwd_cnt=100))]
    live.feed_frames([(t, f, len(f)) for t, f in frames])
    live.forget({0})
    assert [(st.stream, st.start_frame, st.end_frame) for st in live.digest.stalls] == [
        (1, 5, 6)]
    (f,) = live.findings(final=False)
    assert (f.rule_id, f.stream, f.frames, f.evidence["seconds"]) == (
        "window-full/not-reading", 1, (5, 6), 1.5)
    live.forget({1})
    assert live.digest.stalls == [] and live.findings(final=False) == []


def test_a_cut_off_connection_is_still_held_at_the_stop_it_was_reported_at() -> None:
    """A connection captured mid-way (an RW at T0) and still open: the close at T0 + 1 ms
    reports its cut-off end; at that same stop the live view, which measures at the capture's
    end, still holds both findings: none was replaced by what the connection became."""
    live = LiveDiagnosis()
    data = frame(Op.RW, b"x", src=CLIENT, dst=SERVER)
    live.feed_frames([(T0, data, len(data))])
    reported = live.update(T0 + MS) + live.close(T0 + MS)
    assert [f.rule_id for f in reported] == ["mid-capture/start", "mid-capture/end"]
    assert live.replaced(reported, T0 + MS) == []


def test_the_digest_counts_every_rw_beyond_credit_across_batches() -> None:
    """The server's buffer is 4096 bytes: the client's RW of 4200 (frame 3) goes past it;
    the server reads 4100 (frame 4); the client's RW of 4000 (frame 5, fed in a second call)
    puts 4100 in flight, past it again: two RWs beyond credit, 4200 in flight at worst."""
    live = LiveDiagnosis()
    opening = [frame(Op.REQUEST, src=A, dst=SERVER),
               frame(Op.RESPONSE, src=SERVER, dst=A, buf_alloc=4096),
               frame(Op.RW, bytes(4200), src=A, dst=SERVER),
               frame(Op.CREDIT_UPDATE, src=SERVER, dst=A, buf_alloc=4096, fwd_cnt=4100)]
    live.feed_frames([(T0 + i * MS, f, len(f)) for i, f in enumerate(opening)])
    more = frame(Op.RW, bytes(4000), src=A, dst=SERVER)
    live.feed_frames([(T0 + 4 * MS, more, len(more))])
    e = live.digest.beyond[(0, 0)]
    assert (e.count, e.first_frame, e.last_frame, e.max_in_flight) == (2, 3, 5, 4200)
    assert (e.length, e.credit, e.limit) == (4200, 4096, 4096)


def test_waiting_bytes_are_timed_from_their_own_batch_whatever_else_it_holds() -> None:
    """First call: stream 0 (A) sends 100 bytes the server reads at once (nothing waits at
    the end of the call), stream 1 (B) opens after it. Second call, 300 ms later: A sends 50
    bytes and closes, the server resets 5 ms after them. Those bytes waited 5 ms, under the
    10 ms grace: a reset, not data discarded."""
    live = LiveDiagnosis()
    first = [frame(Op.REQUEST, src=A, dst=SERVER), frame(Op.RESPONSE, src=SERVER, dst=A),
             frame(Op.RW, bytes(100), src=A, dst=SERVER),
             frame(Op.CREDIT_UPDATE, src=SERVER, dst=A, fwd_cnt=100),
             *_open(B)]
    live.feed_frames([(T0 + i * MS, f, len(f)) for i, f in enumerate(first)])
    second = [(T0 + 300 * MS, frame(Op.RW, bytes(50), src=A, dst=SERVER)),
              (T0 + 301 * MS, frame(Op.SHUTDOWN, src=A, dst=SERVER, flags=3)),
              (T0 + 305 * MS, frame(Op.RST, src=SERVER, dst=A, fwd_cnt=100))]
    live.feed_frames([(t, f, len(f)) for t, f in second])
    assert live.digest.pending[(0, 0)] == T0 + 300 * MS
    assert [f.rule_id for f in live.findings(final=False)] == []
