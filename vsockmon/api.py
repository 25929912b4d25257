"""The public Python API: a capture as Arrow tables, typed findings and statistics.

    import vsockmon
    cap = vsockmon.open("capture.pcap")       # pcap, pcapng, gzip, or a binary file object
    cap.packets()        # pyarrow.Table: the keys of `vsockmon decode --json`, one row per frame
    cap.connections()    # pyarrow.Table: the keys of `vsockmon conns --json`
    cap.findings()       # list[Finding]: what `vsockmon diagnose --json` prints
    cap.stats()          # Stats: what `vsockmon stats --json` prints (Stats.to_dict())

The commands are this API plus rendering, so a script and the shell can never disagree.
Every method is one pass of :mod:`vsockmon.analysis.pipeline` over the file; connections,
findings and statistics come from one shared pass and are kept, so asking for all three reads
the file once. Nothing here prints or exits: failures raise
:class:`~vsockmon.errors.VsockmonError` subclasses (:class:`~vsockmon.wire.pcapio.CaptureError`
for a file that cannot be read), and a capture damaged part-way is analysed up to its last
whole packet, with :attr:`Capture.stopped` saying where it stopped.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow as pa

from vsockmon.analysis.pipeline import Analysis, Visitor, analyse, decoded
from vsockmon.analysis.stats import Stats, StatsCollector
from vsockmon.diagnose.engine import Digest, Finding, Thresholds, evaluate
from vsockmon.export.tables import FRAME_SCHEMA, connections_table, frames_batch
from vsockmon.wire.pcapio import CaptureError, CaptureReader, open_capture

__all__ = ["Capture", "open"]

PathOrFile = str | os.PathLike[str] | BinaryIO


class _Borrowed(io.RawIOBase):
    """A caller's file object as the reader's raw stream: closing the reader leaves the
    caller's file open (it is theirs)."""

    def __init__(self, fp: BinaryIO) -> None:
        super().__init__()
        self._fp = fp
        self.name = str(getattr(fp, "name", "<file object>"))

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        data = self._fp.read(len(buf))
        buf[: len(data)] = data
        return len(data)


@dataclass
class _Pass:
    """The shared pass: the connections, the diagnose digest and the statistics' counts."""

    analysis: Analysis
    digest: Digest
    stats: StatsCollector


class Capture:
    """An opened capture file. Use :func:`open`; close it (or use ``with``) to release the
    file early.

    A path or a seekable file object can be read any number of times; a stream (stdin, a
    pipe, a socket) once, so its first pass must be the one you want.
    """

    def __init__(self, source: PathOrFile) -> None:
        if isinstance(source, str | os.PathLike):
            self._path: str | None = os.fspath(source)
            self._fp: BinaryIO | None = None
            self._start = 0
        else:
            self._path, self._fp = None, source
            self._start = source.tell() if source.seekable() else -1
        self._next: CaptureReader | None = self._open()
        self.name: str = self._next.name
        """The capture's name in messages: its path, ``<stdin>`` or the file object's name."""
        self.stopped: str | None = None
        """After a pass: why reading stopped before the end of the file (a truncated or
        corrupt capture), else None."""
        self._passes: dict[Thresholds, _Pass] = {}

    # -- passes ---------------------------------------------------------------------------

    def _open(self) -> CaptureReader:
        if self._fp is None:
            assert self._path is not None
            return open_capture(self._path)
        if self._start >= 0:
            self._fp.seek(self._start)
        return open_capture(_Borrowed(self._fp))  # type: ignore[arg-type]

    def _reader(self) -> CaptureReader:
        """A reader at the first packet: the one :meth:`__init__` opened, then new ones."""
        if self._next is not None:
            reader, self._next = self._next, None
            return reader
        if self._path == "-" or (self._fp is not None and self._start < 0):
            raise CaptureError(f"{self.name}: a stream can be read only once; "
                               "save it to a file to analyse it again")
        return self._open()

    def analyse(self, *visitors: Visitor, on_progress: Callable[[int], None] | None = None
                ) -> Analysis:
        """One pass: track every connection, each visitor seeing each decoded batch and its
        tags (see :mod:`vsockmon.analysis.pipeline`). The building block of the methods below
        and of the commands; ``on_progress(bytes_read)`` is called after each batch."""
        with self._reader() as reader:
            result = analyse(reader, *visitors, on_progress=on_progress)
        self.stopped = result.stopped
        return result

    def _pass(self, thresholds: Thresholds | None = None) -> _Pass:
        key = thresholds or Thresholds()
        if key not in self._passes:
            digest, stats = Digest(key), StatsCollector()
            self._passes[key] = _Pass(self.analyse(digest.feed, stats), digest, stats)
        return self._passes[key]

    # -- the tables -----------------------------------------------------------------------

    def iter_packets(self, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """The rows of :meth:`packets` as record batches of ``batch_size`` rows (the last may
        be shorter): memory stays at about one batch whatever the capture's size."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        with self._reader() as reader:
            pending: list[pa.RecordBatch] = []
            rows = 0
            for _, fb in decoded(reader):
                pending.append(frames_batch(fb))
                rows += len(fb)
                while rows >= batch_size:
                    table = pa.Table.from_batches(pending, FRAME_SCHEMA)
                    yield from table.slice(0, batch_size).combine_chunks().to_batches()
                    rest = table.slice(batch_size)
                    pending, rows = rest.to_batches(), rest.num_rows
            if rows:
                yield from pa.Table.from_batches(pending, FRAME_SCHEMA).combine_chunks() \
                    .to_batches()
            self.stopped = reader.stopped

    def packets(self) -> pa.Table:
        """Every frame: one row per frame, one column per key of ``vsockmon decode --json``
        (null where the JSON object leaves a key out: a frame without that header)."""
        return pa.Table.from_batches(list(self.iter_packets()), FRAME_SCHEMA)

    def connections(self) -> pa.Table:
        """Every connection (stream), one row each, one column per key of
        ``vsockmon conns --json``, in stream order."""
        return connections_table(self._pass().analysis.table, None)

    def findings(self, thresholds: Thresholds | None = None) -> list[Finding]:
        """The diagnose findings, ranked as ``vsockmon diagnose`` ranks them (most severe
        first); ``f.to_dict(cap.start_ns)`` is the object ``diagnose --json`` prints."""
        p = self._pass(thresholds)
        return evaluate(p.analysis.table, p.digest, thresholds)

    def stats(self, top: int = 10, bins: int = 20) -> Stats:
        """What ``vsockmon stats`` shows; ``.to_dict()`` is the object of ``stats --json``."""
        p = self._pass()
        return p.stats.finish(p.analysis.table, top, bins)

    @property
    def start_ns(self) -> int | None:
        """The capture's earliest timestamp: the origin of each finding's ``t`` (None for a
        capture without frames)."""
        return self._pass().digest.start_ns

    # -- the file -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file opened by :func:`open` (a caller's file object stays open)."""
        if self._next is not None:
            self._next.close()
            self._next = None

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<vsockmon.Capture {self.name!r}>"


def open(source: PathOrFile) -> Capture:
    """Open a pcap or pcapng capture (gzip ok): a path (``-`` is stdin) or a binary file
    object read from where it stands. Raises :class:`~vsockmon.wire.pcapio.CaptureError` (a
    :class:`~vsockmon.errors.VsockmonError`) when it is missing or not a vsockmon capture."""
    return Capture(source)
