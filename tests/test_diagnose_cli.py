"""``vsockmon diagnose``: report, JSON Lines, filters, thresholds, exit status, errors."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conntrack_scenarios import Conv, write

from vsockmon.cli import main
from vsockmon.wire.protocol import Op

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["diagnose", *args])
    return result.exit_code, result.stdout, result.stderr


def test_a_refused_connection_among_healthy_ones_is_reported_alone() -> None:
    code, out, _ = run(str(FIXTURES / "diagnose/no-listener.pcap"))
    assert code == 1
    assert "4 connections" in out
    assert out.count("ERROR") == 1 and "no-listener" in out
    assert "stream 2  1:" in out and "→ 1:5101 STREAM" in out
    assert "cause:" in out and "fix:" in out
    assert out.strip().splitlines()[-1] == "verdict: 1 error(s)."


def test_json_lines_one_finding_per_line() -> None:
    code, out, _ = run(str(FIXTURES / "diagnose/no-listener.pcap"), "--json")
    assert code == 1
    (line,) = out.splitlines()
    record = json.loads(line)
    assert (record["rule"], record["severity"], record["stream"], record["frames"]) == (
        "no-listener", "error", 2, [20, 21])
    assert record["message"] and record["fix"] and record["cause"]
    assert record["t"] > 0 and record["evidence"]["target"] == "1:5101"


def test_a_clean_capture_says_so_and_exits_0() -> None:
    code, out, _ = run(str(FIXTURES / "synthetic/seqpacket-ns.pcapng"))
    assert code == 0
    assert out.strip().splitlines()[-1] == "verdict: no problems found in 1 connection(s)."


def test_notes_alone_do_not_fail_the_run() -> None:
    code, out, _ = run(str(FIXTURES / "diagnose/tap-length.pcap"))
    assert code == 0
    assert "INFO tap-length" in out and "no problems found" in out and "1 note(s)" in out


def test_rule_and_severity_filters() -> None:
    path = str(FIXTURES / "diagnose/dial-retry.pcap")
    code, out, _ = run(path, "--json", "--rule", "dial-retry")
    assert code == 1 and [json.loads(x)["rule"] for x in out.splitlines()] == ["dial-retry"]
    code, out, _ = run(path, "--json", "--min-severity", "error")
    assert [json.loads(x)["rule"] for x in out.splitlines()] == ["no-listener"]
    code, out, _ = run(str(FIXTURES / "diagnose/no-transport.pcap"), "--rule", "mid-capture")
    assert code == 0 and "left out by the filters" in out


def test_rule_kind_filter() -> None:
    code, out, _ = run(str(FIXTURES / "diagnose/window-full-deadlock.pcap"), "--json",
                       "--rule", "window-full/not-reading")
    assert (code, out) == (0, "")
    code, out, _ = run(str(FIXTURES / "diagnose/window-full-deadlock.pcap"), "--json",
                       "--rule", "window-full/deadlock")
    assert code == 1 and json.loads(out)["kind"] == "deadlock"


def test_threshold_options() -> None:
    path = str(FIXTURES / "diagnose/window-full.pcap")
    assert run(path)[0] == 1
    code, out, _ = run(path, "--stall", "10")
    assert code == 0 and "window-full/" not in out
    _, help_text, _ = run("--help")
    for option in ("--no-transport", "--stall", "--credit-reply", "--half-close",
                   "--half-close-stall",
                   "--unread-grace", "--small-rw-bytes", "--small-rw-count", "--retry-count",
                   "--retry-gap"):
        assert option in help_text


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.pcap", FIXTURES / "synthetic/ethernet.pcap"):
        code, out, err = run(str(path))
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and err.startswith("Error: ")
    (tmp_path / "junk.pcap").write_bytes(b"not a capture at all")
    code, _, err = run(str(tmp_path / "junk.pcap"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, _ = run(str(FIXTURES / "diagnose/no-listener.pcap"), "--rule", "no-such-rule")
    assert code == 2


def test_truncated_capture_is_diagnosed_up_to_where_it_ends() -> None:
    code, out, err = run(str(FIXTURES / "synthetic/truncated.pcap"))
    assert code == 0 and "warning" in err and "mid-capture/end" in out


def test_gzip_and_stdin(tmp_path: Path) -> None:
    raw = (FIXTURES / "diagnose/no-listener.pcap").read_bytes()
    (tmp_path / "c.pcap.gz").write_bytes(gzip.compress(raw))
    code, out, _ = run(str(tmp_path / "c.pcap.gz"), "--json")
    assert code == 1 and json.loads(out)["rule"] == "no-listener"
    result = CliRunner().invoke(main, ["diagnose", "-", "--json"], input=raw)
    assert result.exit_code == 1 and json.loads(result.stdout)["stream"] == 2


def test_findings_grouped_by_connection_most_severe_first(tmp_path: Path) -> None:
    out_frames: list[tuple[int, bytes]] = []
    reset = Conv(out_frames, client=(3, 50000), server=(2, 1024))
    reset.open()
    reset.data(0, b"hi")
    reset.send(1, Op.RST)  # warning: abrupt
    refused = Conv(out_frames, client=(3, 50001), server=(2, 2000))
    refused.send(0, Op.REQUEST)
    refused.send(1, Op.RST, buf=0)  # error: no listener
    code, out, _ = run(str(write(tmp_path / "t.pcap", out_frames)))
    assert code == 1
    assert out.index("stream 1") < out.index("stream 0")
    assert out.strip().splitlines()[-1] == "verdict: 1 error(s), 1 warning(s)."


def test_conns_has_a_diagnosis_column() -> None:
    result = CliRunner().invoke(main, ["conns", str(FIXTURES / "diagnose/no-listener.pcap")])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].rstrip().endswith("diagnosis")
    flagged = [ln.split()[0] for ln in lines[2:] if "error no-listener" in ln]
    assert flagged == ["2"]


def test_timeline_marks_the_finding_once_at_its_last_frame() -> None:
    result = CliRunner().invoke(main, ["timeline", str(FIXTURES / "diagnose/no-listener.pcap"),
                                       "--conn", "2"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    marks = [i for i, ln in enumerate(lines) if "⚑ ERROR no-listener:" in ln]
    assert len(marks) == 1 and " 21  |" in lines[marks[0] - 1]


@pytest.mark.tshark
def test_export_puts_findings_in_packet_comments(tmp_path: Path) -> None:
    out = tmp_path / "annotated.pcapng"
    result = CliRunner().invoke(main, ["export", str(FIXTURES / "diagnose/no-listener.pcap"),
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    fields = subprocess.run(["tshark", "-r", str(out), "-T", "fields", "-e", "frame.number",
                             "-e", "frame.comment"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    flagged = [ln.split("\t")[0] for ln in fields if "diagnose: ERROR no-listener:" in ln]
    assert flagged == ["20", "21"]


@pytest.mark.tshark
def test_wireshark_plugin_shows_exported_findings_as_expert_info(tmp_path: Path) -> None:
    out = tmp_path / "annotated.pcapng"
    CliRunner().invoke(main, ["export", str(FIXTURES / "diagnose/no-listener.pcap"), "-o",
                              str(out)])
    plugin = FIXTURES.parent / "dissectors/vsockmon.lua"
    rows = subprocess.run(["tshark", "-n", "-X", f"lua_script:{plugin}", "-r", str(out),
                           "-Y", "vsockmon.diagnose.error", "-T", "fields", "-e",
                           "frame.number"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert rows == ["20", "21"]


@pytest.mark.parametrize("name", ["live.pcap", "live.pcapng", None])
def test_capture_diagnose_report_and_the_written_file(tmp_path: Path, name: str | None,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``capture --diagnose``'s report (LiveReport over the capture's real sinks), fed the
    half-closed connection of a lab fixture and stopped long after it (now: the fixture is
    older): a hang live. A pcapng file records the stop and diagnoses the same; a pcap file
    cannot, and the report says what the file will show instead; the line view writes no
    file and has nothing to explain."""
    from vsockmon.cli.diagnose import LiveReport
    from vsockmon.live.capture import FileSink, LineSink, LiveBatch, LiveFrame
    from vsockmon.wire.pcapio import open_capture

    with open_capture(str(FIXTURES / "diagnose/half-close-hang.pcap")) as reader:
        frames = list(reader.records())[:5]
    path = tmp_path / (name or "none")
    sink = FileSink(str(path)) if name else LineSink(io.StringIO())
    report = LiveReport(sink)
    report.write(LiveBatch.of_frames((LiveFrame(r.ts_ns, memoryview(r.data), r.orig_len)
                                      for r in frames), getattr(sink, "record_format", 0)))
    report.close()
    err = capsys.readouterr().err
    assert err.startswith("diagnose: WARNING half-close-hang (stream 0, frames 4,5): "), err
    assert err.endswith("diagnose: 0 error(s), 1 warning(s), 0 note(s)\n"), err
    if name is None:
        assert "file" not in err
        return
    offline = CliRunner().invoke(main, ["diagnose", str(path), "--json"])
    rules = [(f["rule"], f["kind"], f["stream"]) for f in map(json.loads,
                                                             offline.stdout.splitlines())]
    if name.endswith(".pcapng"):
        assert rules == [("half-close-hang", None, 0)] and offline.exit_code == 1
        assert "report differ" not in err
    else:
        assert rules == [("mid-capture", "end", 0)] and offline.exit_code == 0
        assert ("diagnose: the written file ends at its last frame (frame 5, " in err
                and "a pcap file cannot record the stop" in err)
        assert ("diagnose:   not in the file's report: WARNING half-close-hang (stream 0, "
                "frames 4,5)\n") in err
        assert ("diagnose:   only in the file's report: INFO mid-capture/end (stream 0, "
                "frames 5)\n") in err


def test_live_report_says_a_hang_that_became_a_stall_was_replaced_not_cut_by_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """half-close-stall.pcap's first connection written live in two batches: after frame 5
    the silence is a hang (the fixture is hours old, so the clock says so at once); frames
    6-8 bring the late close and the RSTs, which make it a stall. The pcap file reports the
    stall only; the report must say the hang was replaced, and must not blame the file's end
    (the connection closed inside the file)."""
    from vsockmon.cli.diagnose import LiveReport
    from vsockmon.live.capture import FileSink, LiveBatch, LiveFrame
    from vsockmon.wire.pcapio import open_capture

    with open_capture(str(FIXTURES / "diagnose/half-close-stall.pcap")) as reader:
        frames = list(reader.records())[:8]
    sink = FileSink(str(tmp_path / "live.pcap"))
    report = LiveReport(sink)
    for part in (frames[:5], frames[5:]):
        report.write(LiveBatch.of_frames(
            (LiveFrame(r.ts_ns, memoryview(r.data), r.orig_len) for r in part),
            sink.record_format))
    report.close()
    err = capsys.readouterr().err
    hang = "WARNING half-close-hang (stream 0, frames 4,5)"
    assert err.startswith(f"diagnose: {hang}: "), err
    assert "diagnose: WARNING half-close-stall (stream 0, frames 4,6): " in err
    assert (f"diagnose: {hang} was replaced as the connection went on: the file reports what "
            "it became\n") in err
    assert "the written file ends" not in err and "not in the file's report" not in err
    offline = CliRunner().invoke(main, ["diagnose", str(tmp_path / "live.pcap"), "--json"])
    assert [(f["rule"], f["stream"]) for f in map(json.loads, offline.stdout.splitlines())] \
        == [("half-close-stall", 0)]
