"""Exports of one capture, or of many in parallel: annotated pcapng, or tables on disk.

This is the file-handling layer of the export package: it opens captures, runs the decoder
and the tracker, and writes files through :mod:`~vsockmon.export.sinks` and pcapio's
writers. Errors a user can fix come out as :class:`ExportError` with a one-line message.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vsockmon.analysis.pipeline import Visitor, analyse, tracked
from vsockmon.conntrack.tracker import ConnTracker, Tags
from vsockmon.decode.frames import FrameBatch
from vsockmon.diagnose.digest import Digest
from vsockmon.diagnose.engine import evaluate
from vsockmon.diagnose.model import Finding, Thresholds
from vsockmon.diagnose.views import frame_notes
from vsockmon.errors import VsockmonError
from vsockmon.export.comments import Annotator
from vsockmon.export.sinks import FORMATS, TableFile
from vsockmon.export.tables import (
    CONNECTION_COLUMNS,
    connections_table,
    packet_batch,
    packet_schema,
    schema,
)
from vsockmon.output import refuse_existing, replacing
from vsockmon.wire.pcapio import (
    CaptureError,
    PcapngWriter,
    is_stream,
    open_capture,
    open_file,
)
from vsockmon.wire.protocol import LINKTYPE_VSOCK

CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".pcap.gz", ".pcapng.gz", ".cap")


class ExportError(VsockmonError):
    """An export that cannot be done: the message is one line for the user."""


@dataclass
class ExportResult:
    """What one export wrote."""

    source: str
    outputs: list[str] = field(default_factory=list)
    packets: int = 0
    connections: int = 0
    skipped: int = 0
    """Frames left out of a pcapng export: not of the vsock link type."""
    stopped: str | None = None
    """Why reading ended early (a damaged capture), as the reader says it."""
    error: str | None = None
    """For one of many captures: why its export failed."""

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@contextmanager
def _seekable(source: str) -> Iterator[str]:
    """A path that can be read twice: the file itself, or a stream (stdin, a FIFO) spooled
    to a temporary file."""
    if not is_stream(source):
        yield source
        return
    try:
        stream = sys.stdin.buffer if source == "-" else open_file(source)
    except CaptureError as e:
        raise ExportError(str(e)) from None
    with tempfile.NamedTemporaryFile(prefix="vsockmon-", suffix=".pcap") as tmp:
        shutil.copyfileobj(stream, tmp)
        if stream is not sys.stdin.buffer:
            stream.close()
        tmp.flush()
        yield tmp.name


def export_pcapng(source: str, out: str, force: bool = False,
                  extra: Mapping[int, Sequence[str]] | None = None, payload: bool = True,
                  diagnose: bool = False, on_batch: Callable[[int], None] | None = None
                  ) -> ExportResult:
    """Copy ``source`` to a pcapng with a comment on every packet (connection, state, credit,
    anomalies, payload summary, with ``diagnose`` the findings of vsockmon.diagnose.engine at their
    evidence frames, then ``extra[frame]``), shown by Wireshark as frame.comment.

    Two passes: the first tracks every connection (and diagnoses the capture), so a packet's
    comment can say how its connection ends and which packets the tracker singles out.
    ``on_batch`` hears the number of packets of each batch, in both passes.
    """
    refuse_existing(out, force, ExportError)  # before minutes of reading
    result = ExportResult(source, [out])
    with _seekable(source) as path:
        try:
            digest = Digest(Thresholds()) if diagnose else None
            visitors: list[Visitor] = [] if digest is None else [digest.feed]
            if on_batch is not None:
                visitors.append(lambda fb, _tags: on_batch(len(fb)))
            with open_capture(path) as reader:
                analysis = analyse(reader, *visitors)
            table = analysis.table
            result.connections = len(table)
            if digest is not None:
                extra = _with_findings(evaluate(table, digest, end_ns=analysis.capture_end_ns),
                                       extra)
            annotator = Annotator(table, extra)
            with replacing(out, force, ExportError) as fp:
                _annotated_copy(path, PcapngWriter(fp), annotator, payload, result, on_batch)
        except CaptureError as e:
            raise ExportError(str(e)) from None
    return result


def _annotated_copy(path: str, writer: PcapngWriter, annotator: Annotator, payload: bool,
                    result: ExportResult, on_batch: Callable[[int], None] | None) -> None:
    """The second pass of :func:`export_pcapng`: every vsock packet with its comment."""
    with open_capture(path) as reader:
        for batch, fb, tags in tracked(reader, ConnTracker()):
            for i, comment in enumerate(annotator.comments(fb, tags, payload)):
                if batch.linktypes and batch.linktypes[i] != LINKTYPE_VSOCK:
                    result.skipped += 1
                    continue
                start = batch.offsets[i]
                writer.write(batch.ts_ns[i], batch.buf[start:start + batch.caplens[i]],
                             batch.orig_lens[i], comment or None)
                result.packets += 1
            if on_batch is not None:
                on_batch(len(fb))
        result.stopped = reader.stopped
    writer.flush()


def _with_findings(findings: list[Finding], extra: Mapping[int, Sequence[str]] | None
                   ) -> dict[int, list[str]]:
    """The caller's extra lines after a ``diagnose …`` line per finding at each of its
    frames."""
    lines = {frame: [f"diagnose: {note}" for note in notes]
             for frame, notes in frame_notes(findings).items()}
    for frame, more in (extra or {}).items():
        lines.setdefault(frame, []).extend(more)
    return lines


def table_paths(outdir: Path, fmt: str) -> tuple[Path, Path]:
    suffix = FORMATS[fmt]
    return outdir / f"packets{suffix}", outdir / f"connections{suffix}"


def export_tables(source: str, outdir: Path, fmt: str, force: bool = False,
                  payload: bool = False, capture: str | None = None,
                  on_batch: Callable[[int], None] | None = None) -> ExportResult:
    """Write ``outdir/packets.EXT`` (streamed, one batch at a time) and
    ``outdir/connections.EXT`` for one capture. ``capture`` names it in the tables;
    ``on_batch`` hears the number of packets of each batch written."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown table format {fmt!r}; choose {', '.join(FORMATS)}")
    name = capture or ("<stdin>" if source == "-" else os.path.basename(source))
    paths = table_paths(outdir, fmt)
    refuse_existing(paths, force, ExportError)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"{outdir}: cannot create: {e.strerror}") from None
    result = ExportResult(source, [str(p) for p in paths])
    packets = TableFile(paths[0], fmt, packet_schema(payload))
    try:
        def write(fb: FrameBatch, tags: Tags) -> None:
            packets.write(packet_batch(fb, tags, name, payload))
            if on_batch is not None:
                on_batch(len(fb))

        with open_capture(source) as reader:
            analysis = analyse(reader, write)
        result.stopped = analysis.stopped
        conns = TableFile(paths[1], fmt, schema(CONNECTION_COLUMNS))
        table = connections_table(analysis.tables(), name)
        try:
            conns.write(table)
        except BaseException:
            conns.abort()
            raise
        packets.commit()
        conns.commit()
    except CaptureError as e:
        packets.abort()
        raise ExportError(str(e)) from None
    except BaseException:
        packets.abort()
        raise
    result.packets, result.connections = packets.rows, table.num_rows
    return result


def find_captures(directory: Path) -> list[Path]:
    """Capture files under ``directory`` (recursively, by suffix), in a stable order."""
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name.endswith(CAPTURE_SUFFIXES))


def _one(args: tuple[str, str, str, bool, bool, str]) -> ExportResult:
    source, outdir, fmt, force, payload, capture = args
    try:
        return export_tables(source, Path(outdir), fmt, force, payload, capture)
    except ExportError as e:
        return ExportResult(source, error=str(e))


def export_many(directory: Path, outdir: Path, fmt: str, force: bool = False,
                payload: bool = False, jobs: int | None = None,
                on_done: Callable[[ExportResult], None] | None = None) -> list[ExportResult]:
    """Export every capture under ``directory`` in parallel processes, each into
    ``outdir/<its relative path>/``; one failure does not stop the others."""
    captures = find_captures(directory)
    if not captures:
        raise ExportError(f"{directory}: no capture files ({', '.join(CAPTURE_SUFFIXES)})")
    work = [(str(p), str(outdir / p.relative_to(directory)), fmt, force, payload,
             str(p.relative_to(directory))) for p in captures]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    results: list[ExportResult] = []
    if jobs == 1:
        for item in work:
            results.append(_one(item))
            if on_done:
                on_done(results[-1])
    else:
        # forkserver, not fork: a fork of a process whose pyarrow or numpy threads are
        # running (a notebook's, a test session's) can crash in the child
        with ProcessPoolExecutor(max_workers=jobs,
                                 mp_context=multiprocessing.get_context("forkserver")) as pool:
            for fut in as_completed([pool.submit(_one, item) for item in work]):
                results.append(fut.result())
                if on_done:
                    on_done(results[-1])
    return sorted(results, key=lambda r: r.source)
