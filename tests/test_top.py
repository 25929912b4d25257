"""``vsockmon top`` without a screen: the model, the replay feed and the batch CLI.

Expected values come from the fixtures' known truth (fixtures/README.md), from tshark, or
from the frames' headers read with the protocol's field tables — never from top itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import T0, frame

from vsockmon.decode.filter import FilterError
from vsockmon.top.model import JSON_KEYS, TopModel
from vsockmon.top.source import ReplayFeed, SaveError
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import MON_HDR_LEN, VIRTIO_HEADER, Op, ShutdownFlag

FIXTURES = Path(__file__).parent.parent / "fixtures"
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))


def _frames(name: str) -> list[tuple[int, bytes, int]]:
    with open_capture(str(FIXTURES / name)) as reader:
        return [(r.ts_ns, r.data, r.orig_len) for r in reader.records()]


def _virtio(data: bytes) -> dict[str, int]:
    return VIRTIO_HEADER.unpack(data, MON_HDR_LEN)


def _replayed(name: str, **kw: float) -> tuple[TopModel, list[tuple[int, bytes, int]]]:
    model = TopModel(**kw)  # type: ignore[arg-type]
    frames = _frames(name)
    model.feed(frames)
    return model, frames


# -- the model, against the fixtures' truth ---------------------------------------------------


def test_credit_stall_bytes_window_and_close() -> None:
    """fixtures/README.md: 128 KiB sent into a 16 KiB buffer on port 5004, nothing back;
    SHUTDOWN 3 then RST: a graceful close."""
    model, frames = _replayed("real/credit-stall.pcap")
    snap = model.snapshot(frames[-1][0])
    (row,) = snap.rows
    assert (row.server, row.type, row.state) == ("1:5004", "STREAM", "closed")
    assert (row.bytes_c2s, row.bytes_s2c) == (128 * 1024, 0)
    assert row.buf_alloc_c2s == 16384
    assert row.last_op == "RST" and row.ended and row.finding is None
    assert snap.frames == len(frames) == 20


def test_a_full_window_shows_zero_credit_and_a_growing_stall() -> None:
    """window-full.pcap: the reader's 4 KiB buffer fills and it never reads. Where the
    credit runs out is worked out here from the headers: the client's RW lengths add up to
    the server's buf_alloc."""
    frames = _frames("diagnose/window-full.pcap")
    heads = [_virtio(d) for _, d, _ in frames]
    server_port = 5200
    buf = next(h["buf_alloc"] for h in heads if h["op"] == Op.RESPONSE
               and h["src_port"] == server_port)
    sent, full_at = 0, None
    for i, h in enumerate(heads):
        if h["op"] == Op.RW and h["dst_port"] == server_port:
            sent += h["len"]
            if sent >= buf and full_at is None:
                full_at = i
    assert full_at is not None
    model = TopModel()
    model.feed(frames[: full_at + 1])
    later = frames[full_at][0] + 750_000_000  # 0.75 s later, nothing came
    row = next(r for r in model.snapshot(later).rows if r.server == f"1:{server_port}")
    assert row.peer_free_c2s == 0 and row.buf_alloc_c2s == buf
    assert row.bytes_c2s == sent and row.state == "open"
    assert row.stall_ms == pytest.approx(750, abs=0.01)
    assert row.finding is None  # not yet: the rule waits for its threshold (1 s)
    model.feed(frames[full_at + 1:])
    row = next(r for r in model.snapshot(later + 1_000_000_000).rows if r.stream == row.stream)
    assert row.stall_ms == pytest.approx(1750, abs=0.01)
    assert row.finding == "WARNING window-full/not-reading"
    assert row.to_dict()["finding"] == "window-full/not-reading"


@pytest.mark.tshark
def test_many_connections_bytes_match_tshark() -> None:
    out = subprocess.run(
        ["tshark", "-r", str(FIXTURES / "real/many-connections.pcap"), "-Y",
         "vsock.virtio.op == 5", "-T", "fields", "-e", "vsock.virtio.src_prot",
         "-e", "vsock.virtio.dst_prot", "-e", "vsock.virtio.len"],
        capture_output=True, text=True, check=True).stdout
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for line in out.splitlines():
        src, dst, length = map(int, line.split("\t"))
        if dst == 5005:
            want[f"1:{src}"][0] += length
        else:
            want[f"1:{dst}"][1] += length
    model, frames = _replayed("real/many-connections.pcap")
    rows = model.snapshot(frames[-1][0]).rows
    assert len(rows) == 8
    assert {r.client: [r.bytes_c2s, r.bytes_s2c] for r in rows} == want


def test_stream_echo_both_ways() -> None:
    """stream-echo.pcap: "hello vsock\\n", 1000 bytes and "bye\\n", each echoed."""
    model, frames = _replayed("real/stream-echo.pcap")
    (row,) = model.snapshot(frames[-1][0]).rows
    assert row.bytes_c2s == row.bytes_s2c == 12 + 1000 + 4
    assert row.server == "1:5001"


def test_rate_is_bytes_over_the_interval() -> None:
    frames = _frames("real/credit-stall.pcap")
    model = TopModel()
    half = len(frames) // 2
    model.feed(frames[:half])
    t1 = frames[half - 1][0]
    a = model.snapshot(t1).rows[0]
    model.feed(frames[half:])
    t2 = frames[-1][0] + 100_000_000
    b = model.snapshot(t2).rows[0]
    assert b.rate_c2s == pytest.approx((b.bytes_c2s - a.bytes_c2s) / ((t2 - t1) / 1e9), abs=0.1)
    assert b.rate_s2c == 0
    # the first snapshot's interval starts at the first frame
    assert a.rate_c2s == pytest.approx(a.bytes_c2s / ((t1 - frames[0][0]) / 1e9), abs=0.1)
    c = model.snapshot(t2 + 1_000_000_000).rows[0]
    assert c.rate_c2s == 0  # nothing since


def _short_connection(i: int, t: int) -> list[tuple[int, bytes, int]]:
    """A whole STREAM connection on its own client port: connect, 100 bytes, close."""
    c, s = (3, 40000 + i), (2, 9999)
    seq = [frame(Op.REQUEST, src=c, dst=s), frame(Op.RESPONSE, src=s, dst=c),
           frame(Op.RW, b"x" * 100, src=c, dst=s),
           frame(Op.SHUTDOWN, src=c, dst=s, flags=ShutdownFlag.RCV | ShutdownFlag.SEND),
           frame(Op.RST, src=s, dst=c)]
    return [(t + k * 1000, f, len(f)) for k, f in enumerate(seq)]


def test_closed_connections_linger_then_go_and_memory_follows_open_ones() -> None:
    model = TopModel(linger_s=2.0)
    keep_open = [(T0, frame(Op.REQUEST, src=(3, 5), dst=(2, 7)), 0),
                 (T0 + 1, frame(Op.RESPONSE, src=(2, 7), dst=(3, 5)), 0)]
    model.feed(keep_open)
    second = 1_000_000_000
    sizes = []
    for tick in range(1, 31):  # 30 s, 20 short connections a second
        t = T0 + tick * second
        for i in range(20):
            model.feed(_short_connection(tick * 20 + i, t + i * 10_000))
        snap = model.snapshot(t + second // 2)
        sizes.append(len(model.tracks))
        # the tracker and the digest forget with the model: their state follows it
        d = model.diagnosis
        assert d.tracker.working_set == len(model.tracks)
        assert set(d.digest.resets) <= set(model.tracks)
        ended = [r for r in snap.rows if r.ended]
        assert all(r.state == "closed" for r in ended)
        # lingering: those that closed at most linger_s ago (this tick's and the last two)
        assert len(ended) == 20 * min(tick, 3) - (20 if tick >= 3 else 0)
    assert max(sizes) == 1 + 40  # the open one and two seconds of closed ones, not 600
    assert model.diagnosis.tracker.streams == 1 + 600  # the tracker saw them all
    last = model.snapshot(T0 + 40 * second)
    assert [r.stream for r in last.rows] == [0] and list(model.tracks) == [0]
    assert model.diagnosis.tracker.working_set == 1 and not model.diagnosis.digest.resets
    # the open one still counts exactly; a new connection takes the next number
    t = T0 + 41 * second
    model.feed([(t, frame(Op.RW, b"y" * 300, src=(3, 5), dst=(2, 7)), 0),
                *_short_connection(9000, t + 1000)])
    rows = {r.stream: r for r in model.snapshot(t + 2000).rows}
    assert sorted(rows) == [0, 601] and rows[0].bytes_c2s == 300


def test_filter_by_port_on_existing_and_new_frames() -> None:
    frames = _frames("diagnose/window-full.pcap")
    model = TopModel()
    model.feed(frames)
    now = frames[-1][0]
    ports = sorted({r.server for r in model.snapshot(now).rows})
    assert ports == ["1:5200", "1:5201"]
    model.set_filter("port == 5201")
    assert [r.server for r in model.snapshot(now).rows] == ["1:5201"]
    model.set_filter("op == RST")  # only the second one was closed
    assert [r.server for r in model.snapshot(now).rows] == ["1:5201"]
    model.set_filter("")
    assert len(model.snapshot(now).rows) == 2
    with pytest.raises(FilterError):
        model.set_filter("port ==")
    # set before the frames come: they are tried as they are fed
    fresh = TopModel()
    fresh.set_filter("port == 5200 and op == RW")
    fresh.feed(frames)
    assert [r.server for r in fresh.snapshot(now).rows] == ["1:5200"]


def test_json_snapshot_has_exactly_the_issue_keys() -> None:
    model, frames = _replayed("diagnose/window-full.pcap")
    d = model.snapshot(frames[-1][0] + 2_000_000_000, drops=3).to_dict()
    assert list(d) == ["time", "connections", "findings", "frames", "drops"]
    assert d["drops"] == 3 and d["frames"] == len(frames)
    assert list(JSON_KEYS) == ["stream", "client", "server", "type", "state", "bytes_c2s",
                               "bytes_s2c", "rate_c2s", "rate_s2c", "peer_free_c2s",
                               "peer_free_s2c", "stall_ms", "finding"]
    assert all(list(c) == list(JSON_KEYS) for c in d["connections"])
    assert [f["rule"] for f in d["findings"]] == ["window-full"]
    json.dumps(d)


def test_ladder_of_the_recent_packets() -> None:
    """credit-stall.pcap has 20 frames: eight RW of 16384 that each use the whole credit."""
    model = TopModel(recent_rows=5)
    frames = _frames("real/credit-stall.pcap")
    model.feed(frames)
    model.snapshot(frames[-1][0])
    lines = model.ladder_lines(0)
    arrows = [line for line in lines if "|" in line and ("▶" in line or "◀" in line)]
    assert [int(a.split()[1]) for a in arrows] == [16, 17, 18, 19, 20]
    full = TopModel()
    full.feed(frames)
    full.snapshot(frames[-1][0])
    lines = full.ladder_lines(0)
    assert sum("RW len=16384 credit=0 stall" in line for line in lines) == 8
    assert full.ladder_lines(7) == []


# -- the replay feed ---------------------------------------------------------------------------


def test_replay_at_once_and_save_without_overwriting(tmp_path: Path) -> None:
    feed = ReplayFeed(str(FIXTURES / "real/many-connections.pcap"), pace=False).start()
    try:
        got = feed.take()
        assert len(got) == 76 and feed.finished
        assert feed.now_ns() == got[-1][0]
        out = tmp_path / "saved.pcap"
        assert feed.spool.save(str(out)) == 76
        assert [(t, d) for t, d, _ in _frames_of(out)] == [(t, d) for t, d, _ in got]
        with pytest.raises(SaveError, match="exists; not overwritten"):
            feed.spool.save(str(out))
    finally:
        feed.stop()


def _frames_of(path: Path) -> list[tuple[int, bytes, int]]:
    with open_capture(str(path)) as reader:
        return [(r.ts_ns, r.data, r.orig_len) for r in reader.records()]


def test_replay_at_its_own_pace() -> None:
    frames = _frames("diagnose/window-full.pcap")  # its last frames come ~3 s in
    feed = ReplayFeed(str(FIXTURES / "diagnose/window-full.pcap"), pace=True).start()
    try:
        first = feed.take()
        assert 0 < len(first) < len(frames) and not feed.finished
        assert all(t - frames[0][0] < 1_000_000_000 for t, _, _ in first)
    finally:
        feed.stop()


def test_spool_stops_at_its_limit(tmp_path: Path) -> None:
    frames = _frames("real/credit-stall.pcap")
    feed = ReplayFeed(str(FIXTURES / "real/credit-stall.pcap"), pace=False,
                      spool_limit=10_000).start()
    try:
        feed.take()
        assert feed.spool.full
        kept = feed.spool.save(str(tmp_path / "first.pcap"))
        assert 0 < kept < len(frames)
        assert [t for t, _, _ in _frames_of(tmp_path / "first.pcap")] == \
            [t for t, _, _ in frames[:kept]]
    finally:
        feed.stop()


# -- the command -------------------------------------------------------------------------------


def _top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VSOCKMON, "top", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_batch_json_replay() -> None:
    done = _top("-r", str(FIXTURES / "real/stream-echo.pcap"), "--at-once", "--json")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    snap = json.loads(line)
    (conn,) = snap["connections"]
    assert conn["bytes_c2s"] == conn["bytes_s2c"] == 1016
    assert snap["drops"] is None and snap["frames"] == 17


def test_cli_batch_text_paced_replay() -> None:
    done = _top("-r", str(FIXTURES / "diagnose/window-full.pcap"), "-b", "-n", "2", "-d",
                "0.5", "-Y", "port == 5200")
    assert done.returncode == 0, done.stderr
    blocks = [b for b in done.stdout.split("\n\n") if b.strip()]
    assert len(blocks) == 2
    for block in blocks:
        lines = block.splitlines()
        assert lines[0].startswith("vsockmon top - ")
        assert len(lines) == 3 and "1:5200" in lines[2] and "0:4K" in lines[2]


@pytest.mark.parametrize(("args", "message"), [
    (["-r", "no-such.pcap", "-b"], "Error: no-such.pcap: no such file"),
    (["-r", str(FIXTURES / "real/stream-echo.pcap"), "-b", "-Y", "port =="],
     "Error: bad filter"),
    (["--at-once", "-b"], "--at-once needs -r FILE"),
])
def test_cli_errors_are_one_line(args: list[str], message: str) -> None:
    done = _top(*args)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


def test_cli_help_has_examples() -> None:
    done = _top("--help")
    assert done.returncode == 0 and "vsockmon top -b -n 4 -d 2 --json" in done.stdout


def test_capture_path_imports_nothing_heavy() -> None:
    """The live path imports the command and the feed before the link is up: numpy and
    Textual must not come with them (in the lab VM they cost seconds)."""
    code = ("import sys, vsockmon.cli.top; "
            "print(sorted(m for m in ('numpy', 'textual', 'scapy', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
