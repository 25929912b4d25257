"""``vsockmon stats``: what a capture holds, counted: ops, CIDs, ports, connections, rate."""

from __future__ import annotations

import json
import sys

import click

from vsockmon.analysis.stats import MAX_BINS, Stats
from vsockmon.cli.reading import opened
from vsockmon.wire.protocol import Op

BAR = 40
"""Characters of the longest throughput bar."""


@click.command()
@click.argument("file", metavar="FILE")
@click.option("--json", "as_json", is_flag=True, help="One JSON object with everything.")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="Rows of the top-CIDs, ports and connections tables.")
@click.option("--bins", type=click.IntRange(min=1, max=MAX_BINS), default=20, show_default=True,
              help="Intervals of the throughput table.")
def stats(file: str, as_json: bool, top: int, bins: int) -> None:
    """Count what a capture holds: packets by socket type and op, anomalies, the busiest
    CIDs, server ports and connections, and throughput over time.

    \b
    Examples:
      vsockmon stats capture.pcap
      vsockmon stats capture.pcap --top 5 --bins 50
      vsockmon stats capture.pcap --json | jq .closes
    """
    with opened(file) as cap:
        result = cap.stats(top, bins)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo("\n".join(_text(cap.name, result)))
    sys.stdout.flush()


def _text(name: str, s: Stats) -> list[str]:
    from tabulate import tabulate

    out = [f"{name}: {s.frames} frames ({s.frames_without_virtio} without a virtio header), "
           f"{s.duration:.6f} s, {s.payload_bytes} payload bytes, {s.connections} connections"]
    types = sorted(s.ops)
    ops = sorted({op for per in s.ops.values() for op in per},
                 key=lambda name: (Op[name].value if name in Op.__members__ else 99, name))
    rows = [[op, *(s.ops[t].get(op, 0) for t in types)] for op in ops]
    out += ["", "packets by op and socket type",
            tabulate(rows, headers=["op", *types], disable_numparse=True)]
    if s.anomalies:
        out += ["", "anomalies", tabulate(list(s.anomalies.items()),
                                          headers=["anomaly", "frames"])]
    if s.closes:
        out += ["", "closes", tabulate(list(s.closes.items()), headers=["close", "connections"])]
    if s.top_cids:
        out += ["", "top CIDs", tabulate(
            [(c.label, c.packets_sent, c.packets_received, c.bytes_sent, c.bytes_received,
              c.connections) for c in s.top_cids],
            headers=["cid", "pkts sent", "pkts recv", "bytes sent", "bytes recv", "conns"])]
    if s.top_ports:
        out += ["", "top server ports", tabulate(
            [(p.port, p.connections, p.bytes,
              ", ".join(f"{k} {v}" for k, v in p.closes.items())) for p in s.top_ports],
            headers=["port", "conns", "bytes", "closes"])]
    if s.top_connections:
        out += ["", "top connections by bytes", tabulate(
            [tuple(f"{v:.6f}" if k == "duration" else v for k, v in c.items())
             for c in s.top_connections],
            headers=list(s.top_connections[0]), disable_numparse=True)]
    if s.throughput:
        peak = max(b.bytes for b in s.throughput) or 1
        out += ["", f"throughput ({s.bin_width:.6f} s bins)", tabulate(
            [(f"+{b.start:.6f}", b.packets, b.bytes, f"{b.bytes_per_s:,.0f}",
              "█" * round(BAR * b.bytes / peak)) for b in s.throughput],
            headers=["start (s)", "packets", "bytes", "bytes/s", ""], disable_numparse=True)]
    return out
