"""Reassembly of a connection's bytes from its RW packets: STREAM runs, SEQPACKET messages
(EOM ends one, EOR marks a record), bytes a snap length cut, and the text view."""

from __future__ import annotations

import numpy as np

from vsockmon.analysis.reassembly import (
    Chunk,
    chunks,
    direction_bytes,
    printable,
    segments,
)
from vsockmon.wire.protocol import Op, SeqFlag

EOM, EOR = SeqFlag.EOM, SeqFlag.EOR


def test_chunks_keep_rw_only_and_count_what_the_capture_missed() -> None:
    cols = {"frame": np.array([1, 2, 3]), "sender": np.array([0, 1, 0]),
            "op": np.array([Op.REQUEST, Op.RW, Op.RW]), "len": np.array([0, 5, 10]),
            "flags": np.array([0, EOM, 0])}
    got = chunks(cols, [b"", b"hello", b"abcd"])  # frame 3: 4 of its 10 bytes captured
    assert got == [Chunk(2, 1, b"hello", 0, EOM), Chunk(3, 0, b"abcd", 6, 0)]


def test_stream_runs_follow_the_sender() -> None:
    parts = [Chunk(1, 0, b"a", 0, 0), Chunk(2, 0, b"b", 1, 0), Chunk(3, 1, b"c", 0, 0),
             Chunk(4, 0, b"d", 0, 0)]
    segs = segments(parts, seqpacket=False)
    assert [(s.sender, s.frames, bytes(s.data), s.missing) for s in segs] == [
        (0, [1, 2], b"ab", 1), (1, [3], b"c", 0), (0, [4], b"d", 0)]
    assert not any(s.complete for s in segs)


def test_seqpacket_messages_end_at_eom_and_may_interleave() -> None:
    parts = [Chunk(1, 0, b"he", 0, 0), Chunk(2, 1, b"ok", 0, EOM | EOR),
             Chunk(3, 0, b"llo", 0, EOM), Chunk(4, 0, b"tail", 0, 0)]
    segs = segments(parts, seqpacket=True)
    assert [(s.sender, s.frames, bytes(s.data), s.complete, s.eor) for s in segs] == [
        (1, [2], b"ok", True, True), (0, [1, 3], b"hello", True, False),
        (0, [4], b"tail", False, False)]  # the capture ended inside the last message
    assert (parts[1].eom, parts[1].eor, parts[2].eor, parts[0].eom) == (True, True, False,
                                                                        False)


def test_direction_bytes_and_missing() -> None:
    parts = [Chunk(1, 0, b"ab", 3, 0), Chunk(2, 1, b"x", 0, 0), Chunk(3, 0, b"c", 1, 0)]
    assert direction_bytes(parts, 0) == (b"abc", 4)
    assert direction_bytes(parts, 1) == (b"x", 0)


def test_printable_escapes_all_but_printable_ascii_tab_and_newline() -> None:
    assert printable(b"a ~\t\n") == "a ~\t\n"
    assert printable(bytes([31, 127, 13, 0, 255])) == "\\x1f\\x7f\\x0d\\x00\\xff"


def test_a_run_counts_the_missing_bytes_of_every_chunk() -> None:
    """Two chunks of one sender, 3 and 4 bytes cut by the snap length: 7 missing."""
    parts = [Chunk(1, 0, b"a", 3, 0), Chunk(2, 0, b"b", 4, 0)]
    (run,) = segments(parts, seqpacket=False)
    assert run.missing == 7
    (msg,) = segments([Chunk(1, 0, b"a", 3, 0), Chunk(2, 0, b"b", 4, EOM)], seqpacket=True)
    assert (msg.missing, msg.complete) == (7, True)
