"""The analysis commands end to end: conns, timeline, follow, stats (click's test runner)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conntrack_scenarios import Conv, echo_capture, write

from vsockmon.cli import main
from vsockmon.cli.conns import CSV, JSON, record_rows
from vsockmon.conntrack.records import RecordColumn
from vsockmon.conntrack.tracker import RECORD_FIELDS
from vsockmon.decode import _render
from vsockmon.wire.protocol import Op, SeqFlag, SockType


def run(*args: str, ok: bool = True) -> tuple[str, str, int]:
    result = CliRunner().invoke(main, list(args))
    if ok:
        assert result.exit_code == 0, result.output + result.stderr
    return result.stdout, result.stderr, result.exit_code


def run_bytes(*args: str) -> bytes:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.stderr
    return result.stdout_bytes


@pytest.fixture
def echo(tmp_path: Path) -> Path:
    return echo_capture(tmp_path / "echo.pcap")


# -- conns ---------------------------------------------------------------------------------


def test_conns_json_has_one_object_per_connection(echo: Path) -> None:
    out, _, _ = run("conns", str(echo), "--json")
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["stream"] for r in recs] == list(range(7))
    assert list(recs[0]) == [f.name for f in RECORD_FIELDS]
    first = recs[0]
    assert (first["type"], first["client"], first["server"]) == ("STREAM", "1:50000", "1:1234")
    assert (first["bytes_c2s"], first["bytes_s2c"], first["packets_c2s"],
            first["packets_s2c"]) == (12, 12, 4, 5)
    assert first["close"] == "graceful" and first["credit_stalls"] == 0
    assert first["end"] > first["start"] and first["handshake_ms"] == 0.001
    assert [r["close"] for r in recs] == ["graceful", "reset-by-server", "refused", "graceful",
                                          "half-closed", "unanswered", "open"]
    assert recs[6]["start_seen"] is False and recs[6]["request_frame"] is None


def test_conns_json_equals_records(echo: Path) -> None:
    """The column-wise JSON writer says exactly what json.dumps of a record says."""
    import vsockmon

    table = vsockmon.open(echo).analysis().table
    out, _, _ = run("conns", str(echo), "--json")
    assert out.splitlines() == [json.dumps(r) for r in table.records()]


FIXTURES = Path(__file__).parent.parent / "fixtures"
CAPTURES = sorted(p for p in FIXTURES.rglob("*.pcap*") if p.name != "ethernet.pcap")


def _csv_text(rows: list[list[object]]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue().encode()


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_record_rows_are_json_dumps_and_csv_writer_of_the_records(path: Path) -> None:
    """The compiled writer of ``conns --json``/``--csv`` says what json.dumps and
    csv.writer say of each record, for every fixture, in stream order and reordered."""
    import vsockmon

    table = vsockmon.open(path).analysis().table
    for rows in (np.arange(len(table)), np.arange(len(table))[::-1][::2]):
        records = table.records(rows.tolist())
        assert record_rows(table, rows, JSON).text() == "".join(
            json.dumps(r) + "\n" for r in records).encode()
        assert record_rows(table, rows, CSV).text() == _csv_text(
            [["" if v is None else v for v in r.values()] for r in records])


class _EdgeTable:
    """A stand-in for a ConnTable whose every record field takes values at the edges: the
    limits of int64, u32 and u64, negatives, floats of every length, strings JSON and CSV
    must escape, and missing values. ``records`` holds the same values as Python objects."""

    TEXTS = ("STREAM", 'a"b\\c', "tab\tnew\nline", "comma, here", "é…\u2028", "\x00\x1f", "")
    INTS = (0, -1, 2**63 - 1, -(2**63), 2**32 - 1, 2**32, 2**64 - 1, 2**31, 12345)
    FLOATS = (0.0, -0.0, 0.1 + 0.2, 1e-07, 1700000000.0001018, 1e16, 5e-324, 1 / 3, 2.5)

    def __init__(self, n: int = 40) -> None:
        rng = np.random.default_rng(7)
        self.cols: dict[str, RecordColumn] = {}
        values: dict[str, list[object]] = {}
        for f in RECORD_FIELDS:
            missing = rng.random(n) < 0.3 if f.name not in ("client", "server") else None
            if f.name in ("client", "server"):
                cid = rng.choice(np.array([0, 3, 2**64 - 1, 2**32], dtype=np.uint64), n)
                port = rng.choice(np.array([0, 1024, 2**32 - 1], dtype=np.uint32), n)
                self.cols[f.name] = RecordColumn(cid, port=port)
                values[f.name] = [f"{a}:{p}" for a, p in zip(cid.tolist(), port.tolist(),
                                                                  strict=True)]
                continue
            if f.kind is str:
                codes = rng.integers(0, len(self.TEXTS), n)
                self.cols[f.name] = RecordColumn(codes, missing, self.TEXTS)
                values[f.name] = [self.TEXTS[c] for c in codes.tolist()]
            elif f.kind is bool:
                flags = rng.random(n) < 0.5
                self.cols[f.name] = RecordColumn(flags)
                values[f.name] = flags.tolist()
                missing = None
            else:
                pool = self.FLOATS if f.kind is float else self.INTS
                picked = [pool[i] for i in rng.integers(0, len(pool), n).tolist()]
                if f.kind is int and f.name.endswith(("_cid", "_port")):
                    col = np.asarray([v % 2**64 for v in picked], dtype=np.uint64)
                elif f.kind is int:
                    col = np.asarray([v if v < 2**63 else -5 for v in picked], dtype=np.int64)
                else:
                    col = np.asarray(picked, dtype=np.float64)
                self.cols[f.name] = RecordColumn(col, missing)
                values[f.name] = col.tolist()
            if missing is not None:
                values[f.name] = [None if m else v
                                  for v, m in zip(values[f.name], missing.tolist(), strict=True)]
        self.records = [{f.name: values[f.name][i] for f in RECORD_FIELDS} for i in range(n)]

    def record_columns(self) -> dict[str, RecordColumn]:
        return self.cols


@pytest.mark.parametrize("piece", [4096, 4, 1])
def test_record_rows_of_edge_values(piece: int, tmp_path: Path) -> None:
    table = _EdgeTable()
    rows = np.array([5, 0, 39, 17, 17, 3])
    picked = [table.records[i] for i in rows.tolist()]
    got = record_rows(table, rows, JSON).text()  # type: ignore[arg-type]
    assert got == "".join(json.dumps(r) + "\n" for r in picked).encode()
    r = record_rows(table, rows, JSON)  # type: ignore[arg-type]
    with open(tmp_path / "out", "wb") as f:  # written to a descriptor, piece by piece
        _render.write_rows(f.fileno(), r.count, r.which, r.templates, piece)
    assert (tmp_path / "out").read_bytes() == got
    assert got.decode().splitlines() == [json.dumps(r) for r in picked]
    assert record_rows(table, rows, CSV).text() == _csv_text(  # type: ignore[arg-type]
        [["" if v is None else v for v in r.values()] for r in picked])


def test_record_columns_are_the_record_fields(echo: Path) -> None:
    import vsockmon

    table = vsockmon.open(echo).analysis().table
    names = {f.name for f in RECORD_FIELDS}
    assert set(table.record_columns()) == names == set(table.columns())
    assert len(table.record_columns()) == len(RECORD_FIELDS)


def test_conns_csv_has_a_header_and_every_row(echo: Path) -> None:
    out, _, _ = run("conns", str(echo), "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 7 and list(rows[0]) == [f.name for f in RECORD_FIELDS]
    assert rows[2]["close"] == "refused" and rows[2]["response_frame"] == ""


def test_conns_filters_and_sorting(echo: Path) -> None:
    def streams(*args: str) -> list[int]:
        out, _, _ = run("conns", str(echo), "--json", *args)
        return [json.loads(line)["stream"] for line in out.splitlines()]

    assert streams("--cid", "3") == [3, 5, 6]
    assert streams("--port", "1234") == [0, 1]
    assert streams("--type", "seqpacket") == [3]
    assert streams("--close", "refused", "--close", "unanswered") == [2, 5]
    assert streams("--sort=-bytes", "-n", "2") == [6, 0]
    assert streams("--sort", "handshake_ms", "--close", "open", "--close", "refused") == [2, 6]
    _, err, code = run("conns", str(echo), "--sort", "nope", ok=False)
    assert code == 2 and "unknown field 'nope'" in err


def test_conns_table_marks_guessed_roles(echo: Path) -> None:
    out, _, _ = run("conns", str(echo))
    lines = out.splitlines()
    assert "2:1500000?" in lines[8] and "open" in lines[8]
    assert lines[-1] == "7 of 7 connections; 40 frames"


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk").write_bytes(b"this is not a capture")
    for cmd in ("conns", "timeline", "stats"):
        for path in (tmp_path / "missing.pcap", tmp_path / "junk"):
            _, err, code = run(cmd, str(path), ok=False)
            assert code == 1 and err.count("\n") == 1 and err.startswith("Error: ")
    _, err, code = run("follow", str(tmp_path / "junk"), "--conn", "0", ok=False)
    assert code == 1 and "not a pcap" in err


def test_truncated_capture_is_analysed_then_warned(echo: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(echo.read_bytes()[:-30])
    out, err, _ = run("conns", str(cut), "--json")
    assert len(out.splitlines()) == 7
    assert err.startswith("vsockmon: warning: ") and "after packet 39" in err
    assert "analysed the 39 whole packets" in err and err.count("\n") == 1
    for cmd in (["stats"], ["timeline"], ["follow", "--conn", "0"]):
        _, err, _ = run(cmd[0], str(cut), *cmd[1:])
        assert "after packet 39" in err


# -- timeline ------------------------------------------------------------------------------


def test_timeline_ladder_in_the_terminal(echo: Path) -> None:
    out, _, _ = run("timeline", str(echo), "--conn", "0")
    lines = out.splitlines()
    assert lines[0].startswith("stream 0  STREAM  client 1:50000  server 1:1234  graceful")
    assert "REQUEST" in lines[2] and lines[2].rstrip().endswith("▶|")
    assert "RESPONSE" in lines[3] and "|◀" in lines[3]
    assert "RW len=12 credit=262132" in lines[4]
    assert "\x1b[" not in out  # colour only on a terminal
    assert len([ln for ln in lines if "RST" in ln]) == 2


def test_timeline_shortens_long_connections(tmp_path: Path) -> None:
    out_frames: list = []
    c = Conv(out_frames)
    c.open()
    for _ in range(50):
        c.data(0, b"z" * 10)
    path = write(tmp_path / "long.pcap", out_frames)
    out, _, _ = run("timeline", str(path), "--max-rows", "10")
    assert "… 92 packets …" in out and out.count("CREDIT_UPDATE") == 4


def test_timeline_unknown_stream(echo: Path) -> None:
    _, err, code = run("timeline", str(echo), "--conn", "9", ok=False)
    assert code == 1 and "no stream 9 (streams 0-6)" in err


def test_timeline_html_is_self_contained(echo: Path, tmp_path: Path) -> None:
    page = tmp_path / "t.html"
    run("timeline", str(echo), "--html", str(page))
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert text.count("<svg") == 12  # 7 diagrams, 5 plots: refused, unanswered have no data
    assert "REQUEST buf=262144 fwd=0" in text and "in flight client→server" in text
    assert "src=" not in text and "<script" not in text and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    _, err, code = run("timeline", str(echo), "--html", str(page), ok=False)
    assert code == 1 and "exists; use --force" in err
    run("timeline", str(echo), "--conn", "3", "--html", str(page), "--force")
    assert page.read_text().count("<svg") == 2


def test_timeline_png_is_a_picture(echo: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    png = tmp_path / "t.png"
    run("timeline", str(echo), "--conn", "0", "--conn", "3", "--png", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 1000
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 20  # not blank


# -- follow --------------------------------------------------------------------------------


def test_follow_prints_both_directions_in_order(echo: Path) -> None:
    out, _, _ = run("follow", str(echo), "--conn", "0")
    assert out.splitlines()[1:] == [
        "=== client→server segment 0 (frame 3, 12 bytes)", "hello vsock", "",
        "=== server→client segment 1 (frame 5, 12 bytes)", "hello vsock", ""]


def test_follow_seqpacket_messages(echo: Path) -> None:
    out, _, _ = run("follow", str(echo), "--conn", "3", "--dir", "c2s")
    lines = out.splitlines()
    assert "=== client→server message 1 (frames 21-22, 10 bytes, EOR)" in lines
    assert lines[lines.index("=== client→server message 1 (frames 21-22, 10 bytes, EOR)") + 1] \
        == "two-atwo-b"
    assert not any("server→client" in ln for ln in lines[1:])


def test_follow_raw_and_hex_use_the_header_length(tmp_path: Path) -> None:
    """Tap-length frames carry extra bytes: only the first len bytes are the stream's."""
    out_frames: list = []
    c = Conv(out_frames, type_=SockType.STREAM)
    c.open()
    c.send(1, Op.RW, b"ABCD", captured=b"ABCDEFGH")
    c.send(1, Op.RW, b"EFGH")
    c.send(0, Op.RW, bytes(range(20)))
    path = write(tmp_path / "tap.pcap", out_frames)
    assert run_bytes("follow", str(path), "--conn", "0", "--raw", "--dir", "s2c") == b"ABCDEFGH"
    assert run_bytes("follow", str(path), "--conn", "0", "--raw", "--dir", "c2s") == bytes(
        range(20))
    out, _, _ = run("follow", str(path), "--conn", "0", "--hex", "--dir", "c2s")
    assert "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  ................" in out
    _, err, code = run("follow", str(path), "--conn", "0", "--raw", ok=False)
    assert code == 2 and "--raw needs --dir" in err


def test_follow_counts_bytes_a_snap_length_cut(tmp_path: Path) -> None:
    out_frames: list = []
    c = Conv(out_frames, type_=SockType.SEQPACKET)
    c.open()
    c.send(0, Op.RW, b"0123456789", captured=b"0123", flags=SeqFlag.EOM)
    path = write(tmp_path / "snap.pcap", out_frames)
    out, _, _ = run("follow", str(path), "--conn", "0")
    assert "(frame 3, 4 bytes, 6 bytes not captured)" in out


# -- stats ---------------------------------------------------------------------------------


def test_stats_json(echo: Path) -> None:
    out, _, _ = run("stats", str(echo), "--json")
    s = json.loads(out)
    assert s["frames"] == 40 and s["connections"] == 7
    assert s["ops"]["SEQPACKET"]["RW"] == 5 and s["ops"]["STREAM"]["REQUEST"] == 5
    assert s["closes"]["graceful"] == 2 and s["closes"]["refused"] == 1
    assert s["payload_bytes"] == 24 + 5 + 21 + 7 + 200
    cids = {c["cid"]: c for c in s["top_cids"]}
    assert cids[3]["connections"] == 3 and cids[1]["connections"] == 4
    assert s["top_ports"][0]["port"] == 1234 and s["top_ports"][0]["connections"] == 2
    assert s["top_connections"][0]["stream"] == 6
    assert sum(b["packets"] for b in s["throughput"]) == 40
    assert sum(b["bytes"] for b in s["throughput"]) == s["payload_bytes"]


def test_stats_text(echo: Path) -> None:
    out, _, _ = run("stats", str(echo), "--bins", "5")
    assert "40 frames" in out and "packets by op and socket type" in out
    assert "top server ports" in out and "throughput" in out


def test_progress_bar_only_on_a_terminal(echo: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Big files on a terminal get a (transient) rich progress bar on stderr; nothing else
    changes, and pipes never see one."""
    import sys

    from vsockmon.cli import reading

    monkeypatch.setattr(reading, "PROGRESS_MIN_BYTES", 0)
    plain = reading.scan(str(echo))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    shown = reading.scan(str(echo))
    assert "reading" in capsys.readouterr().err
    assert shown.table.records() == plain.table.records()


def test_timeline_png_stacks_at_most_six(echo: Path, tmp_path: Path) -> None:
    _, err, _ = run("timeline", str(echo), "--png", str(tmp_path / "all.png"))
    assert "the PNG shows the first 6 of 7 connections" in err


@pytest.mark.parametrize("field", ["-bytes", "handshake_ms", "-duration", "close",
                                   "-packets_c2s"])
@pytest.mark.parametrize("limit", [1, 4, 100])
def test_the_first_n_in_an_order_are_taken_range_by_range(
        echo: Path, monkeypatch: pytest.MonkeyPatch, field: str, limit: int) -> None:
    """``--sort F -n N`` keeps each range's first N, never the whole table; with ranges of
    3 streams the result must be the whole table's: a stable sort by the field (descending
    with '-'), missing values last, then the first N."""
    import vsockmon
    import vsockmon.conntrack.tracker as tracker

    whole = vsockmon.open(echo).analysis().table.records()
    name = field.lstrip("-")
    present = sorted((r for r in whole if r[name] is not None), key=lambda r: r[name],
                     reverse=field.startswith("-"))
    expected = [r["stream"] for r in present + [r for r in whole if r[name] is None]][:limit]
    monkeypatch.setattr(tracker, "CHUNK", 3)
    out, _, _ = run("conns", str(echo), "--json", f"--sort={field}", "-n", str(limit))
    assert len(whole) > 6  # three ranges at least
    assert [json.loads(line)["stream"] for line in out.splitlines()] == expected
