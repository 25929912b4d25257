"""What a worker does with one capture: the library's analysis, sent back as Arrow tables
and plain dicts. This module is all a Dask worker runs — no click, no printing, no files
written — so any process with vsockmon installed can serve a fleet run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from vsockmon.wire.pcapio import CaptureError

if TYPE_CHECKING:
    from vsockmon.api import Capture

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


@contextmanager
def _opened(source: str) -> Iterator[Capture]:
    """The capture at a local path, or through fsspec at a URL (s3://, gcs://, http://…)."""
    import vsockmon

    if "://" not in source:
        with vsockmon.open(source) as cap:
            yield cap
        return
    import fsspec

    try:
        fp = fsspec.open(source, "rb").open()
    except (OSError, ValueError, ImportError) as e:
        raise CaptureError(f"{source}: cannot open: {e}") from None
    try:
        with vsockmon.open(fp) as cap:
            yield cap
    finally:
        fp.close()


def analyse_capture(source: str, request: Request) -> CaptureResult:
    """Analyse the capture at ``source`` (a path or an fsspec URL, read on this worker)
    with the library API, in one pass over the file.

    Raises :class:`~vsockmon.errors.VsockmonError` (one line naming the capture) when the
    capture cannot be read; the client reports it and goes on with the others.
    """
    from vsockmon.diagnose.model import Severity
    from vsockmon.diagnose.views import matching_findings
    from vsockmon.export.tables import connections_table, packet_batch, packet_schema

    want = request.want
    result = CaptureResult()
    with _opened(source) as cap:
        batches: list[pa.RecordBatch] = []
        visitors = [] if "packets" not in want else [  # the tables of `vsockmon export`
            lambda fb, tags: batches.append(packet_batch(fb, tags, cap.name))]
        # one pass gives the tables, the findings' digest and the statistics' counts
        analysis = cap.scan(*visitors, findings="findings" in want, stats="stats" in want)
        if "packets" in want:
            result.packets = pa.Table.from_batches(batches, schema=packet_schema())
        if "packets" in want or "connections" in want:
            result.connections = connections_table(analysis.tables(), None)
        if "findings" in want:
            found = matching_findings(cap.findings(), request.rules,
                                      Severity.parse(request.min_severity))
            result.findings = [f.to_dict(cap.start_ns) for f in found]
        if "stats" in want:
            result.stats = cap.stats().to_dict()
        result.warning = cap.stopped
    return result
