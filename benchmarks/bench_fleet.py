#!/usr/bin/env python3
"""A fleet of small captures: ``vsockmon fleet`` on the local Dask cluster against the same
work done serially, and against ``vsockmon export DIR -j N`` (local processes, no Dask).

Copies the vsock captures of ``fixtures/`` (real lab traffic and the diagnose scenarios)
round-robin into ``--captures`` files under host-like directories (``node-000/…``), then
times, in one run, each as its own process (imports included):

- diagnose: ``vsockmon fleet diagnose DIR --json`` on the local cluster (one worker
  process per core, started and stopped by the command), and the same library call on
  every capture one after the other in one process (what the workers run, no Dask);
- tables: ``vsockmon fleet export DIR -o OUT`` (Parquet, Hive-partitioned),
  ``vsockmon export DIR --format parquet -o OUT -j CORES`` (a process pool) and a serial
  loop of the same library calls writing the same files;
- the local cluster alone: start and stop with no capture, the fixed cost of a run; and
  the diagnose tasks alone on a cluster already up (its workers' imports done).

Checks that each run gives the same findings (or row counts) as the serial one, and prints
seconds and the ratios.

Usage: ``benchmarks/bench_fleet.py [--captures N] [--repeat K] [--keep DIR]`` (``--repeat``
makes each capture K times its fixture: fewer, bigger captures show the cost per capture
apart from the work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VSOCKMON = str(BIN / "vsockmon")

SERIAL_DIAGNOSE = """
import json, sys
from vsockmon.fleet import Request, analyse_capture, expand
for c in expand([sys.argv[1]]):
    for f in analyse_capture(c.source, Request(frozenset({"findings"}))).findings:
        print(json.dumps({"host": c.host, "capture": c.name, "source": c.source, **f}))
"""

SERIAL_EXPORT = """
import sys
from pathlib import Path
from vsockmon.fleet import Request, analyse_capture, expand
from vsockmon.fleet.dataset import Dataset
out = Path(sys.argv[2])
caps = expand([sys.argv[1]])
packets = Dataset(out / "packets", "packets", "parquet", caps)
conns = Dataset(out / "connections", "connections", "parquet", caps)
for c in caps:
    r = analyse_capture(c.source, Request(frozenset({"packets", "connections"})))
    packets.write(c, r.packets)
    conns.write(c, r.connections)
print(packets.rows, conns.rows)
"""

WARM_DIAGNOSE = """
import sys, time
from vsockmon.fleet import Request, connect, expand, run
if __name__ == "__main__":
    caps = expand([sys.argv[1]])
    with connect(None) as client:
        list(run(client, caps[:4], Request(frozenset({"findings"}))))  # workers' imports
        start = time.perf_counter()
        done = list(run(client, caps, Request(frozenset({"findings"}))))
        print(time.perf_counter() - start, sum(len(o.result.findings) for o in done))
"""

CLUSTER_ONLY = """
from vsockmon.fleet import connect
with connect(None) as client:
    client.wait_for_workers(1)
"""


def fleet_dir(root: Path, n: int, repeat: int = 1) -> Path:
    """``n`` captures under ``root/node-XXX/``, five per host, made of the fixtures: each
    one's packets ``repeat`` times over, one second apart (bigger captures, same kind)."""
    from vsockmon.wire.pcapio import PcapWriter, open_capture

    sources = [p for d in ("real", "diagnose") for p in sorted((ROOT / "fixtures" / d)
                                                                  .glob("*.pcap"))]
    for i in range(n):
        src = sources[i % len(sources)]
        host = root / f"node-{i // 5:03d}"
        host.mkdir(parents=True, exist_ok=True)
        dst = host / f"{i:04d}-{src.name}"
        if repeat == 1:
            shutil.copy(src, dst)
            continue
        with open_capture(str(src)) as reader:
            records = list(reader.records())
        span = records[-1].ts_ns - records[0].ts_ns + 1_000_000_000
        with open(dst, "wb") as fp:
            writer = PcapWriter(fp)
            for k in range(repeat):
                for r in records:
                    writer.write(r.ts_ns + k * span, r.data, r.orig_len)
    return root


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and standard output of a command. (CPU seconds would be steadier on a
    shared machine, but a Dask worker's are not reported to the command that started it.)"""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    took = time.perf_counter() - start
    if done.returncode not in (0, 1):  # 1: diagnose found problems, as it should here
        sys.exit(f"{' '.join(cmd[:3])}… failed ({done.returncode}): {done.stderr.strip()}")
    return took, done.stdout


def line(what: str, wall: float, serial: float | None = None) -> str:
    ratio = "" if serial is None else f"   {serial / wall:5.2f}× the serial speed"
    return f"  {what:<30}{wall:7.2f} s{ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1,
                        help="Make each capture its fixture's packets this many times over.")
    parser.add_argument("--keep", type=Path, help="Build the captures here and keep them.")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="vsockmon-fleet-") as tmp:
        work = args.keep or Path(tmp)
        caps = fleet_dir(work / "captures", args.captures, args.repeat)
        size = sum(p.stat().st_size for p in caps.rglob("*.pcap"))
        hosts = len(list(caps.iterdir()))
        print(f"{args.captures} captures on {hosts} hosts, {size / 1e6:.1f} MB in all; "
              f"{cores} cores; local cluster: {cores} worker processes")

        t_cluster, _ = timed([sys.executable, "-c", CLUSTER_ONLY])
        t_serial, serial = timed([sys.executable, "-c", SERIAL_DIAGNOSE, str(caps)])
        t_fleet, fleet = timed([VSOCKMON, "fleet", "diagnose", str(caps), "--json"])
        warm = work / "warm.py"
        warm.write_text(WARM_DIAGNOSE)
        _, warm_out = timed([sys.executable, str(warm), str(caps)])
        t_warm, warm_findings = float(warm_out.split()[0]), int(warm_out.split()[1])
        same = sorted(map(json.loads, serial.splitlines()), key=json.dumps) == \
            sorted(map(json.loads, fleet.splitlines()), key=json.dumps)
        findings = len(fleet.splitlines())
        print(f"\ndiagnose ({findings} findings; fleet equals serial: {same})")
        print(line("serial, one process", t_serial))
        print(line("vsockmon fleet diagnose", t_fleet, t_serial))
        print(line("local cluster start + stop", t_cluster) + "   (in the fleet figure)")
        print(line("the tasks alone, cluster up", t_warm, t_serial)
              + f" ({warm_findings} findings; the serial figure includes its imports)")

        t_serial_x, rows = timed([sys.executable, "-c", SERIAL_EXPORT, str(caps),
                                              str(work / "serial")])
        t_fleet_x, _ = timed([VSOCKMON, "fleet", "export", str(caps), "-o",
                                         str(work / "fleet")])
        t_pool_x, _ = timed([VSOCKMON, "export", str(caps), "--format", "parquet",
                                       "-o", str(work / "pool"), "-j", str(cores), "--json"])
        got = fleet_rows(work / "fleet")
        print(f"\nexport to Parquet (packets, connections: serial {rows.strip()}, "
              f"fleet {got[0]} {got[1]})")
        print(line("serial, one process", t_serial_x))
        print(line("vsockmon fleet export", t_fleet_x, t_serial_x))
        print(line(f"vsockmon export -j {cores}", t_pool_x, t_serial_x))
        print(f"\nload average during the run: {os.getloadavg()[1]:.1f} on {cores} cores")
        if not same or rows.split() != [str(n) for n in got]:
            sys.exit("the fleet's results differ from the serial ones")


def fleet_rows(out: Path) -> tuple[int, int]:
    import duckdb

    packets, conns = (duckdb.sql(f"select count(*) from read_parquet('{out}/{t}/**/*.parquet', "
                                 "hive_partitioning=true)").fetchall()[0][0]
                      for t in ("packets", "connections"))
    return packets, conns


if __name__ == "__main__":
    main()
