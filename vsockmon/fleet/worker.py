"""What a worker does with one capture: the library's analysis, sent back as Arrow tables
and plain dicts. This module is all a Dask worker runs — no click, no printing, no files
written — so any process with vsockmon installed can serve a fleet run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

WANTS = frozenset({"connections", "packets", "findings", "stats"})
"""What a run can ask of each capture."""


@dataclass(frozen=True)
class Request:
    """What to compute for every capture of a run (sent once per task: keep it small)."""

    want: frozenset[str]
    rules: tuple[str, ...] = ()
    """``vsockmon diagnose --rule``: only these rules (or rule/kind) among the findings."""
    min_severity: str = "info"


@dataclass
class CaptureResult:
    """One capture's analysis, as it travels from a worker to the client."""

    connections: pa.Table | None = None
    packets: pa.Table | None = None
    findings: list[dict[str, Any]] | None = None
    """``Finding.to_dict()`` of each finding: the objects of ``vsockmon diagnose --json``."""
    stats: dict[str, Any] | None = None
    """``vsockmon stats --json``."""
    warning: str | None = None
    """Why reading stopped before the end of a damaged capture (what came before counts)."""


def analyse_capture(source: str, request: Request) -> CaptureResult:
    """Analyse the capture at ``source`` (a path or an fsspec URL, read on this worker).

    Raises :class:`~vsockmon.errors.VsockmonError` (one line naming the capture) when the
    capture cannot be read; the client reports it and goes on with the others.
    """
    from vsockmon.analysis.stats import StatsCollector
    from vsockmon.conntrack.tracker import ConnTracker
    from vsockmon.decode.frames import decode_batches
    from vsockmon.diagnose.engine import Digest, Severity, Thresholds, evaluate, select
    from vsockmon.export.tables import connections_table, packet_batch, packet_schema
    from vsockmon.wire.pcapio import open_capture

    want = request.want
    tracker = ConnTracker()
    digest = Digest(Thresholds()) if "findings" in want else None
    collector = StatsCollector() if "stats" in want else None
    batches: list[pa.RecordBatch] = []
    with open_capture(source) as reader:
        for fb in decode_batches(reader.batches()):
            tags = tracker.feed(fb)
            if digest is not None:
                digest.feed(fb, tags)
            if collector is not None:
                collector(fb, tags)
            if "packets" in want:
                batches.append(packet_batch(fb, tags, reader.name))
        stopped = reader.stopped
    table = tracker.finish()
    result = CaptureResult(warning=stopped)
    if "connections" in want:
        result.connections = connections_table(table, source)
    if "packets" in want:
        result.packets = pa.Table.from_batches(batches, schema=packet_schema())
    if digest is not None:
        found = select(evaluate(table, digest), request.rules,
                       Severity.parse(request.min_severity))
        result.findings = [f.to_dict(digest.start_ns) for f in found]
    if collector is not None:
        result.stats = collector.finish(table).to_dict()
    return result
