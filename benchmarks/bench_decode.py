#!/usr/bin/env python3
"""Decode speed: ``vsockmon decode --json`` against tshark and scapy, measured in one run.

Builds a capture of N echo-like packets (REQUEST/RESPONSE, RW with small payloads, credit
updates, SHUTDOWN/RST) in a temporary directory, then times, on the same file:

- ``vsockmon decode FILE --json``          (every field, JSON Lines)
- ``tshark -r FILE -T fields -e …``        (the same fields, Wireshark's dissector)
- scapy ``PcapReader`` with our layer, reading the same fields from every packet

and prints seconds, packets/s and the ratios. Usage: ``benchmarks/bench_decode.py [N]``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import T0, frame  # noqa: E402

from vsockmon.decode.verify import TSHARK_FIELDS  # noqa: E402
from vsockmon.wire.pcapio import PcapWriter  # noqa: E402
from vsockmon.wire.protocol import Op  # noqa: E402


def build(path: Path, n: int) -> None:
    """Echo-like connections of 20 packets each, fresh ports per connection."""
    with open(path, "wb") as fp:
        w = PcapWriter(fp)
        i = 0
        port = 40000
        while i < n:
            c, s = (1, port), (1, 9999)
            conv = [frame(Op.REQUEST, src=c, dst=s), frame(Op.RESPONSE, src=s, dst=c)]
            for k in range(8):
                conv.append(frame(Op.RW, b"m" * 100, src=c, dst=s, fwd_cnt=100 * k))
                conv.append(frame(Op.RW, b"m" * 100, src=s, dst=c, fwd_cnt=100 * (k + 1)))
            conv += [frame(Op.SHUTDOWN, src=c, dst=s, flags=3), frame(Op.RST, src=s, dst=c)]
            for f in conv[: n - i]:
                w.write(T0 + i * 1000, f)
                i += 1
            port += 1


def peak_rss_mib(cmd: list[str]) -> float:
    """Peak resident memory of ``cmd``, measured in a wrapper so only that child counts."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True,
                         check=True)
    return int(out.stdout) / 1024


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


SCAPY_READ = """
import sys, vsockmon
from scapy.utils import PcapReader
from vsockmon.wire.layers import VirtioVsock
n = 0
for pkt in PcapReader(sys.argv[1]):
    v = pkt[VirtioVsock]
    fields = (pkt.src_cid, pkt.dst_cid, pkt.src_port, pkt.dst_port, pkt.op, pkt.transport,
              pkt.trans_len, v.src_cid, v.dst_cid, v.src_port, v.dst_port, v.len, v.type, v.op,
              v.flags, v.buf_alloc, v.fwd_cnt)
    n += 1
print(n)
"""


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        build(path, n)
        vsockmon = [str(ROOT / ".venv" / "bin" / "vsockmon"), "decode", str(path), "--json"]
        tshark = ["tshark", "-n", "-r", str(path), "-T", "fields"]
        for name in TSHARK_FIELDS:
            tshark += ["-e", name]
        scapy = [sys.executable, "-c", SCAPY_READ, str(path)]
        results = {"vsockmon decode --json": timed(vsockmon), "tshark -T fields": timed(tshark),
                   "scapy PcapReader": timed(scapy)}
        memory = []
        for size in (n, 4 * n):
            build(path, size)
            vsockmon[2] = str(path)
            memory.append((size, peak_rss_mib(vsockmon)))
    ours = results["vsockmon decode --json"]
    print(f"{n} packets")
    print(f"{'tool':<24} {'seconds':>8} {'packets/s':>11} {'vs vsockmon':>12}")
    for tool, secs in results.items():
        print(f"{tool:<24} {secs:8.2f} {n / secs:11,.0f} {secs / ours:11.1f}x")
    for size, mib in memory:
        print(f"peak memory of vsockmon decode --json on {size:,} packets: {mib:.0f} MiB")


if __name__ == "__main__":
    main()
