"""Diagnose at its edges: a live view that forgot connections, and the words and numbers a
finding is built from. Each expected value is reasoned from the frames the test builds."""

from __future__ import annotations

from helpers import T0, frame

from vsockmon.diagnose.engine import LiveDiagnosis
from vsockmon.diagnose.model import Finding
from vsockmon.wire.protocol import Op

MS = 1_000_000
SERVER = (2, 1024)


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
