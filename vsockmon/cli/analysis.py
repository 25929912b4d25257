"""The one reading pass the analysis commands (conns, timeline, stats, follow) share.

Opens the capture, decodes it batch by batch, feeds the connection tracker and hands every
batch with its per-row tags to the command's own visitors. Errors become one line; a
truncated capture is analysed up to its last whole packet, then a warning says where it
stopped. A progress bar (rich, on stderr) shows on a terminal for big files only.
The pass itself is :meth:`vsockmon.api.Capture.analyse`; this module only presents it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from vsockmon import api
from vsockmon.analysis.pipeline import Analysis, Visitor
from vsockmon.wire.pcapio import CaptureError

PROGRESS_MIN_BYTES = 32 << 20
"""Files smaller than this finish before a progress bar would be worth drawing."""


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
    """The analysis pass of :mod:`vsockmon.api` over ``path``, with a progress bar, its
    errors as one line and a warning when a damaged file stopped it early."""
    try:
        with _progress(path) as advance:
            analysis = api.open(path).analyse(*visitors, on_progress=advance)
    except CaptureError as e:
        raise click.ClickException(str(e)) from None
    if analysis.stopped:
        click.echo(f"vsockmon: warning: {analysis.name}: {analysis.stopped}; analysed the "
                   f"{analysis.frames} whole packets before it", err=True)
    return analysis


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
