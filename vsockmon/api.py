"""The public Python API: a capture as Arrow tables, typed findings and statistics.

    import vsockmon
    cap = vsockmon.open("capture.pcap")       # pcap, pcapng, gzip, or a binary file object
    cap.packets()        # pyarrow.Table: the keys of `vsockmon decode --json`, one row per frame
    cap.connections()    # pyarrow.Table: the keys of `vsockmon conns --json`
    cap.findings()       # list[Finding]: what `vsockmon diagnose --json` prints
    cap.stats()          # Stats: what `vsockmon stats --json` prints (Stats.to_dict())

The commands are this API plus rendering, so a script and the shell can never disagree.
Every method is a pass of :mod:`vsockmon.analysis.pipeline` over the file that collects
what it needs; what a pass found (the connections, the diagnose digest, the statistics) is
kept. Nothing here prints or exits: failures raise
:class:`~vsockmon.errors.VsockmonError` subclasses (:class:`~vsockmon.wire.pcapio.CaptureError`
for a file that cannot be read), and a capture damaged part-way is analysed up to its last
whole packet, with :attr:`Capture.stopped` saying where it stopped.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from vsockmon.decode.filter import compile_filter
from vsockmon.decode.frames import FrameBatch, decode_batches
from vsockmon.wire.pcapio import CaptureError, CaptureReader, is_stream, open_capture

if TYPE_CHECKING:  # imported where used: `vsockmon decode` needs none of them (~0.3 s)
    import pyarrow as pa

    from vsockmon.analysis.pipeline import Analysis, Visitor
    from vsockmon.analysis.stats import Stats, StatsCollector
    from vsockmon.diagnose.digest import Digest
    from vsockmon.diagnose.model import Finding, Thresholds

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

    def readinto(self, buf: Any) -> int:  # any writable buffer, as RawIOBase's
        view = memoryview(buf).cast("B")
        data = self._fp.read(len(view))
        view[: len(data)] = data
        return len(data)


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
        self._once = self._path is not None and is_stream(self._path)
        """A path that is a stream (stdin, a FIFO, ``<(…)``): its bytes can be read once."""
        self.name: str = self._next.name
        """The capture's name in messages: its path, ``<stdin>`` or the file object's name."""
        self.stopped: str | None = None
        """After a pass: why reading stopped before the end of the file (a truncated or
        corrupt capture), else None."""
        self.on_progress: Callable[[int], None] | None = None
        """Called with the bytes of the file read so far, after each batch of every pass."""
        self._analysis: Analysis | None = None
        self._digests: dict[Thresholds, Digest] = {}
        self._stats: StatsCollector | None = None

    # -- passes ---------------------------------------------------------------------------

    def _open(self) -> CaptureReader:
        if self._fp is None:
            assert self._path is not None
            return open_capture(self._path)
        if self._start >= 0:
            self._fp.seek(self._start)
        return open_capture(io.BufferedReader(_Borrowed(self._fp)))

    def _reader(self) -> CaptureReader:
        """A reader at the first packet: the one :meth:`__init__` opened, then new ones."""
        if self._next is not None:
            reader, self._next = self._next, None
            return reader
        if self._once or (self._fp is not None and self._start < 0):
            raise CaptureError(f"{self.name}: a stream can be read only once; "
                               "save it to a file to analyse it again")
        return self._open()

    def scan(self, *visitors: Visitor, findings: bool = False, stats: bool = False,
             thresholds: Thresholds | None = None) -> Analysis:
        """One pass of :func:`vsockmon.analysis.pipeline.analyse`: track every connection,
        each visitor seeing each decoded batch with the tracker's tags. The building block
        of the methods below, for analyses of your own; its result is kept as
        :meth:`analysis`. With ``findings`` (and ``thresholds``) or ``stats``, the same pass
        also collects what :meth:`findings` or :meth:`stats` need, so they read no more."""
        from vsockmon.analysis.pipeline import analyse
        from vsockmon.analysis.stats import StatsCollector
        from vsockmon.diagnose.digest import Digest
        from vsockmon.diagnose.model import Thresholds

        key = thresholds or Thresholds()
        digest = Digest(key) if findings and key not in self._digests else None
        collector = StatsCollector() if stats and self._stats is None else None
        extra: list[Visitor] = []
        if digest is not None:
            extra.append(digest.feed)
        if collector is not None:
            extra.append(collector)
        with self._reader() as reader:
            self._analysis = analyse(reader, *visitors, *extra, on_progress=self.on_progress)
        self.stopped = self._analysis.stopped
        if digest is not None:
            self._digests[key] = digest
        self._stats = collector or self._stats
        return self._analysis

    def analysis(self) -> Analysis:
        """The connections (a :class:`~vsockmon.conntrack.tracker.ConnTable`), frame counts
        and times, from the last pass (running one if none ran yet)."""
        return self._analysis or self.scan()

    def frames(self, expr: str | None = None, count: int | None = None
               ) -> Iterator[tuple[FrameBatch, list[int]]]:
        """Each decoded batch (numpy columns; ``batch.frame(i)`` is one frame) with the rows
        that pass the display filter ``expr`` (``vsockmon decode -Y``), at most ``count`` in
        all. Raises :class:`~vsockmon.decode.filter.FilterError` for a bad filter."""
        keep = compile_filter(expr) if expr else None
        left = count
        with self._reader() as reader:
            for fb in decode_batches(reader.batches()):
                idx = keep(fb).nonzero()[0].tolist() if keep else list(range(len(fb)))
                if left is not None:
                    idx = idx[:left]
                    left -= len(idx)
                if idx:
                    yield fb, idx
                if self.on_progress is not None:
                    self.on_progress(reader.offset)
                if left == 0:
                    return
            self.stopped = reader.stopped

    # -- the tables -----------------------------------------------------------------------

    def iter_packets(self, batch_size: int = 65536, filter: str | None = None
                     ) -> Iterator[pa.RecordBatch]:
        """The rows of :meth:`packets` as record batches of ``batch_size`` rows (the last may
        be shorter): memory stays at about one batch whatever the capture's size. ``filter``
        keeps the frames a display filter passes (``vsockmon decode -Y``)."""
        import pyarrow as pa

        from vsockmon.export.tables import FRAME_SCHEMA, frames_batch

        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        pending: list[pa.RecordBatch] = []
        rows = 0
        for fb, idx in self.frames(filter):
            batch = frames_batch(fb)
            pending.append(batch if len(idx) == len(fb) else batch.take(pa.array(idx)))
            rows += len(idx)
            while rows >= batch_size:
                table = pa.Table.from_batches(pending, FRAME_SCHEMA)
                yield from table.slice(0, batch_size).combine_chunks().to_batches()
                rest = table.slice(batch_size)
                pending, rows = rest.to_batches(), rest.num_rows
        if rows:
            yield from pa.Table.from_batches(pending, FRAME_SCHEMA).combine_chunks().to_batches()

    def packets(self, filter: str | None = None) -> pa.Table:
        """Every frame (or those ``filter`` passes): one row per frame, one column per key of
        ``vsockmon decode --json`` (null where the JSON object leaves a key out: a frame
        without that header)."""
        import pyarrow as pa

        from vsockmon.export.tables import FRAME_SCHEMA

        return pa.Table.from_batches(list(self.iter_packets(filter=filter)), FRAME_SCHEMA)

    def connections(self) -> pa.Table:
        """Every connection (stream), one row each, one column per key of
        ``vsockmon conns --json``, in stream order."""
        from vsockmon.export.tables import connections_table

        return connections_table(self.analysis().tables(), None)

    def findings(self, thresholds: Thresholds | None = None) -> list[Finding]:
        """The diagnose findings, ranked as ``vsockmon diagnose`` ranks them (most severe
        first); ``f.to_dict(cap.start_ns)`` is the object ``diagnose --json`` prints."""
        from vsockmon.diagnose.engine import evaluate, tracked
        from vsockmon.diagnose.model import Thresholds

        key = thresholds or Thresholds()
        if key not in self._digests:
            self.scan(findings=True, thresholds=key)
        analysis = self.analysis()  # silences last until the capture's recorded end
        return evaluate(tracked(analysis.tracker), self._digests[key], key,
                        analysis.capture_end_ns)

    def stats(self, top: int = 10, bins: int = 20) -> Stats:
        """What ``vsockmon stats`` shows; ``.to_dict()`` is the object of ``stats --json``."""
        if self._stats is None:
            self.scan(stats=True)
        assert self._stats is not None
        return self._stats.finish(self.analysis().tables(), top, bins)

    @property
    def start_ns(self) -> int | None:
        """The capture's earliest timestamp: the origin of each finding's ``t`` (None for a
        capture without frames)."""
        return self.analysis().start_ns

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
