"""The one analysis pass: read a capture, decode it batch by batch, track its connections.

Every analysis (``conns``, ``stats``, ``diagnose``, ``timeline``, ``follow``, the exports,
:mod:`vsockmon.api`) is this pass plus *visitors*: callables that see each decoded batch with
the tracker's per-row tags (a :class:`~vsockmon.analysis.stats.StatsCollector`, a diagnose
:class:`~vsockmon.diagnose.engine.Digest`, a :class:`~vsockmon.conntrack.tracker.StreamRows`).
Several analyses in one pass read the file once.

No printing, no exit codes: a file that cannot be read raises
:class:`~vsockmon.wire.pcapio.CaptureError`; a truncated one is analysed up to its last whole
packet and :attr:`Analysis.stopped` says where it stopped, for the caller to report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

from vsockmon.conntrack.tracker import Connection, ConnTable, ConnTracker, Tags
from vsockmon.decode.frames import FrameBatch, decode_batch
from vsockmon.wire.pcapio import CaptureReader, RecordBatch

Visitor = Callable[[FrameBatch, Tags], None]
"""Sees every decoded batch with the tracker's tags for its rows."""

SPILL_AT = 32768
"""Closed connections the tracker holds before it spills them to compact columns: memory
follows the open connections (and this many closed ones), not all connections ever seen."""


@dataclass
class Analysis:
    """What one pass over a capture found."""

    name: str
    """The capture's name for messages (its path, ``<stdin>``, a file object's name)."""
    tracker: ConnTracker
    """The tracker after the last batch: its connections are :attr:`table`, or
    :meth:`tables` a range of streams at a time."""
    frames: int
    frames_without_stream: int
    first_ts_ns: int | None
    """The time of the first frame (None without frames)."""
    last_ts_ns: int | None
    """The time of the last frame."""
    start_ns: int | None = None
    """The earliest timestamp (a capture's frames are not always in time order)."""
    end_ns: int | None = None
    """The latest timestamp."""
    stopped: str | None = None
    """Why reading ended before the end of the file (truncated, corrupt), else None."""
    capture_end_ns: int | None = None
    """When the capture stopped, if the file records it (a pcapng statistics block): later
    than :attr:`end_ns` when the capture went on, silent, after its last packet."""

    @cached_property
    def table(self) -> ConnTable:
        """Every connection, in one table (made on first use, then kept)."""
        return self.tracker.finish()

    def connection(self, stream: int) -> Connection:
        """Stream ``stream``'s connection (0 <= stream < ``len(tracker)``), made alone: a
        command that shows a few of a million does not make the whole table."""
        return self.tracker.table(stream, stream + 1)[0]

    def tables(self) -> Iterator[ConnTable]:
        """Every connection as tables of consecutive streams, in stream order: for writers
        that must not hold a million connections at once (:attr:`table` if it was made)."""
        if "table" in self.__dict__:
            yield self.table
        else:
            yield from self.tracker.tables()


def decoded(reader: CaptureReader) -> Iterator[tuple[RecordBatch, FrameBatch]]:
    """Each batch of the reader with its decoded columns, frames numbered from 1."""
    first = 1
    for batch in reader.batches():
        fb = decode_batch(batch, first)
        first += len(fb)
        yield batch, fb


def tracked(reader: CaptureReader, tracker: ConnTracker
            ) -> Iterator[tuple[RecordBatch, FrameBatch, Tags]]:
    """Each batch of the reader, decoded, with the tracker's tags for its rows."""
    for batch, fb in decoded(reader):
        yield batch, fb, tracker.feed(fb)


def analyse(reader: CaptureReader, *visitors: Visitor,
            on_progress: Callable[[int], None] | None = None) -> Analysis:
    """Track every connection of the capture; each visitor sees each batch and its tags.

    ``on_progress`` hears the bytes of the file consumed after each batch (for a progress
    bar). Raises :class:`~vsockmon.wire.pcapio.CaptureError` when the file cannot be read.
    """
    tracker = ConnTracker(spill_at=SPILL_AT)
    first = last = low = high = None
    for _, fb, tags in tracked(reader, tracker):
        for visit in visitors:
            visit(fb, tags)
        if len(fb):
            first = int(fb.ts_ns[0]) if first is None else first
            last = int(fb.ts_ns[-1])
            lo, hi = int(fb.ts_ns.min()), int(fb.ts_ns.max())
            low = lo if low is None else min(low, lo)
            high = hi if high is None else max(high, hi)
        if on_progress is not None:
            on_progress(reader.offset)
    return Analysis(reader.name, tracker, tracker.frames,
                    tracker.frames_without_stream, first, last, low, high, reader.stopped,
                    reader.capture_end_ns)
