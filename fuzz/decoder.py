"""Fuzz target: the bulk decoder and every renderer of ``vsockmon decode``.

Each input is a capture file, decoded batch by batch as ``decode`` does. Every frame is
rendered every way — the compiled summary lines and JSON Lines, the per-frame line, table
row and ``-V`` tree with its payload dissection — and the compiled outputs must equal the
Python ones they stand for (each record as JSON, :func:`summary_line` of each
frame): the fast paths promise exactly that, so a difference is a bug too.
Seeds: every fixture.
"""

from __future__ import annotations

import io
import json

import numpy as np
from common import capture_seeds, instrumented, run

with instrumented(__name__):
    from vsockmon.cli.decode import _payload_summary
    from vsockmon.decode import render
    from vsockmon.decode.frames import FrameBatch, _json, decode_batch
    from vsockmon.payload import dissect_frame
    from vsockmon.wire.pcapio import CaptureError, CaptureReader


def one_input(data: bytes) -> None:
    try:
        with CaptureReader(io.BytesIO(data)) as reader:
            first, t0 = 1, None
            for batch in reader.batches():
                fb = decode_batch(batch, first)
                first += len(fb)
                t0 = int(fb.ts_ns[0]) if t0 is None else t0
                render_all(fb, t0)
    except CaptureError:  # unreadable at the start, or a damaged gzip stream later on
        return


def render_all(fb: FrameBatch, t0: int) -> None:
    """Every view of every frame of ``fb``; the compiled ones equal to the Python ones."""
    idx = np.arange(len(fb), dtype=np.int64)
    lines = render.summary_lines(fb, idx, t0, _payload_summary).decode().splitlines()
    records = fb.records()
    objects = fb.json_text(idx).decode().splitlines()
    assert len(lines) == len(objects) == len(records) == len(fb)
    for frame, line, obj, rec in zip(fb.frames(), lines, objects, records, strict=True):
        assert obj == _json(rec), (obj, rec)
        info = dissect_frame(frame)
        summary = _payload_summary(frame.payload[: frame.virtio["len"]],
                                   frame.virtio["src_port"], frame.virtio["dst_port"]
                                   ) if frame.has_virtio else None
        assert line == render.summary_line(frame, t0, summary), line
        render.row(frame, t0)
        render.tree(frame, info.lines() if info else None)
        json.dumps(info.to_dict() if info else None)

if __name__ == "__main__":
    run(one_input, capture_seeds)
