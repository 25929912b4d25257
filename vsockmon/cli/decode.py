"""``vsockmon decode``: print a capture's frames as lines, a table, a field tree or JSON."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

import click
import numpy as np

from vsockmon import api
from vsockmon.decode import render
from vsockmon.decode.frames import FrameBatch
from vsockmon.decode.rows import Rows
from vsockmon.errors import VsockmonError
from vsockmon.output import BackgroundWriter
from vsockmon.payload import REGISTRY, dissect_frame
from vsockmon.wire.pcapio import CaptureError

TABLE_ROWS = 5000
"""A table is rendered per this many rows (each block with its own headers and column
widths, as when tabulate rendered it), so memory stays bounded on big captures."""

def _emit_rows(items: Iterator[tuple[FrameBatch, list[int]]], out: BinaryIO,
               rows_of: Callable[[FrameBatch, np.ndarray, int], Rows]) -> None:
    """Lines or JSON (``rows_of(batch, rows, t0)``), formatted and written on the other core
    while the next batch is decoded; ``t0`` is the first frame's time."""
    t0: int | None = None
    with BackgroundWriter(out) as writer:
        for fb, idx in items:
            t0 = int(fb.ts_ns[0]) if t0 is None else t0
            writer.put(rows_of(fb, np.asarray(idx, dtype=np.int64), t0))


def _emit_slow(items: Iterator[tuple[FrameBatch, list[int]]], table: bool) -> None:
    """``--table`` (tabulate's widths per block) and ``-V`` (a tree per frame)."""
    t0: int | None = None
    for fb, idx in items:
        if t0 is None:
            t0 = int(fb.ts_ns[0])
        rows = np.asarray(idx, dtype=np.int64)
        if table:
            for start in range(0, len(rows), TABLE_ROWS):
                sys.stdout.buffer.write(render.table_text(fb, rows[start : start + TABLE_ROWS],
                                                          t0))
        else:
            for i in idx:
                f = fb.frame(i)
                info = dissect_frame(f)
                click.echo("\n".join(render.tree(f, info.lines() if info else None)) + "\n")


def _payload_summary(payload: bytes, src_port: int, dst_port: int) -> str | None:
    """What a payload dissector (ttrpc, JSON, sd_notify, …) says of a frame's payload;
    nothing for plain text: the preview already shows it."""
    info = REGISTRY.dissect(payload, src_port, dst_port, hide="text")
    return None if info is None else f"{info.protocol}: {info.summary}"


@click.command()
@click.argument("file", metavar="FILE")
@click.option("-c", "--count", type=click.IntRange(min=1), help="Stop after N frames.")
@click.option("-Y", "--filter", "expr", metavar="EXPR",
              help="Display filter, e.g. 'cid == 3 and op == RW', 'port == 1024', "
                   "'type == SEQPACKET', 'flags has EOM', 'anomaly'.")
@click.option("-V", "--verbose", is_flag=True, help="Print every field as a tree.")
@click.option("--table", is_flag=True,
              help="Print a table (tabulate's simple format) instead of lines.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON Lines: one flat object per frame (Wireshark's field names).")
@click.option("--verify", is_flag=True,
              help="Re-read the file with Wireshark's dissector (pyshark) and report every "
                   "field where the two disagree.")
def decode(file: str, count: int | None, expr: str | None, verbose: bool, table: bool,
           as_json: bool, verify: bool) -> None:
    """Decode the vsockmon frames of a pcap/pcapng capture (gzip ok, '-' for stdin).

    \b
    Examples:
      vsockmon decode fixtures/synthetic/all-ops.pcap
      vsockmon decode capture.pcapng -c 20 -V
      vsockmon decode capture.pcap.gz -Y 'cid == 3 and op == RW' --table
      vsockmon decode capture.pcap --json | jq '."vsock.virtio.buf_alloc"'
      vsockmon decode capture.pcap --verify
    """
    if verify:
        _verify(file, count)
        return
    cap = api.open(file)
    items = cap.frames(expr, count)
    if as_json:
        _emit_rows(items, sys.stdout.buffer, lambda fb, rows, _t0: fb.json_rows(rows))
    elif table or verbose:
        _emit_slow(items, table)
    else:
        _emit_rows(items, sys.stdout.buffer,
                   lambda fb, rows, t0: render.summary_rows(fb, rows, t0, _payload_summary))
    if cap.stopped:
        raise CaptureError(f"{cap.name}: {cap.stopped}")


def _verify(file: str, count: int | None) -> None:
    """Wireshark reads a file by name, so stdin is first spooled to a temporary file."""
    if file != "-":
        _verify_file(file, count)
        return
    with tempfile.NamedTemporaryFile(prefix="vsockmon-verify-") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool)
        spool.flush()
        try:
            _verify_file(spool.name, count)
        except VsockmonError as e:  # name the input as the user gave it
            raise VsockmonError(str(e).replace(spool.name, "<stdin>")) from None


def _verify_file(file: str, count: int | None) -> None:
    from vsockmon.decode.verify import verify_with_pyshark

    report = verify_with_pyshark(file, count)
    for line in report.lines():
        click.echo(line)
    if report.disagreements:
        sys.exit(1)
