"""Live diagnosis fed frame by frame, the way a capture hands over its frames: numbering
carries on across calls, each finding is reported once, and the capture's end decides what
only it can tell."""

from __future__ import annotations

from helpers import T0, frame

from vsockmon.diagnose.engine import LiveDiagnosis
from vsockmon.diagnose.model import Thresholds
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
