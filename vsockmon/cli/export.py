"""``vsockmon export``: an annotated pcapng for Wireshark, or tables for DuckDB/Polars/pandas."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from vsockmon.cli.output import force_option

TABLE_FORMATS = ("parquet", "csv", "json")


@contextmanager
def _progress(total: int | None, unit: str) -> Iterator[Callable[[int], None]]:
    """A callback advancing a rich bar on stderr by N units (a counter when the total is
    unknown); silent when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("exporting", BarColumn(), MofNCompleteColumn(), unit, TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("export", total=total)
        yield lambda n: bar.update(task, advance=n)


def _format(fmt: str | None, output: str) -> str:
    if fmt:
        return fmt
    if output.endswith((".pcapng", ".ntar")):
        return "pcapng"
    raise click.UsageError("choose --format (parquet, csv, json), or name a .pcapng output")


@click.command()
@click.argument("source", metavar="FILE|DIR")
@click.option("-o", "--output", required=True, metavar="OUT",
              help="The .pcapng file to write, or the directory for the tables.")
@click.option("--format", "fmt", type=click.Choice(["pcapng", *TABLE_FORMATS]),
              help="pcapng (the default for a .pcapng OUT), parquet, csv or json (JSON Lines).")
@click.option("--payload/--no-payload", default=None,
              help="Dissect payloads (ttrpc, JSON, sd_notify…): in pcapng comments (default "
                   "on), as payload_proto/payload_summary table columns (default off).")
@click.option("-j", "--jobs", type=click.IntRange(min=1),
              help="Parallel processes for a directory of captures (default: one per CPU).")
@force_option("Overwrite existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export(source: str, output: str, fmt: str | None, payload: bool | None, jobs: int | None,
           force: bool, as_json: bool) -> None:
    """Export a capture (gzip ok, '-' for stdin) or a directory of captures.

    pcapng: every packet with a comment Wireshark shows (frame.comment): its connection,
    direction, state, bytes in flight, anomalies, what the tracker singles out (handshake
    time, close, first/last violation, stalls), a payload summary and the findings of
    'vsockmon diagnose' at their evidence frames.

    Tables: OUT/packets.EXT (one row per packet, streamed) and OUT/connections.EXT (one row
    per connection); for a directory, OUT/<capture's relative path>/… for each capture,
    exported in parallel. Columns: docs/export.md.

    \b
    Examples:
      vsockmon export capture.pcap -o annotated.pcapng
      vsockmon export capture.pcap --format parquet -o out/
      duckdb -c "select op_name, count(*) from 'out/packets.parquet' group by 1"
      vsockmon export captures/ --format parquet -o fleet/ -j 8
    """
    from vsockmon.export import export_pcapng, export_tables

    fmt = _format(fmt, output)
    is_dir = source != "-" and os.path.isdir(source)
    if fmt == "pcapng":
        if is_dir:
            raise click.UsageError("a pcapng export takes one capture, not a directory")
        with _progress(None, "packets (two passes)") as advance:
            results = [export_pcapng(source, output, force, payload=payload is not False,
                                     diagnose=True, on_batch=advance)]
    elif is_dir:
        results = _many(Path(source), Path(output), fmt, force, bool(payload), jobs)
    else:
        with _progress(None, "packets") as advance:
            results = [export_tables(source, Path(output), fmt, force, bool(payload),
                                     on_batch=advance)]
    _print(results, as_json)
    failed = [r for r in results if r.error]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} captures failed")


def _many(directory: Path, outdir: Path, fmt: str, force: bool, payload: bool,
          jobs: int | None) -> list:
    from vsockmon.export import export_many, find_captures

    with _progress(len(find_captures(directory)), "captures") as advance:
        return export_many(directory, outdir, fmt, force, payload, jobs,
                           on_done=lambda _r: advance(1))


def _print(results: list, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=None))
        return
    for r in results:
        if r.error:
            click.echo(f"vsockmon: {r.error}", err=True)
            continue
        what = f"{r.packets} packets, {r.connections} connections"
        if r.skipped:
            what += f", {r.skipped} non-vsock frames left out"
        click.echo(f"wrote {', '.join(r.outputs)} ({what})", err=True)
        if r.stopped:
            click.echo(f"vsockmon: warning: {r.source}: {r.stopped}; exported the packets "
                       "before it", err=True)
