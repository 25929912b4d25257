#!/usr/bin/env python3
"""The Python API against the notebook alternatives, measured in one run on one capture.

Builds the echo-like capture of ``bench_decode.py`` (N packets) and times, each in a fresh
interpreter (imports included, as a script pays them):

- ``vsockmon.open(f).packets()``           an Arrow table of every frame (decode --json's keys)
- ``vsockmon.open(f).connections()``       an Arrow table of every connection
- ``tshark -T fields`` → ``pyarrow.csv``   Wireshark's fields of every frame, as a table
- scapy ``rdpcap`` → a list of dicts        the usual notebook way (rows, no table)

Then the peak memory of ``iter_packets`` (streaming) against ``packets()`` on 4N and 8N
packets: streaming must stay flat. Usage: ``benchmarks/bench_api.py [N]``.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import SCAPY_READ, build  # noqa: E402

from vsockmon.decode.verify import TSHARK_FIELDS  # noqa: E402

PACKETS = "import sys, vsockmon; print(vsockmon.open(sys.argv[1]).packets().num_rows)"
CONNECTIONS = "import sys, vsockmon; print(vsockmon.open(sys.argv[1]).connections().num_rows)"
STREAM = ("import sys, vsockmon\n"
          "print(sum(b.num_rows for b in vsockmon.open(sys.argv[1]).iter_packets(65536)))")
TSHARK_TABLE = """
import subprocess, sys, io
import pyarrow.csv as pacsv
fields = sys.argv[2:]
cmd = ["tshark", "-n", "-r", sys.argv[1], "-T", "fields", "-E", "separator=,"]
for f in fields:
    cmd += ["-e", f]
out = subprocess.run(cmd, capture_output=True, check=True).stdout
table = pacsv.read_csv(io.BytesIO(out), read_options=pacsv.ReadOptions(column_names=fields))
print(table.num_rows)
"""


def run(code: str, *args: str) -> tuple[float, float]:
    """Seconds and peak resident MiB of ``python -c code args`` (only that child counts)."""
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
             "stdout=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-c", code, *args],
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - start, int(out.stdout) / 1024


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.pcap"
        build(path, n)
        f = str(path)
        results = {
            "vsockmon packets()": run(PACKETS, f),
            "vsockmon connections()": run(CONNECTIONS, f),
            "tshark fields -> pyarrow": run(TSHARK_TABLE, f, *TSHARK_FIELDS),
            "scapy PcapReader": run(SCAPY_READ, f),
        }
        memory = []
        for size in (4 * n, 8 * n):
            build(path, size)
            memory.append((size, run(STREAM, f)[1], run(PACKETS, f)[1]))
    ours = results["vsockmon packets()"][0]
    print(f"{n} packets")
    print(f"{'way':<26} {'seconds':>8} {'packets/s':>11} {'vs packets()':>13}")
    for way, (secs, _) in results.items():
        print(f"{way:<26} {secs:8.2f} {n / secs:11,.0f} {secs / ours:12.1f}x")
    for size, streamed, whole in memory:
        print(f"peak memory on {size:,} packets: iter_packets {streamed:.0f} MiB, "
              f"packets() {whole:.0f} MiB")


if __name__ == "__main__":
    main()
