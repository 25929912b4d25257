"""Edge cases of ConnTracker's bookkeeping that only the mutation run asked about (issue 19).

Which streams count as closed (and so leave the working set for the spill) is decided by
the SHUTDOWN flags per direction. The expected values are reasoned from the virtio-vsock
semantics of the frames written here: a SHUTDOWN with SEND from side X shuts the X -> peer
direction, one with RCV from X shuts the peer -> X direction (X will not read any more); a
connection is closed for the spill when both directions are shut (or an RST came).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conntrack_scenarios import Conv, write
from helpers import T0, frame

from vsockmon.conntrack.tracker import ConnTracker
from vsockmon.decode.frames import decode_batches
from vsockmon.wire.pcapio import CaptureReader
from vsockmon.wire.protocol import Op, ShutdownFlag

RCV, SEND = ShutdownFlag.RCV, ShutdownFlag.SEND
CLIENT, SERVER = (3, 50000), (2, 1234)


def _shut_capture(tmp_path: Path, shutdowns: list[tuple[int, int]]) -> Path:
    """One opened connection, then the SHUTDOWNs ``(side, flags)``; side 0 is the client."""
    ends = (CLIENT, SERVER)
    frames = [frame(Op.REQUEST, src=CLIENT, dst=SERVER), frame(Op.RESPONSE, src=SERVER, dst=CLIENT)]
    frames += [frame(Op.SHUTDOWN, src=ends[side], dst=ends[1 - side], flags=flags)
               for side, flags in shutdowns]
    return write(tmp_path / "shut.pcap", [(T0 + i, f) for i, f in enumerate(frames)])


def _fed(tmp_path: Path, shutdowns: list[tuple[int, int]]) -> ConnTracker:
    """A tracker (spill at one stream) fed one opened connection, then the SHUTDOWNs
    ``(side, flags)``; side 0 is the client, 1 the server."""
    tracker = ConnTracker(spill_at=1)
    with CaptureReader(str(_shut_capture(tmp_path, shutdowns))) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    return tracker


def _both_shut(shutdowns: list[tuple[int, int]]) -> bool:
    """Reasoned independently: the directions (sender -> receiver) each SHUTDOWN shuts."""
    shut: set[tuple[int, int]] = set()
    for side, flags in shutdowns:
        if flags & SEND:
            shut.add((side, 1 - side))
        if flags & RCV:
            shut.add((1 - side, side))
    return len(shut) == 2


CASES = [
    [(0, RCV | SEND)], [(1, RCV | SEND)],          # Linux close() from either side
    [(0, SEND)], [(1, SEND)], [(0, RCV)], [(1, RCV)], [(0, 0)], [(1, 0)],  # one direction
    [(0, SEND), (1, SEND)],                        # each side shuts its own sending
    [(0, RCV), (1, RCV)],                          # each side shuts its own receiving
    [(0, SEND), (0, RCV)], [(1, SEND), (1, RCV)],  # one side, in two SHUTDOWNs
    [(0, RCV), (1, SEND)],                         # the same direction twice: still one
    [(0, SEND), (1, RCV)],
]


@pytest.mark.parametrize("shutdowns", CASES, ids=lambda s: "-".join(f"{a}:{int(f)}" for a, f in s))
def test_a_connection_leaves_the_working_set_once_both_directions_are_shut(
        tmp_path: Path, shutdowns: list[tuple[int, int]]) -> None:
    tracker = _fed(tmp_path, shutdowns)
    closed = _both_shut(shutdowns)
    assert (tracker.spilled, tracker.working_set) == ((1, 0) if closed else (0, 1))
    assert len(tracker) == 1


def test_a_stall_open_in_a_capture_stamped_at_the_epoch_lasts_zero(tmp_path: Path) -> None:
    """Every frame at timestamp 0 (a capture stamped at the epoch): the client's write fills
    the server's 4 KiB buffer, no credit comes back, so the stall runs to the capture's end,
    which is 0 too (and so is an ``end_ns`` of 0 given to finish): it lasts 0 ns."""
    frames = [frame(Op.REQUEST, src=CLIENT, dst=SERVER),
              frame(Op.RESPONSE, src=SERVER, dst=CLIENT, buf_alloc=4096),
              frame(Op.RW, b"d" * 4096, src=CLIENT, dst=SERVER)]
    path = write(tmp_path / "epoch.pcap", [(0, f) for f in frames])
    tracker = ConnTracker()
    with CaptureReader(str(path)) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    assert tracker.end_ns == 0
    for end_ns in (None, 0):
        st = tracker.finish(end_ns)[0].client.stalls
        assert st.count == 1 and st.open
        assert (st.total_ns, st.max_ns) == (0, 0)


def _analysed(tmp_path: Path, frames: list[bytes], spill_at: int | None = None) -> ConnTracker:
    path = write(tmp_path / "c.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
    tracker = ConnTracker(spill_at=spill_at)
    with CaptureReader(str(path)) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    return tracker


def test_a_capture_without_control_packets_lists_no_events(tmp_path: Path) -> None:
    """Only RW and CREDIT_UPDATE frames (a capture started mid-connection): the tracker keeps
    no event at all, so the connection lists none (RW and CREDIT_UPDATE are counted only)."""
    frames = [frame(Op.RW, b"x" * 10, src=CLIENT, dst=SERVER),
              frame(Op.CREDIT_UPDATE, src=SERVER, dst=CLIENT, fwd_cnt=10)]
    conns = _analysed(tmp_path, frames).finish()
    assert len(conns) == 1
    assert conns[0].events == ()


@pytest.mark.parametrize("spill_at", [None, 1])
def test_event_fields_are_integers_as_json_writes_them(tmp_path: Path, spill_at: int | None
                                                       ) -> None:
    """An event's op (and every other field) is an int: JSON writes the wire's op codes,
    not floats. Expected: the op codes of the frames written, from the protocol enum."""
    ops = [Op.REQUEST, Op.RESPONSE, Op.SHUTDOWN, Op.RST]
    frames = [frame(Op.REQUEST, src=CLIENT, dst=SERVER), frame(Op.RESPONSE, src=SERVER, dst=CLIENT),
              frame(Op.SHUTDOWN, src=CLIENT, dst=SERVER, flags=RCV | SEND),
              frame(Op.RST, src=SERVER, dst=CLIENT)]
    events = _analysed(tmp_path, frames, spill_at).finish()[0].events
    assert json.dumps([e.op for e in events]) == json.dumps([int(op) for op in ops])
    assert all(type(v) is int for e in events for v in e)


@pytest.mark.parametrize("shutdowns", [[(0, SEND), (1, SEND)], [(1, RCV), (0, RCV)],
                                       [(0, SEND), (0, RCV)]],
                         ids=["send-send", "rcv-rcv", "one-side"])
def test_directions_shut_in_separate_batches_add_up(tmp_path: Path,
                                                    shutdowns: list[tuple[int, int]]) -> None:
    """A batch per frame: the first SHUTDOWN shuts one direction, the second (a batch
    later) the other one; together both are shut, so the connection is spilled after the
    second, not after the first."""
    tracker = ConnTracker(spill_at=1)
    held = []
    with CaptureReader(str(_shut_capture(tmp_path, shutdowns)), chunk=1) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
            held.append((tracker.spilled, tracker.working_set))
    assert held == [(0, 1), (0, 1), (0, 1), (1, 0)]


def _tags_per_batch(tmp_path: Path, stamped: list[tuple[int, bytes]]
                    ) -> tuple[ConnTracker, list]:
    """Feed ``(time, frame)`` one batch per frame; the tracker and each batch's tags."""
    path = write(tmp_path / "b.pcap", stamped)
    tracker = ConnTracker()
    with CaptureReader(str(path), chunk=1) as reader:
        tags = [tracker.feed(fb) for fb in decode_batches(reader.batches())]
    return tracker, tags


def test_frames_and_the_end_are_kept_over_every_batch(tmp_path: Path) -> None:
    """Five frames, one per batch, the last two stamped earlier than the third (a capture
    merged out of order): every frame is counted once (5, not the last batch's 1), and the
    capture ends at its latest time, T0 + 30, not at the last batch's."""
    times = [T0 + 10, T0 + 20, T0 + 30, T0 + 5, T0 + 6]
    frames = [frame(Op.REQUEST, src=CLIENT, dst=SERVER), frame(Op.RESPONSE, src=SERVER, dst=CLIENT),
              frame(Op.RW, b"abc", src=CLIENT, dst=SERVER),
              frame(Op.CREDIT_UPDATE, src=SERVER, dst=CLIENT, fwd_cnt=3),
              frame(Op.RST, src=CLIENT, dst=SERVER)]
    tracker, _ = _tags_per_batch(tmp_path, list(zip(times, frames, strict=True)))
    assert tracker.frames == 5
    assert tracker.end_ns == T0 + 30


def test_a_write_beyond_the_peers_buffer_is_tagged_beyond_credit(tmp_path: Path) -> None:
    """The server's RESPONSE advertises an 8-byte buffer (fwd_cnt 0); the client then sends
    10 bytes: 2 more than the credit it was given, so that RW (and only it) is tagged."""
    frames = [frame(Op.REQUEST, src=CLIENT, dst=SERVER),
              frame(Op.RESPONSE, src=SERVER, dst=CLIENT, buf_alloc=8),
              frame(Op.RW, b"x" * 10, src=CLIENT, dst=SERVER)]
    _, tags = _tags_per_batch(tmp_path, [(T0 + i, f) for i, f in enumerate(frames)])
    assert [bool(t.beyond[0]) for t in tags] == [False, False, True]


def test_a_row_without_a_virtio_header_has_no_stream_sender_or_credit(tmp_path: Path) -> None:
    """A 10-byte frame too short for the headers, between two frames of a connection: Tags'
    contract gives it stream and sender -1, in-flight and limit -1 on both sides, and no
    beyond-credit mark; ``beyond`` is a boolean mask, usable to pick rows."""
    frames = [frame(Op.REQUEST, src=CLIENT, dst=SERVER), b"\x00" * 10,
              frame(Op.RESPONSE, src=SERVER, dst=CLIENT)]
    path = write(tmp_path / "h.pcap", [(T0 + i, f) for i, f in enumerate(frames)])
    tracker = ConnTracker()
    with CaptureReader(str(path)) as reader:
        (tags,) = [tracker.feed(fb) for fb in decode_batches(reader.batches())]
    assert (tags.stream[1], tags.sender[1]) == (-1, -1)
    assert tags.in_flight[1].tolist() == [-1, -1] and tags.limit[1].tolist() == [-1, -1]
    assert tags.beyond.dtype == bool and not tags.beyond.any()
    assert tags.stream[[0, 2]].tolist() == [0, 0]  # the connection's rows do have a stream


def test_a_stall_open_at_the_end_of_a_batch_is_kept_for_each_connection(tmp_path: Path
                                                                         ) -> None:
    """Two connections in one batch. Stream 0's client fills the server's 4 KiB buffer with
    one 4096-byte RW (frame 5) and no credit ever comes back: a stall open from there to the
    capture's end. Stream 1 then exchanges two short messages, each consumed at once: never
    a stall. Expected, reasoned from the frames: stream 0 one stall lasting from frame 5 to
    the last frame, stream 1 none."""
    out: list[tuple[int, bytes]] = []
    a = Conv(out, client=(3, 50000), server=(2, 1234), buf=[262144, 4096])
    b = Conv(out, client=(3, 50001), server=(2, 1234))
    a.open()
    b.open()
    a.send(0, Op.RW, b"d" * 4096)
    b.data(0, b"hi")
    b.data(0, b"yo")
    rec = {r["stream"]: r for r in _analysed_stamped(tmp_path, out).finish().records()}
    assert (rec[0]["credit_stalls"], rec[1]["credit_stalls"]) == (1, 0)
    assert rec[0]["stall_time"] == (out[-1][0] - out[4][0]) / 1e9
    assert rec[1]["stall_time"] == 0


def _analysed_stamped(tmp_path: Path, stamped: list[tuple[int, bytes]]) -> ConnTracker:
    path = write(tmp_path / "s.pcap", stamped)
    tracker = ConnTracker()
    with CaptureReader(str(path)) as reader:
        for fb in decode_batches(reader.batches()):
            tracker.feed(fb)
    return tracker
