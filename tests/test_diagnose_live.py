"""Live diagnosis fed frame by frame, the way a capture hands over its frames: numbering
carries on across calls, each finding is reported once, and the capture's end decides what
only it can tell."""

from __future__ import annotations

from helpers import T0, frame

from vsockmon.decode.frames import FrameBatch, decode_batch
from vsockmon.diagnose.engine import Diagnosis, LiveDiagnosis
from vsockmon.diagnose.model import Thresholds
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
