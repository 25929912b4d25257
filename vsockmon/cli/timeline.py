"""``vsockmon timeline``: ladder diagrams of connections, in the terminal, HTML or PNG."""

from __future__ import annotations

import io
import sys

import click

from vsockmon.analysis import timeline as tl
from vsockmon.cli.output import force_option, refuse_existing, write_output
from vsockmon.cli.reading import opened
from vsockmon.conntrack.tracker import StreamRows
from vsockmon.diagnose.views import markers

PNG_MAX = 6
"""Connections stacked in one PNG: more would make a picture nobody can read."""


@click.command()
@click.argument("file", metavar="FILE")
@click.option("--conn", "streams", type=click.IntRange(min=0), multiple=True, metavar="N",
              help="Stream to draw (repeatable); default: the first --limit streams.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="Streams drawn when --conn is not given.")
@click.option("--max-rows", type=click.IntRange(min=2), default=200, show_default=True,
              help="Packets drawn per connection (the first and last halves beyond that).")
@click.option("--html", "html_out", metavar="OUT",
              help="Write one self-contained HTML page: sequence diagrams and credit plots.")
@click.option("--png", "png_out", metavar="OUT", help="Write a PNG (matplotlib).")
@force_option()
def timeline(file: str, streams: tuple[int, ...], limit: int, max_rows: int,
             html_out: str | None, png_out: str | None, force: bool) -> None:
    """Draw connections as ladders: arrows between client and server with relative time,
    op, length and credit, and a plot of bytes in flight against the peer's buffer.

    \b
    Examples:
      vsockmon timeline capture.pcap --conn 0
      vsockmon timeline capture.pcap --conn 3 --html conn3.html
      vsockmon timeline capture.pcap --png timeline.png --limit 2
    """
    refuse_existing([out for out in (html_out, png_out) if out], force)
    rows = StreamRows(streams or None, first=limit)
    with opened(file) as cap:
        cap.scan(rows, findings=True)  # the chosen streams' packets, diagnose's findings
        findings = cap.findings()  # as markers
        analysis = cap.analysis()
    held = len(analysis.tracker)  # counted, not made: only the chosen are drawn
    missing = [s for s in streams if s >= held]
    if missing:
        raise click.ClickException(f"{analysis.name}: no stream {missing[0]} "
                                   f"(streams 0-{held - 1})" if held
                                   else f"{analysis.name}: no connection in this capture")
    chosen = list(streams) if streams else list(range(min(limit, held)))
    ladders = [tl.ladder(analysis.connection(s), rows.columns(s)) for s in chosen]
    for lad in ladders:
        lad.marks = markers(findings, (step.frame for step in lad.steps))
    notes = []
    if not streams and held > limit:
        notes.append(f"the first {limit} of {held} connections; use --conn or --limit")
    if html_out:
        page = tl.html_page(f"vsockmon timeline — {analysis.name}", ladders, max_rows, notes)
        write_output(html_out, page.encode(), force)
    if png_out:
        if len(ladders) > PNG_MAX:
            click.echo(f"vsockmon: the PNG shows the first {PNG_MAX} of {len(ladders)} "
                       "connections; choose others with --conn", err=True)
        buf = io.BytesIO()
        tl.figure(ladders[:PNG_MAX], min(max_rows, 40)).savefig(buf, format="png")
        write_output(png_out, buf.getvalue(), force)
    if html_out or png_out:
        return
    style = click.style if sys.stdout.isatty() else None
    for lad in ladders:
        click.echo("\n".join(tl.text_lines(lad, max_rows, style)) + "\n")
    for note in notes:
        click.echo(note, err=True)
    if not ladders:
        click.echo("no connection in this capture", err=True)
    sys.stdout.flush()
