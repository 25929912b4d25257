#!/usr/bin/env python3
"""Every offline command against its anchor, on the same files, in one run.

Builds two captures in a temporary directory by scaling up real lab traffic
(``fixtures/real/``), with rewritten client ports and timestamps (see ``bench_conns.build``):

- *traffic*: ``--packets`` packets (1M by default) of every real capture copied over and over;
- *storm*: ``--connections`` connections (1M by default) of connection attempts, as an agent
  retrying a port nobody listens on makes them: 92 copies of ``no-listener.pcap``
  (REQUEST, RST) for one of ``many-connections.pcap`` — 2.6 packets per connection.

Then runs each command with its output to ``/dev/null`` and prints, for each, wall seconds,
CPU seconds (user + system, of the process and its children) and peak RSS (GNU ``time``),
and the anchor's wall and CPU time over the command's (above 1: vsockmon is faster). The
anchors: ``cat`` (the floor: reading the file), ``tcpdump -nn -r`` for the one-line-per-packet
output, ``tshark -T fields`` with the same fields for JSON and connections, scapy's
``PcapReader`` with vsockmon's layer (reading every header field) on ``--scapy-packets``
packets, scaled to the file (it takes minutes on a million). Last, ``zcat`` and
``decode --json`` on the gzipped traffic: what decompression adds.

Usage: ``benchmarks/bench_all.py [--packets N] [--connections N] [--keep DIR] [--only WORD]``
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_conns import EPHEMERAL, _port_offsets, build, measure, template  # noqa: E402
from bench_decode import SCAPY_READ  # noqa: E402

from vsockmon.decode.verify import TSHARK_FIELDS  # noqa: E402
from vsockmon.wire.pcapio import open_capture  # noqa: E402
from vsockmon.wire.protocol import VIRTIO_HEADER  # noqa: E402

VSOCKMON = str(ROOT / ".venv" / "bin" / "vsockmon")
CONNS_FIELDS = ("frame.number", "frame.time_epoch", *(f.wireshark for f in VIRTIO_HEADER.fields))
"""What the connection tracker reads: tshark extracts only these."""
REFUSED_PER_STORM_COPY = 92
"""no-listener copies per many-connections copy: 2.6 packets per connection, as in a storm."""


def storm_template() -> list[tuple[int, bytes, int]]:
    """One period of the storm: refused connects (each on its own client port), then a
    burst of accepted ones, as (time, frame, original length)."""
    real = ROOT / "fixtures" / "real"
    out: list[tuple[int, bytes, int]] = []
    shift = 0
    with open_capture(str(real / "no-listener.pcap")) as reader:
        refused = list(reader.records())
    for k in range(REFUSED_PER_STORM_COPY):
        for r in refused:
            out.append((r.ts_ns - refused[0].ts_ns + shift, _move_client(r.data, k), r.orig_len))
        shift = out[-1][0] + 200_000
    with open_capture(str(real / "many-connections.pcap")) as reader:
        accepted = list(reader.records())
    for r in accepted:
        out.append((r.ts_ns - accepted[0].ts_ns + shift,
                    _move_client(r.data, REFUSED_PER_STORM_COPY), r.orig_len))
    return out


def _move_client(data: bytes, by: int) -> bytes:
    """The frame with every client (ephemeral) port moved by ``by``."""
    buf = bytearray(data)
    for off in _port_offsets():
        if off + 4 <= len(buf):
            port = struct.unpack_from("<I", buf, off)[0]
            if port >= EPHEMERAL:
                struct.pack_into("<I", buf, off, port + by)
    return bytes(buf)


@dataclass
class Row:
    capture: str
    command: str
    anchor: str | None
    wall: float
    cpu: float
    rss: float


def run_rows(jobs: list[tuple[str, str, list[str], str | None]], scale: dict[str, float]
             ) -> list[Row]:
    """Measure every (capture, label, command, anchor label) job once, in order."""
    rows = []
    for capture, label, cmd, anchor in jobs:
        wall, cpu, rss = measure(cmd)
        k = scale.get(label, 1.0)
        rows.append(Row(capture, label, anchor, wall * k, cpu * k, rss))
        print(f"  measured {label} on {capture}: {wall:.2f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (the README's speed table is pasted from it)."""
    by_name = {(r.capture, r.command): r for r in rows}
    out = ["| capture | command | wall s | CPU s | peak RSS MiB | anchor | anchor/ours wall "
           "| anchor/ours CPU |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        anchor = by_name.get((r.capture, r.anchor or ""))
        versus = (f"`{anchor.command}` | {anchor.wall / r.wall:.2f}x | {anchor.cpu / r.cpu:.2f}x"
                  if anchor else " | | ")
        out.append(f"| {r.capture} | `{r.command}` | {r.wall:.2f} | {r.cpu:.2f} | {r.rss:.0f} "
                   f"| {versus} |")
    return "\n".join(out)


def tshark(path: Path, fields: tuple[str, ...]) -> list[str]:
    cmd = ["tshark", "-n", "-r", str(path), "-T", "fields"]
    for name in fields:
        cmd += ["-e", name]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000, help="packets of the traffic")
    ap.add_argument("--connections", type=int, default=1_000_000,
                    help="connections of the storm (0: no storm)")
    ap.add_argument("--scapy-packets", type=int, default=50_000,
                    help="packets scapy reads (its time is scaled to the whole file)")
    ap.add_argument("--snap", type=int, default=256, help="payload bytes kept per frame")
    ap.add_argument("--keep", type=Path, help="build the captures here and keep them")
    ap.add_argument("--only", help="run only the commands whose label contains this")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        traffic, scapy_file = where / "traffic.pcap", where / "traffic-scapy.pcap"
        tmpl, _ = template(args.snap)
        build(traffic, tmpl, args.packets)
        scapy_n = min(args.scapy_packets, args.packets)
        build(scapy_file, tmpl, scapy_n)
        t = f"traffic {args.packets / 1e6:g}M pkts"
        jobs: list[tuple[str, str, list[str], str | None]] = [
            (t, "cat", ["cat", str(traffic)], None),
            (t, "tcpdump -nn -r", ["tcpdump", "-nn", "-r", str(traffic)], None),
            (t, "vsockmon decode", [VSOCKMON, "decode", str(traffic)], "tcpdump -nn -r"),
            (t, "vsockmon decode --table", [VSOCKMON, "decode", str(traffic), "--table"],
             "tcpdump -nn -r"),
            (t, "tshark -T fields (decode's)", tshark(traffic, TSHARK_FIELDS), None),
            (t, "vsockmon decode --json", [VSOCKMON, "decode", str(traffic), "--json"],
             "tshark -T fields (decode's)"),
            (t, "scapy PcapReader", [sys.executable, "-c", SCAPY_READ, str(scapy_file)], None),
            (t, "tshark -T fields (conns')", tshark(traffic, CONNS_FIELDS), None),
            (t, "vsockmon conns --json", [VSOCKMON, "conns", str(traffic), "--json"],
             "tshark -T fields (conns')"),
        ]
        gz = where / "traffic.pcap.gz"
        with open(gz, "wb") as out:
            subprocess.run(["gzip", "-1", "-c", str(traffic)], stdout=out, check=True)
        jobs += [
            (t, "zcat (gzip)", ["zcat", str(gz)], None),
            (t, "vsockmon decode --json (gzip)", [VSOCKMON, "decode", str(gz), "--json"],
             "tshark -T fields (decode's)"),
        ]
        sizes = {t: traffic.stat().st_size, "traffic gzip": gz.stat().st_size}
        if args.connections:
            storm = where / "storm.pcap"
            stmpl = storm_template()
            per_conn = len(stmpl) / (REFUSED_PER_STORM_COPY + 8)
            build(storm, stmpl, round(args.connections * per_conn))
            s = f"storm {args.connections / 1e6:g}M conns"
            sizes[s] = storm.stat().st_size
            jobs += [
                (s, "cat", ["cat", str(storm)], None),
                (s, "tshark -T fields (conns')", tshark(storm, CONNS_FIELDS), None),
                (s, "vsockmon conns --json", [VSOCKMON, "conns", str(storm), "--json"],
                 "tshark -T fields (conns')"),
                (s, "vsockmon stats --json", [VSOCKMON, "stats", str(storm), "--json"],
                 "tshark -T fields (conns')"),
                (s, "vsockmon diagnose --json", [VSOCKMON, "diagnose", str(storm), "--json"],
                 "tshark -T fields (conns')"),
            ]
        if args.only:
            jobs = [j for j in jobs if args.only in j[1] or (j[3] and args.only in j[3])
                    or j[1] == "cat"]
        rows = run_rows(jobs, {"scapy PcapReader": args.packets / scapy_n})
    for name, size in sizes.items():
        print(f"{name}: {size / 2**20:,.0f} MiB")
    print(f"scapy read {scapy_n:,} packets; its figures are scaled to {args.packets:,}")
    print(table(rows))


if __name__ == "__main__":
    main()
