"""Fuzz target: connection tracking, diagnose and statistics (one analysis pass).

Each input is a capture file, analysed as ``conns``, ``diagnose`` and ``stats`` analyse it,
with every result turned into the JSON those commands print. The tracker and the diagnose
digest stream batch by batch, so the same file is analysed a second time in batches of a
few packets: the connections, findings and statistics must not change.
Seeds: every fixture.
"""

from __future__ import annotations

import io
import json
from typing import Any

from common import capture_seeds, instrumented, run

with instrumented(__name__):
    from vsockmon.analysis.pipeline import analyse
    from vsockmon.analysis.stats import StatsCollector
    from vsockmon.diagnose.digest import Digest
    from vsockmon.diagnose.engine import evaluate
    from vsockmon.diagnose.model import Thresholds
    from vsockmon.wire.pcapio import CaptureError, CaptureReader

SMALL_CHUNK = 256


def results(data: bytes, chunk: int) -> dict[str, Any]:
    """What conns, diagnose and stats say of ``data`` read ``chunk`` bytes at a time."""
    digest, stats = Digest(Thresholds()), StatsCollector()
    with CaptureReader(io.BytesIO(data), chunk=chunk) as reader:
        done = analyse(reader, digest.feed, stats)
    findings = [f.to_dict(done.start_ns) for f in evaluate(done.table, digest)]
    out = {"conns": done.table.records(), "findings": findings,
           "stats": stats.finish(done.table).to_dict()}
    json.dumps(out)
    return out


def one_input(data: bytes) -> None:
    try:
        whole = results(data, 4 << 20)
    except CaptureError:
        return
    assert results(data, SMALL_CHUNK) == whole, "batch boundaries changed the analysis"


if __name__ == "__main__":
    run(one_input, capture_seeds)
