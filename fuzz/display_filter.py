"""Fuzz target: the display-filter parser (``decode -Y``) and the masks it compiles.

Each input is a filter expression (UTF-8, undecodable bytes kept as the command line keeps
them). One that compiles is applied to the frames of a fixture, and must give one boolean
per frame, its ``not (…)`` the complement, and ``(…) and (…)`` itself: the operators are
numpy, and a mask that is not boolean or not the right length would pick wrong frames.
Anything but :class:`~vsockmon.decode.filter.FilterError` escaping is a crash.
Seeds: every field name, enum value, flag and anomaly name, and the documented examples.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np
from common import FIXTURES, ROOT, instrumented, run

with instrumented(__name__):
    from vsockmon.decode.filter import (
        _ANOMALY_BITS,
        _FLAG_OWNER,
        FIELDS,
        FilterError,
        compile_filter,
    )
    from vsockmon.decode.frames import FrameBatch, decode_batch
    from vsockmon.wire.pcapio import CaptureReader

FRAMES_FROM = FIXTURES / "synthetic" / "stream-all-ops.pcap"


def _frames() -> FrameBatch:
    """The fixture's frames as one batch (every op, both headers, a few odd frames)."""
    with CaptureReader(str(FRAMES_FROM)) as reader:
        return decode_batch(next(reader.batches()), 1)


FRAMES = _frames()


def seeds() -> Iterator[bytes]:
    for name in FIELDS:
        yield name.encode()
        yield f"{name} == 1 or {name} != 0x10".encode()
    for name, field in FIELDS.items():  # the fields with value names: op, type, trans…
        for member in field.enum or ():
            yield f"{name} == {member.name}".encode()
    for flag in _FLAG_OWNER:
        yield f"flags has {flag}".encode()
    for anomaly in _ANOMALY_BITS:
        yield f"anomaly has {anomaly}".encode()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for expr in re.findall(r"-Y '([^']+)'", doc.read_text()):
            yield expr.encode()


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    try:
        keep = compile_filter(text)
        negated = compile_filter(f"not ({text})")
        twice = compile_filter(f"({text}) and ({text})")
    except FilterError:
        return
    mask = keep(FRAMES)
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (len(FRAMES),)
    assert (negated(FRAMES) == ~mask).all()
    assert (twice(FRAMES) == mask).all()


if __name__ == "__main__":
    run(one_input, seeds)
