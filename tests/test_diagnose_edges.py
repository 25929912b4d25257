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
