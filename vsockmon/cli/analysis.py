"""The one reading pass the analysis commands (conns, timeline, stats, follow) share.

Opens the capture, decodes it batch by batch, feeds the connection tracker and hands every
batch with its per-row tags to the command's own visitors. Errors become one line; a
truncated capture is analysed up to its last whole packet, then a warning says where it
stopped. A progress bar (rich, on stderr) shows on a terminal for big files only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import click

from vsockmon.conntrack.tracker import ConnTable, ConnTracker, Tags
from vsockmon.decode.frames import FrameBatch, decode_batches
from vsockmon.wire.pcapio import CaptureError, open_capture

PROGRESS_MIN_BYTES = 32 << 20
"""Files smaller than this finish before a progress bar would be worth drawing."""

Visitor = Callable[[FrameBatch, Tags], None]


@dataclass
class Analysis:
    """What one pass over a capture found."""

    name: str
    table: ConnTable
    frames: int
    frames_without_stream: int
    first_ts_ns: int | None
    last_ts_ns: int | None


@contextmanager
def _progress(path: str) -> Iterator[Callable[[int], None]]:
    """A callback taking the bytes read so far; a no-op unless it is worth showing."""
    size = os.path.getsize(path) if path != "-" and os.path.isfile(path) else 0
    if not sys.stderr.isatty() or size < PROGRESS_MIN_BYTES or path.endswith(".gz"):
        yield lambda _done: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress("reading", BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("read", total=size)
        yield lambda done: bar.update(task, completed=done)


def analyse(path: str, *visitors: Visitor) -> Analysis:
    """Track every connection of ``path``; each visitor sees each batch and its tags."""
    tracker = ConnTracker()
    first: int | None = None
    last: int | None = None
    try:
        with open_capture(path) as reader, _progress(path) as advance:
            for fb in decode_batches(reader.batches()):
                tags = tracker.feed(fb)
                for visit in visitors:
                    visit(fb, tags)
                if len(fb):
                    first = int(fb.ts_ns[0]) if first is None else first
                    last = int(fb.ts_ns[-1])
                advance(reader.offset)
            name, stopped = reader.name, reader.stopped
    except CaptureError as e:
        raise click.ClickException(str(e)) from None
    if stopped:
        click.echo(f"vsockmon: warning: {name}: {stopped}; analysed the "
                   f"{tracker.frames} whole packets before it", err=True)
    return Analysis(name, tracker.finish(), tracker.frames, tracker.frames_without_stream,
                    first, last)


def check_output(path: str | None, force: bool) -> None:
    """Refuse an existing output file before the analysis, not after minutes of it."""
    if path and path != "-" and not force and os.path.exists(path):
        raise click.ClickException(f"{path}: exists; use --force to overwrite")


def write_output(path: str, data: bytes, force: bool) -> None:
    """Write a report file, refusing to replace one without ``--force``."""
    from vsockmon.wire.pcapio import create_output

    try:
        fp = create_output(path, force)
        fp.write(data)
        if path == "-":
            fp.flush()
        else:
            fp.close()
    except CaptureError as e:
        raise click.ClickException(str(e)) from None
