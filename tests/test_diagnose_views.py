"""Findings arranged for the outputs (conns column, timeline markers, pcapng comments,
diagnose filters), on hand-made findings whose arrangement is stated in each test."""

from __future__ import annotations

from vsockmon.diagnose.model import Finding, Severity, rank
from vsockmon.diagnose.views import (
    findings_by_frame,
    findings_by_stream,
    frame_notes,
    markers,
    matching_findings,
    stream_summary,
    worst_by_stream,
)


def finding(rule: str, severity: Severity, stream: int | None, frames: tuple[int, ...],
            kind: str | None = None, streams: tuple[int, ...] = ()) -> Finding:
    return Finding(rule, severity, stream, frames, f"{rule} says", "cause", "fix", kind=kind,
                   streams=streams or ((stream,) if stream is not None else ()))


A = finding("tap-length", Severity.INFO, 0, (3, 4))
B = finding("dial-retry", Severity.WARNING, 0, (1, 5), streams=(0, 2))
C = finding("no-listener", Severity.ERROR, 2, (5, 6))
D = finding("window-full", Severity.ERROR, 1, (9,), kind="deadlock")
E = finding("capture-wide", Severity.WARNING, None, (7,))
ALL = [A, B, C, D, E]


def test_rank_is_severity_then_stream_then_first_frame() -> None:
    assert rank(ALL) == [D, C, B, E, A]  # errors by stream; warnings: capture-wide last


def test_rank_puts_stream_zero_before_stream_one_whatever_their_frames() -> None:
    """Stream 0's finding shows at frame 8, stream 1's at frame 2: the stream decides."""
    zero = finding("abrupt-close", Severity.WARNING, 0, (8,))
    one = finding("abrupt-close", Severity.WARNING, 1, (2,))
    assert rank([one, zero]) == [zero, one]


def test_rank_reads_only_the_first_frame_then_the_rule() -> None:
    """Two findings of one stream that both start at frame 3: the rule id orders them, not
    their second frames (9 for abrupt-close, 4 for window-full)."""
    a = finding("abrupt-close", Severity.WARNING, 0, (3, 9))
    w = finding("window-full", Severity.WARNING, 0, (3, 4))
    assert rank([w, a]) == [a, w]


def test_by_stream_lists_every_stream_a_finding_concerns() -> None:
    by = findings_by_stream(ALL)
    assert by == {0: [B, A], 1: [D], 2: [C, B], None: [E]}
    assert worst_by_stream(ALL) == {0: B, 1: D, 2: C}


def test_by_frame_and_notes() -> None:
    assert findings_by_frame(ALL) == {3: [A], 4: [A], 1: [B], 5: [B, C], 6: [C], 9: [D],
                                      7: [E]}
    notes = frame_notes(ALL)
    assert notes[5] == ["ERROR no-listener: no-listener says",
                        "WARNING dial-retry: dial-retry says"]
    assert notes[9] == ["ERROR window-full/deadlock: window-full says"]
    assert sorted(notes) == [1, 3, 4, 5, 6, 7, 9]


def test_markers_sit_at_the_last_shown_frame() -> None:
    assert markers(ALL, [1, 3, 4, 6]) == {
        4: ["INFO tap-length: tap-length says"], 1: ["WARNING dial-retry: dial-retry says"],
        6: ["ERROR no-listener: no-listener says"]}
    assert markers(ALL, []) == {}


def test_stream_summary_from_warning_up_with_the_count_of_others() -> None:
    assert stream_summary(ALL) == {0: "warning dial-retry", 1: "error window-full/deadlock",
                                   2: "error no-listener +1"}
    assert stream_summary(ALL, Severity.INFO) == {0: "warning dial-retry +1",
                                                  1: "error window-full/deadlock",
                                                  2: "error no-listener +1"}
    assert stream_summary(ALL, Severity.ERROR) == {1: "error window-full/deadlock",
                                                   2: "error no-listener"}


def test_matching_by_rule_kind_and_severity() -> None:
    assert matching_findings(ALL) == ALL
    assert matching_findings(ALL, ["window-full/deadlock", "tap-length"]) == [A, D]
    assert matching_findings(ALL, ["window-full"]) == [D]
    assert matching_findings(ALL, ["window-full/other"]) == []
    assert matching_findings(ALL, min_severity=Severity.WARNING) == [B, C, D, E]
    assert matching_findings(ALL, ["tap-length"], Severity.WARNING) == []


def test_a_finding_as_json() -> None:
    f = Finding("dial-retry", Severity.WARNING, 0, (1, 5), "m", "c", "x", kind=None,
                streams=(0, 2), time_ns=3_000_000_123, connection="a → b STREAM",
                evidence={"attempts": 3})
    assert f.rule_id == "dial-retry"
    assert f.to_dict() == {"rule": "dial-retry", "kind": None, "severity": "warning",
                           "stream": 0, "streams": [0, 2], "frames": [1, 5],
                           "time_ns": 3_000_000_123, "connection": "a → b STREAM",
                           "message": "m", "cause": "c", "fix": "x",
                           "evidence": {"attempts": 3}}
    assert f.to_dict(start_ns=1_000_000_000)["t"] == 2.000000123
    wide = Finding("x", Severity.INFO, None, (), "m", "c", "f")
    assert (wide.to_dict(0)["streams"], "t" in wide.to_dict(0)) == ([], False)
    assert Severity.parse("Error") is Severity.ERROR and str(Severity.INFO) == "info"


def test_a_finding_names_its_stream_when_it_lists_no_others() -> None:
    f = Finding("x", Severity.INFO, 3, (1,), "m", "c", "f", connection="1:2 → 3:4 STREAM")
    assert f.to_dict()["streams"] == [3]
    assert '"connection": "1:2 → 3:4 STREAM"' in f.to_json()  # UTF-8 kept, not escaped
