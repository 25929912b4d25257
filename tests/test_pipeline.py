"""The one analysis pass (vsockmon.analysis.pipeline): what it counts over a capture read in
many small batches — frames, frames outside any connection, first/last and earliest/latest
times when the file is not in time order — what every visitor sees, the progress it
reports, and where a damaged file stopped it. Expected values come from the frames each
test writes."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import T0, frame

from vsockmon.analysis.pipeline import Visitor, analyse, decoded
from vsockmon.conntrack.tracker import Tags
from vsockmon.decode.frames import FrameBatch
from vsockmon.wire.pcapio import CaptureReader, PcapngWriter, PcapWriter
from vsockmon.wire.protocol import Op

CLIENT, SERVER = (3, 50000), (2, 1024)
# (time, frame): a connection whose packets were written out of time order, plus a frame
# without a virtio header (10 zero bytes: no connection can hold it)
FRAMES = [
    (T0 + 5000, frame(Op.REQUEST, src=CLIENT, dst=SERVER)),
    (T0 + 9000, frame(Op.RESPONSE, src=SERVER, dst=CLIENT)),  # the latest
    (T0 + 7000, frame(Op.RW, b"abc", src=CLIENT, dst=SERVER)),
    (T0 + 1000, b"\x00" * 10),                                 # the earliest
    (T0 + 8000, frame(Op.RW, b"de", src=SERVER, dst=CLIENT)),
    (T0 + 6000, frame(Op.RST, src=CLIENT, dst=SERVER)),        # the last one written
]


def write(path: Path, frames: list[tuple[int, bytes]] = FRAMES) -> Path:
    with open(path, "wb") as fp:
        w = PcapWriter(fp)
        for t, data in frames:
            w.write(t, data)
    return path


@pytest.mark.parametrize("chunk", [60, 1 << 20])  # 60 bytes: about one packet per batch
def test_one_pass_counts_frames_and_times_whatever_the_batches(tmp_path: Path, chunk: int
                                                               ) -> None:
    path = write(tmp_path / "o.pcap")
    with CaptureReader(str(path), chunk=chunk) as reader:
        a = analyse(reader)
    assert (a.frames, a.frames_without_stream, len(a.table)) == (6, 1, 1)
    assert (a.first_ts_ns, a.last_ts_ns) == (T0 + 5000, T0 + 6000)  # as written
    assert (a.start_ns, a.end_ns) == (T0 + 1000, T0 + 9000)  # earliest, latest
    assert a.name == str(path) and a.stopped is None and a.capture_end_ns is None
    (conn,) = a.table
    assert (conn.packets, conn.bytes, conn.first_frame) == (5, 5, 1)


def test_every_visitor_sees_every_batch_with_its_tags(tmp_path: Path) -> None:
    path = write(tmp_path / "v.pcap")
    seen: list[list[tuple[int, int]]] = [[], []]

    def visitor(k: int) -> Visitor:
        def visit(fb: FrameBatch, tags: Tags) -> None:
            frames = (fb.first + i for i in range(len(fb)))
            seen[k] += list(zip(frames, tags.stream.tolist(), strict=True))
        return visit

    progress: list[int] = []
    with CaptureReader(str(path), chunk=60) as reader:
        analyse(reader, visitor(0), visitor(1), on_progress=progress.append)
    want = [(1, 0), (2, 0), (3, 0), (4, -1), (5, 0), (6, 0)]
    assert seen[0] == seen[1] == want
    assert len(progress) > 2 and progress == sorted(progress)
    assert progress[-1] == path.stat().st_size  # the whole file consumed


def test_decoded_numbers_frames_from_one_across_batches(tmp_path: Path) -> None:
    path = write(tmp_path / "d.pcap")
    with CaptureReader(str(path), chunk=60) as reader:
        got = [(fb.first, len(fb), len(batch.offsets)) for batch, fb in decoded(reader)]
    assert len(got) > 1
    assert [first for first, _, _ in got] == [1 + sum(n for _, n, _ in got[:i])
                                             for i in range(len(got))]
    assert sum(n for _, n, _ in got) == 6 and all(n == m for _, n, m in got)


def test_an_empty_capture_has_no_times(tmp_path: Path) -> None:
    with CaptureReader(str(write(tmp_path / "e.pcap", []))) as reader:
        a = analyse(reader)
    assert (a.frames, len(a.table), a.first_ts_ns, a.last_ts_ns, a.start_ns, a.end_ns) == (
        0, 0, None, None, None, None)


def test_a_truncated_capture_is_analysed_up_to_its_last_whole_packet(tmp_path: Path) -> None:
    path = write(tmp_path / "t.pcap")
    data = path.read_bytes()
    path.write_bytes(data[:-5])  # the last packet (the RST) loses its end
    with CaptureReader(str(path)) as reader:
        a = analyse(reader)
    assert a.frames == 5 and a.stopped is not None
    assert (a.last_ts_ns, a.end_ns) == (T0 + 8000, T0 + 9000)


def test_the_recorded_end_of_a_pcapng_capture_is_kept(tmp_path: Path) -> None:
    """A pcapng statistics block says the capture went on to T0 + 20 s after its last
    packet: the analysis reports it beside the last packet's time."""
    path = tmp_path / "s.pcapng"
    with open(path, "wb") as fp:
        w = PcapngWriter(fp)
        for t, data in FRAMES:
            w.write(t, data)
        fp.write(PcapngWriter.statistics_block(T0 + 20_000_000_000))
    with CaptureReader(str(path)) as reader:
        a = analyse(reader)
    assert (a.end_ns, a.capture_end_ns) == (T0 + 9000, T0 + 20_000_000_000)
