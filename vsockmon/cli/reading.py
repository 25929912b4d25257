"""How the analysis commands (conns, diagnose, stats, timeline, follow) read a capture.

The reading is :mod:`vsockmon.api`'s; this module only presents it: a progress bar (rich,
on stderr) on a terminal for big files, and a warning when a truncated capture was analysed
up to its last whole packet.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import click

from vsockmon.analysis.pipeline import Analysis, Visitor

if TYPE_CHECKING:
    from vsockmon.api import Capture

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


@contextmanager
def opened(path: str) -> Iterator[Capture]:
    """The capture a command reads (:func:`vsockmon.api.open`), with a progress bar while it
    is read and, after, a warning when a damaged file stopped the reading early."""
    from vsockmon import api  # pyarrow: not for `capture --diagnose`, which imports diagnose

    cap = api.open(path)
    with _progress(path) as advance:
        cap.on_progress = advance
        yield cap
    if cap.stopped:
        click.echo(f"vsockmon: warning: {cap.name}: {cap.stopped}; analysed the "
                   f"{cap.analysis().frames} whole packets before it", err=True)


def scan(path: str, *visitors: Visitor) -> Analysis:
    """One pass over ``path`` with the command's visitors (see :meth:`Capture.scan`)."""
    with opened(path) as cap:
        return cap.scan(*visitors)
