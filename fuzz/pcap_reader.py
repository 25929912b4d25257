"""Fuzz target: the pcap/pcapng reader (gzip too), fed whole files.

Each input is a capture file. It is read to its end twice — in one 4 MiB chunk, and in
chunks of 64 bytes so that records and blocks straddle every refill — and both readings
must give the same packets and stop at the same place: the reader's streaming is what
keeps its memory bounded, and it must not change what a file says. Seeds: every fixture.
"""

from __future__ import annotations

import io

from common import capture_seeds, instrumented, run

with instrumented(__name__):
    from vsockmon.wire.pcapio import MAX_RECORD, CaptureError, CaptureReader

SMALL_CHUNK = 64


def read(data: bytes, chunk: int) -> tuple[list[tuple[int, int, bytes, int]], str | None]:
    """The packets of ``data`` read ``chunk`` bytes at a time, and why reading stopped."""
    with CaptureReader(io.BytesIO(data), chunk=chunk) as reader:
        packets = [(r.ts_ns, r.orig_len, r.data, r.linktype) for r in reader.records()]
        assert reader.offset <= len(data) or data[:2] == b"\x1f\x8b"
        return packets, reader.stopped


def one_input(data: bytes) -> None:
    try:
        whole = read(data, 4 << 20)
    except CaptureError:
        return
    packets = whole[0]
    assert all(len(p[2]) <= MAX_RECORD for p in packets)
    assert read(data, SMALL_CHUNK) == whole, "the chunk size changed what was read"


if __name__ == "__main__":
    run(one_input, capture_seeds)
