"""Capture statistics on synthetic captures whose every count is known from the scenario:
the op histogram, payload bytes, top CIDs, ports and connections, and throughput bins."""

from __future__ import annotations

from pathlib import Path

from conntrack_scenarios import MS, Conv, write
from helpers import T0

import vsockmon
from vsockmon.analysis.stats import MAX_BUCKETS, StatsCollector
from vsockmon.conntrack.tracker import ConnTracker
from vsockmon.decode.frames import decode_batches
from vsockmon.wire.pcapio import CaptureReader
from vsockmon.wire.protocol import Op, SeqFlag, SockType


def scenario(tmp_path: Path) -> Path:
    """Three connections, frames 1 ms apart (the first at T0 + 1000 ns):

    - stream 0, STREAM 3:50000 → 2:1024: open, 100 bytes each way (each with a
      CREDIT_UPDATE), a Linux close: 9 frames, client 4 (REQUEST, RW, CREDIT_UPDATE,
      SHUTDOWN), server 5;
    - stream 1, SEQPACKET 3:50001 → 2:1024: open, one 300-byte message, close from the
      server: 7 frames;
    - stream 2, STREAM 3:50002 → 2:9000: REQUEST, refusing RST: 2 frames.
    """
    out: list[tuple[int, bytes]] = []
    a = Conv(out, client=(3, 50000), server=(2, 1024))
    for step in (a.open, lambda: a.data(0, bytes(100)), lambda: a.data(1, bytes(100)),
                 a.close):
        step()
    b = Conv(out, client=(3, 50001), server=(2, 1024), type_=SockType.SEQPACKET)
    b.open()
    b.data(0, bytes(300), flags=SeqFlag.EOM)
    b.close(1)
    c = Conv(out, client=(3, 50002), server=(2, 9000))
    c.send(0, Op.REQUEST)
    c.send(1, Op.RST, buf=0)
    return write(tmp_path / "s.pcap", [(T0 + (i + 1) * MS, f) for i, (_, f) in enumerate(out)])


def test_counts_of_the_scenario(tmp_path: Path) -> None:
    s = vsockmon.open(scenario(tmp_path)).stats(top=2, bins=3).to_dict()
    assert (s["frames"], s["frames_without_virtio"], s["connections"]) == (18, 0, 3)
    assert s["payload_bytes"] == 500
    assert (s["first_ts"], s["last_ts"]) == ((T0 + MS) / 1e9, (T0 + 18 * MS) / 1e9)
    assert s["duration"] == 17 * MS / 1e9
    assert s["ops"] == {
        "STREAM": {"REQUEST": 2, "RESPONSE": 1, "RST": 3, "SHUTDOWN": 1, "RW": 2,
                   "CREDIT_UPDATE": 2},
        "SEQPACKET": {"REQUEST": 1, "RESPONSE": 1, "RST": 2, "SHUTDOWN": 1, "RW": 1,
                      "CREDIT_UPDATE": 1}}
    assert s["anomalies"] == {}
    assert s["closes"] == {"graceful": 2, "refused": 1}
    cids = {c["cid"]: c for c in s["top_cids"]}
    assert set(cids) == {2, 3}
    # stream 0: client 4 frames, server 5; stream 1: client REQUEST, RW, 2 RSTs = 4,
    # server RESPONSE, CREDIT_UPDATE, SHUTDOWN = 3; stream 2: client 1, server 1
    assert (cids[3]["packets_sent"], cids[3]["packets_received"]) == (9, 9)
    assert (cids[3]["bytes_sent"], cids[3]["bytes_received"]) == (400, 100)
    assert (cids[2]["label"], cids[2]["connections"], cids[3]["connections"]) == ("2(host)",
                                                                                  3, 3)
    assert [(p["port"], p["connections"], p["bytes"], p["closes"]) for p in s["top_ports"]] == [
        (1024, 2, 500, {"graceful": 2}), (9000, 1, 0, {"refused": 1})]
    assert [(c["stream"], c["bytes"], c["packets"]) for c in s["top_connections"]] == [
        (1, 300, 7), (0, 200, 9)]


def test_throughput_bins_split_the_span_evenly(tmp_path: Path) -> None:
    """17 ms in 17 bins: 1 ms each, plus one for the last frame (at exactly the span's end),
    so each frame has its own bin; the RWs are frames 3 and 5 (100 bytes each, stream 0) and
    12 (300 bytes, stream 1)."""
    s = vsockmon.open(scenario(tmp_path)).stats(bins=17).to_dict()
    assert s["bin_width"] == 0.001
    assert [b["packets"] for b in s["throughput"]] == [1] * 18
    want = [0] * 18
    want[2], want[4], want[11] = 100, 100, 300
    assert [b["bytes"] for b in s["throughput"]] == want
    assert [b["start"] for b in s["throughput"]] == [i * 0.001 for i in range(18)]
    assert s["throughput"][11]["bytes_per_s"] == 300 / 0.001


def test_top_limits_every_list(tmp_path: Path) -> None:
    s = vsockmon.open(scenario(tmp_path)).stats(top=1).to_dict()
    assert [c["cid"] for c in s["top_cids"]] == [2]  # equal packets: the lower CID first
    assert [p["port"] for p in s["top_ports"]] == [1024]
    assert [c["stream"] for c in s["top_connections"]] == [1]


def test_buckets_stay_bounded_and_keep_their_totals(tmp_path: Path) -> None:
    """More distinct microseconds than MAX_BUCKETS: the buckets coarsen, totals stay."""
    n = MAX_BUCKETS + 100
    out: list[tuple[int, bytes]] = []
    c = Conv(out)
    for _ in range(n):
        c.send(0, Op.RW, b"x" * 10, delay=1000)
    path = write(tmp_path / "b.pcap", out)
    stats = StatsCollector()
    tracker = ConnTracker()
    with CaptureReader(str(path)) as reader:
        for fb in decode_batches(reader.batches()):
            stats(fb, tracker.feed(fb))
    assert len(stats.buckets) <= MAX_BUCKETS and stats.resolution == 2000
    assert sum(p for p, _ in stats.buckets.values()) == n
    assert sum(b for _, b in stats.buckets.values()) == 10 * n


def test_an_empty_capture_has_no_times_and_no_throughput(tmp_path: Path) -> None:
    s = vsockmon.open(write(tmp_path / "e.pcap", [])).stats().to_dict()
    assert (s["frames"], s["connections"], s["payload_bytes"]) == (0, 0, 0)
    assert (s["first_ts"], s["last_ts"], s["duration"]) == (None, None, 0.0)
    assert (s["throughput"], s["bin_width"], s["ops"], s["top_cids"]) == ([], 0.0, {}, [])


def test_closes_of_equal_counts_keep_the_order_they_first_came_in(tmp_path: Path) -> None:
    """A refusal, then a Linux close, twice over, all to 2:1024: two of each. Ties keep the
    order of first appearance (a Counter fed one connection at a time), in the capture's
    closes and in the port's, though "graceful" sorts before "refused" by name and by code."""
    out: list[tuple[int, bytes]] = []
    for i in range(4):
        c = Conv(out, client=(3, 50000 + i), server=(2, 1024))
        if i % 2 == 0:
            c.send(0, Op.REQUEST)
            c.send(1, Op.RST, buf=0)
        else:
            c.open()
            c.close()
    stats = vsockmon.open(write(tmp_path / "t.pcap", out)).stats()
    assert list(stats.closes.items()) == [("refused", 2), ("graceful", 2)]
    (port,) = stats.top_ports
    assert (port.port, port.connections) == (1024, 4)
    assert list(port.closes.items()) == [("refused", 2), ("graceful", 2)]
