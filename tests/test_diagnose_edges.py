"""Diagnose at its edges: a live view that forgot connections, and the words and numbers a
finding is built from. Each expected value is reasoned from the frames the test builds."""

from __future__ import annotations

from pathlib import Path

import pytest
from conntrack_scenarios import Conv, write
from helpers import T0, frame

import vsockmon
from vsockmon.diagnose.engine import LiveDiagnosis
from vsockmon.diagnose.model import Finding, Severity, Thresholds
from vsockmon.diagnose.rules.common import delay_text
from vsockmon.wire.protocol import Op, ShutdownFlag

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


def _findings(tmp_path: Path, out: list[tuple[int, bytes]],
              t: Thresholds | None = None) -> list[Finding]:
    return vsockmon.open(write(tmp_path / "t.pcap", out)).findings(t)


def test_a_late_answer_to_a_credit_request_is_timed_to_the_answer(tmp_path: Path) -> None:
    """Frame 3 fills the server's 4096 bytes, frame 4 asks for credit, frame 5 answers
    1.0015 s later (a CREDIT_UPDATE that frees the window); the close comes 3 s after that.
    The request went unanswered for 1.0015 s (1.002 in ms, rounded up), not until the
    capture's end (4 s). stall_s is
    raised to 10 s: only the unanswered request reports this stall."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(0, Op.CREDIT_REQUEST)
    c.fwd[1] += 4096
    c.send(1, Op.CREDIT_UPDATE, delay=1_001_500_000)
    c.send(0, Op.SHUTDOWN, flags=ShutdownFlag.RCV | ShutdownFlag.SEND, delay=3000 * MS)
    c.send(1, Op.RST)
    (f,) = _findings(tmp_path, out, Thresholds(stall_s=10))
    assert (f.rule_id, f.frames) == ("window-full/credit-request-unanswered", (3, 4, 5))
    assert f.evidence["unanswered_s"] == 1.002 and "nothing for 1.0 s" in f.message



@pytest.mark.parametrize(("speaker", "kind"), [(0, "credit-request-unanswered"),
                                               (1, "not-reading")])
def test_only_the_peer_can_answer_a_credit_request(tmp_path: Path, speaker: int,
                                                   kind: str) -> None:
    """Frame 3 fills the server's 4096 bytes, frame 4 is the client's CREDIT_REQUEST, 1 ms
    later a CREDIT_UPDATE about the *client's* buffer from ``speaker``, which frees nothing;
    another connection's packet ends the capture 2 s after the request. The client's own
    packet answers nothing: the request stays unanswered for the full 2 s. A packet from
    the server is its answer (the server is alive, its application just does not read): the
    stall is a receiver that stopped reading."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out, buf=[262144, 4096])
    c.open()
    c.send(0, Op.RW, bytes(4096))
    c.send(0, Op.CREDIT_REQUEST)
    c.send(speaker, Op.CREDIT_UPDATE, delay=MS)
    Conv(out, client=(1, 60000)).send(0, Op.REQUEST, delay=2000 * MS - MS)
    (f,) = [f for f in _findings(tmp_path, out) if f.rule == "window-full"]
    assert f.kind == kind
    if speaker == 0:
        assert f.evidence["unanswered_s"] == 2.0


def test_an_accept_queue_overflow_names_the_connection_still_waiting(tmp_path: Path) -> None:
    """Stream 0 is accepted (frames 1, 2) and stays open; 3 ms after its RESPONSE, stream 1's
    REQUEST to the same port (frame 3) is refused by an RST (frame 4): the port listens but
    its queue was full. The finding names stream 0 and says how long before it was
    accepted."""
    out: list[tuple[int, bytes]] = []
    Conv(out).open()
    refused = Conv(out, client=(1, 50001))
    refused.send(0, Op.REQUEST, delay=3 * MS)
    refused.send(1, Op.RST, buf=0)
    (f,) = [f for f in _findings(tmp_path, out) if f.severity >= Severity.WARNING]
    assert (f.rule, f.stream, f.frames) == ("accept-queue-full", 1, (2, 3, 4))
    assert f.evidence["accepted_stream"] == 0
    assert "accepted stream 0 (RESPONSE at frame 2, 3.0 ms earlier, still open)" in f.message


@pytest.mark.parametrize(("ns", "text"), [(999_999, "1000 µs"), (1_000_000, "1.0 ms"),
                                          (1_050_001, "1.1 ms"), (71_000, "71 µs")])
def test_a_delay_in_words(ns: int, text: str) -> None:
    """Microseconds below a millisecond, then milliseconds to one decimal (1.050001 ms
    rounds up)."""
    assert delay_text(ns) == text


def test_the_rst_delay_is_given_to_the_microsecond(tmp_path: Path) -> None:
    """An RST 1.5 µs after the REQUEST: 0.0015 ms, given in ms to three decimals (the µs)
    and rounded up, 0.002."""
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    c.send(0, Op.REQUEST)
    c.send(1, Op.RST, buf=0, delay=1500)
    (f,) = _findings(tmp_path, out)
    assert (f.rule, f.evidence["rst_delay_ms"]) == ("no-listener", 0.002)
