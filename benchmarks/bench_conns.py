#!/usr/bin/env python3
"""Connection analysis speed and memory: ``vsockmon conns --json`` against tshark and scapy.

Builds big captures in a temporary directory by scaling up real lab traffic — every
``fixtures/real/*.pcap`` (or, while those do not exist, the synthetic connections of
``tests/conntrack_scenarios.py`` plus a credit-stalled bulk transfer) — copied over and
over, each copy with fresh client ports and later times, payloads snapped at ``--snap``
bytes (as ``tcpdump -s`` would; the virtio ``len`` keeps the real sizes). Then times, in
one run and on the same file:

- ``vsockmon conns FILE --json``             every connection, all fields
- ``tshark -r FILE -T fields -e …``          only extracting the fields the tracker reads
- scapy ``rdpcap`` (with vsockmon's layer) + reading those fields from every packet

and prints seconds, packets/s, ratios, and each process's peak RSS (``wait4``). vsockmon
also runs on a capture twice as big: its memory follows connections, not packets.

Usage: ``benchmarks/bench_conns.py [--packets N] [--snap BYTES] [--keep DIR]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from vsockmon.decode.frames import decode_batches  # noqa: E402
from vsockmon.wire.pcapio import open_capture  # noqa: E402
from vsockmon.wire.protocol import MON_HDR_LEN, VIRTIO_HEADER, VSOCKMON_HEADER, Op  # noqa: E402


def measure(cmd: list[str], out: Path | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one command, its
    output discarded (or kept in ``out``), from GNU time (a child forked from this big
    Python would count its pages as the command's peak). Exit status 1 is a result
    (``diagnose`` found problems)."""
    with (tempfile.NamedTemporaryFile("r") as report,
          open(out or os.devnull, "wb") as sink):
        proc = subprocess.run(["/usr/bin/time", "-q", "-o", report.name, "-f", "%e %U %S %M",
                               *cmd], stdout=sink, stderr=subprocess.DEVNULL, check=False)
        if proc.returncode not in (0, 1):
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
        wall, user, system, rss_kib = report.read().split()[-4:]
    return float(wall), float(user) + float(system), int(rss_kib) / 1024


EPHEMERAL = 10000
"""Ports at or above this are clients' (Linux picks random ones above 1024; the lab's and
the scenarios' services listen below): each copy moves them, so its connections are new."""

SCAPY = """
import sys
import vsockmon.wire.layers
from scapy.utils import rdpcap
from vsockmon.wire.layers import VirtioVsock
n = 0
for pkt in rdpcap(sys.argv[1]):
    v = pkt[VirtioVsock]
    fields = (pkt.time, v.src_cid, v.dst_cid, v.src_port, v.dst_port, v.len, v.type, v.op,
              v.flags, v.buf_alloc, v.fwd_cnt)
    n += 1
print(n)
"""


def template(snap: int) -> tuple[list[tuple[int, bytes, int]], str]:
    """The traffic to copy: (time, snapped frame, original length) of every packet."""
    real = sorted((ROOT / "fixtures" / "real").glob("*.pcap"))
    if real:
        paths, what = real, f"{len(real)} real lab captures"
    else:
        paths, what = [synthetic()], "synthetic lab-like traffic (no fixtures/real yet)"
    out: list[tuple[int, bytes, int]] = []
    shift = 0
    for path in paths:
        with open_capture(str(path)) as reader:
            recs = list(reader.records())
        if not recs:
            continue
        base = recs[0].ts_ns
        for r in recs:
            out.append((r.ts_ns - base + shift, r.data[: MON_HDR_LEN + 44 + snap], r.orig_len))
        shift = out[-1][0] + 1_000_000
    return out, what


def synthetic() -> Path:
    """Scenario connections plus a 256 KiB transfer into a 16 KiB buffer (stalls)."""
    from conntrack_scenarios import Conv, echo_capture, write

    tmp = Path(tempfile.mkdtemp())
    frames: list[tuple[int, bytes]] = []
    echo = echo_capture(tmp / "echo.pcap")
    with open_capture(str(echo)) as reader:
        frames += [(r.ts_ns, r.data) for r in reader.records()]
    bulk = Conv(frames, client=(1, 3_000_000_000), server=(1, 5004), buf=[262144, 16384])
    bulk.open()
    for _ in range(64):
        bulk.send(0, Op.RW, b"b" * 4096)
        bulk.fwd[1] += 4096
        bulk.send(1, Op.CREDIT_UPDATE, delay=20_000)
    bulk.send(0, Op.SHUTDOWN, flags=3)
    bulk.send(1, Op.RST)
    return write(tmp / "template.pcap", frames)


def _port_offsets() -> list[int]:
    mon = [f.offset for f in VSOCKMON_HEADER.fields if f.name in ("src_port", "dst_port")]
    vio = [MON_HDR_LEN + f.offset for f in VIRTIO_HEADER.fields
           if f.name in ("src_port", "dst_port")]
    return mon + vio


def build(path: Path, tmpl: list[tuple[int, bytes, int]], packets: int) -> None:
    """``packets`` packets: copies of the template, ports moved, times after each other."""
    recs = []
    for _ts, data, orig in tmpl:
        recs.append(np.frombuffer(
            np.array([0, 0, len(data), orig], dtype="<u4").tobytes() + data, np.uint8))
    lens = np.array([len(r) for r in recs])
    starts = np.r_[0, np.cumsum(lens)[:-1]]
    blob = np.concatenate(recs)
    times = np.array([t for t, _, _ in tmpl], dtype=np.int64)
    period = int(times[-1]) + 1_000_000
    offsets = np.array(_port_offsets())
    port_pos = (starts[:, None] + 16 + offsets).ravel()  # record by record
    port_pos = port_pos[port_pos + 4 <= np.repeat(starts + lens, len(offsets))]
    base_ports = _u32(blob, port_pos)
    client = base_ports >= EPHEMERAL
    t0 = 1_700_000_000 * 10**9
    with open(path, "wb") as fp:
        fp.write(np.array([0xA1B23C4D, 0x00040002, 0, 0, 262144, 271], "<u4").tobytes())
        copies = -(-packets // len(tmpl))
        for k in range(copies):
            out = blob.copy()
            moved = np.where(client, (base_ports + k * 7919) % (1 << 32), base_ports)
            _put_u32(out, port_pos, moved)
            ts = t0 + k * period + times
            _put_u32(out, starts, ts // 10**9)
            _put_u32(out, starts + 4, ts % 10**9)
            left = packets - k * len(tmpl)
            if left < len(tmpl):
                out = out[: starts[left]]
            fp.write(out.tobytes())


def _u32(buf: np.ndarray, pos: np.ndarray) -> np.ndarray:
    b = buf[pos[:, None] + np.arange(4)].astype(np.int64)
    return b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24


def _put_u32(buf: np.ndarray, pos: np.ndarray, values: np.ndarray) -> None:
    for i in range(4):
        buf[pos + i] = (values >> (8 * i)) & 0xFF


def count(path: Path) -> tuple[int, int]:
    """Packets and connections, by vsockmon itself (to label the results)."""
    from vsockmon.conntrack.tracker import ConnTracker

    tracker = ConnTracker()
    with open_capture(str(path)) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    return tracker.frames, tracker.streams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--snap", type=int, default=256, help="payload bytes kept per frame")
    ap.add_argument("--keep", type=Path, help="build the captures here and keep them")
    ap.add_argument("--no-scapy", action="store_true", help="skip scapy (minutes on 1M)")
    args = ap.parse_args()
    tmpl, what = template(args.snap)
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        small, big = where / "bench-1x.pcap", where / "bench-2x.pcap"
        build(small, tmpl, args.packets)
        build(big, tmpl, 2 * args.packets)
        n, conns = count(small)
        n2, conns2 = count(big)
        vsockmon = [str(ROOT / ".venv" / "bin" / "vsockmon"), "conns"]
        fields = ["frame.number", "frame.time_epoch",
                  *(f.wireshark for f in VIRTIO_HEADER.fields)]
        tshark = ["tshark", "-n", "-r", str(small), "-T", "fields"]
        for name in fields:
            tshark += ["-e", name]
        json_out = where / "conns.jsonl"
        results = {"vsockmon conns --json": measure([*vsockmon, str(small), "--json"],
                                                    json_out),
                   "tshark -T fields": measure(tshark)}
        lines = len(json_out.read_bytes().splitlines())
        assert lines == conns, (lines, conns)
        if not args.no_scapy:
            results["scapy rdpcap + fields"] = measure([sys.executable, "-c", SCAPY,
                                                        str(small)])
        _, big_cpu, big_rss = measure([*vsockmon, str(big), "--json"])
        size = small.stat().st_size / 2**20
    ours = results["vsockmon conns --json"][1]
    print(f"traffic: {what}; payloads snapped at {args.snap} bytes")
    print(f"capture: {n:,} packets, {conns:,} connections, {size:,.0f} MiB")
    print(f"{'tool':<24} {'wall s':>7} {'CPU s':>7} {'packets/CPU s':>14} {'peak RSS':>9} "
          f"{'CPU vs vsockmon':>16}")
    for tool, (wall, cpu, rss) in results.items():
        print(f"{tool:<24} {wall:7.2f} {cpu:7.2f} {n / cpu:14,.0f} {rss:7.0f}Mi "
              f"{cpu / ours:15.1f}x")
    small_rss = results["vsockmon conns --json"][2]
    print(f"vsockmon memory: {small_rss:.0f} MiB for {n:,} packets / {conns:,} connections; "
          f"{big_rss:.0f} MiB for {n2:,} packets / {conns2:,} connections "
          f"({big_cpu:.2f} CPU s); growth {(big_rss - small_rss) * 2**20 / (conns2 - conns):,.0f}"
          f" bytes per connection")

if __name__ == "__main__":
    main()
