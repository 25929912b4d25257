"""The compiled ring-block reader (vsockmon/live/_ring.c): its records are byte for byte
pcapio's, its index and op counts match the frames, and no bytes at all make it crash or
read outside the block. The blocks are laid out here as the kernel lays them out
(include/uapi/linux/if_packet.h, net/packet/af_packet.c: prb_fill_curr_block)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import frame
from vsockmon.live import _ring
from vsockmon.live.capture import _HDRS_LEN, _OP_OFFSET, PCAP, PCAPNG, LiveBatch, LiveFrame
from vsockmon.wire.pcapio import PcapngWriter, PcapWriter
from vsockmon.wire.protocol import Op

BLOCK_DESC = 48  # tpacket_block_desc with tpacket_hdr_v1, 8-aligned
TP_MAC = 48 + 20  # TPACKET3_HDRLEN (tpacket3_hdr aligned to 16, + sockaddr_ll) as tp_mac
ALIGN = 16  # TPACKET_ALIGNMENT


def block_of(frames: list[tuple[int, bytes, int]], size: int = 1 << 16) -> bytearray:
    """A retired TPACKET_V3 block holding ``(ts_ns, data, orig_len)`` frames."""
    blk = bytearray(size)
    pos = BLOCK_DESC
    struct.pack_into("=III", blk, 8, 1, len(frames), BLOCK_DESC)  # TP_STATUS_USER
    for i, (ts, data, orig) in enumerate(frames):
        step = -(-(TP_MAC + len(data)) // ALIGN) * ALIGN
        nxt = step if i + 1 < len(frames) else 0  # the kernel zeroes the last one's
        sec, nsec = divmod(ts, 1_000_000_000)
        struct.pack_into("=IIIIIIHH", blk, pos, nxt, sec, nsec, len(data), orig, 1, TP_MAC,
                         TP_MAC)
        blk[pos + TP_MAC:pos + TP_MAC + len(data)] = data
        pos += step
    return blk


def _frames(n: int) -> list[tuple[int, bytes, int]]:
    ops = [Op.RW, Op.CREDIT_UPDATE, Op.REQUEST, Op.RST]
    out = [(1_700_000_000_000_000_000 + 999_999_999 * i,
            frame(ops[i % 4], b"p" * (i * 7 % 300)), 76 + i * 7 % 300 + i % 2) for i in range(n)]
    out.append((5, b"short", 5))  # shorter than the headers: no op
    return out


def _batch(blk: bytearray | bytes, fmt: int, limit: int = -1) -> LiveBatch:
    heads, index, ops, count, nbytes, damaged = _ring.block(blk, fmt, limit, _OP_OFFSET,
                                                            _HDRS_LEN)
    assert not damaged
    return LiveBatch(fmt, heads, index, blk, count, nbytes, ops)


def _written(batch: LiveBatch, tmp_path: Path, first: int = 0, last: int | None = None
             ) -> bytes:
    with open(tmp_path / "out", "wb") as fp:
        batch.write_to(fp.fileno(), first, last)
    return (tmp_path / "out").read_bytes()


def _pcapio(writer: type[PcapWriter], frames: list[tuple[int, bytes, int]]) -> bytes:
    return b"".join(b"".join(writer.record_parts(ts, d, o)) for ts, d, o in frames)


@pytest.mark.parametrize(("fmt", "writer"), [(PCAP, PcapWriter), (PCAPNG, PcapngWriter)])
def test_records_index_and_ops_match_pcapio(fmt: int, writer: type[PcapWriter],
                                            tmp_path: Path) -> None:
    frames = _frames(1200)  # more than IOV_MAX pieces: several writev calls
    batch = _batch(block_of(frames, size=1 << 19), fmt)
    assert batch.count == len(frames)
    assert _written(batch, tmp_path) == _pcapio(writer, frames)
    assert _written(batch, tmp_path, 5, 9) == _pcapio(writer, frames[5:9])
    assert batch.nbytes == sum(len(d) for _t, d, _o in frames)
    assert batch.ops == {Op.RW: 300, Op.CREDIT_UPDATE: 300, Op.REQUEST: 300, Op.RST: 300}
    assert [(f.ts_ns, bytes(f.data), f.orig_len) for f in batch] == frames
    ends = list(batch.record_ends())
    assert ends[-1] == len(_pcapio(writer, frames)) and ends == sorted(ends)


def test_limit_takes_the_first_frames(tmp_path: Path) -> None:
    frames = _frames(10)
    batch = _batch(block_of(frames), PCAP, 3)
    assert batch.count == 3 and len(batch.index) == 3 * 40
    assert _written(batch, tmp_path) == _pcapio(PcapWriter, frames[:3])
    assert sum(batch.ops.values()) == 3


def test_writev_refuses_an_index_outside_its_buffers(tmp_path: Path) -> None:
    batch = _batch(block_of(_frames(5)), PCAPNG)
    with open(tmp_path / "out", "wb") as fp:
        for heads, source, first, last in ((batch.heads[:-1], batch.source, 0, 6),
                                           (batch.heads, batch.source[:200], 0, 6),
                                           (batch.heads, batch.source, 0, 7),
                                           (batch.heads, batch.source, 4, 3)):
            with pytest.raises(ValueError):
                _ring.writev(fp.fileno(), PCAPNG, heads, source, batch.index, first, last)
    assert (tmp_path / "out").read_bytes() == b""
    with pytest.raises(BrokenPipeError):  # as os.writev reports it: the sink's OutputClosed
        r, w = os.pipe()
        os.close(r)
        try:
            batch.write_to(w)
        finally:
            os.close(w)


def test_an_empty_block_and_large_op_values() -> None:
    assert _ring.block(block_of([]), PCAPNG, -1, _OP_OFFSET, _HDRS_LEN)[3] == 0
    odd = bytearray(frame(Op.RW))
    struct.pack_into("<H", odd, _OP_OFFSET, 4242)
    assert _ring.block(block_of([(0, bytes(odd), 76)] * 2), PCAP, -1, _OP_OFFSET,
                       _HDRS_LEN)[2] == {4242: 2}


def test_the_python_framing_agrees_with_the_compiled_one(tmp_path: Path) -> None:
    """``LiveBatch.of_frames`` (the recvmsg path) and ``_ring.block`` make the same batch."""
    frames = _frames(50)
    for fmt in (PCAP, PCAPNG):
        ours = _batch(block_of(frames), fmt)
        theirs = LiveBatch.of_frames((LiveFrame(*f) for f in frames), fmt)
        assert (ours.heads, ours.ops, ours.count, ours.nbytes) == (
            theirs.heads, theirs.ops, theirs.count, theirs.nbytes)
        assert list(ours) == list(theirs)
        assert list(ours.record_ends()) == list(theirs.record_ends())
        assert _written(ours, tmp_path) == _written(theirs, tmp_path)


def _check_bounded(buf: bytes | bytearray) -> None:
    for fmt in (PCAP, PCAPNG):
        heads, index, _ops, count, nbytes, _d = _ring.block(buf, fmt, -1, _OP_OFFSET,
                                                           _HDRS_LEN)
        # frames never overlap: their data fit in the block once
        assert nbytes <= len(buf) and len(index) == 40 * count
        assert len(heads) <= 35 * count
        with open("/dev/null", "wb") as fp:  # and what was found can be written
            _ring.writev(fp.fileno(), fmt, heads, buf, index, 0, count)


def test_damage_is_reported_never_read_past() -> None:
    frames = _frames(20)
    good = block_of(frames, size=8192)
    cases = {
        "count beyond the frames": struct.pack("=I", 1000),
        "first frame outside": struct.pack("=II", 20, 10**9),
    }
    for why, patch in cases.items():
        blk = bytearray(good)
        blk[12:12 + len(patch)] = patch
        *_x, count, _n, damaged = _ring.block(blk, PCAP, -1, _OP_OFFSET, _HDRS_LEN)
        assert damaged, why
        assert count == (len(frames) if why.startswith("count") else 0)
    blk = bytearray(good)
    struct.pack_into("=I", blk, BLOCK_DESC, 8)  # the first frame's next points into its data
    *_x, count, _n, damaged = _ring.block(blk, PCAP, -1, _OP_OFFSET, _HDRS_LEN)
    assert damaged and count == 1
    blk = bytearray(good)
    struct.pack_into("=I", blk, BLOCK_DESC + 12, 1 << 20)  # a snap length past the block
    assert _ring.block(blk, PCAP, -1, _OP_OFFSET, _HDRS_LEN)[3:] == (0, 0, True)
    for size in range(0, 30):  # too short for a block header
        assert _ring.block(bytes(size), PCAP, -1, _OP_OFFSET, _HDRS_LEN)[3] == 0
    with pytest.raises(ValueError):
        _ring.block(good, 2, -1, _OP_OFFSET, _HDRS_LEN)
    with pytest.raises(ValueError):
        _ring.block(good, PCAP, -1, _OP_OFFSET, _OP_OFFSET + 1)


def test_any_bytes_are_safe() -> None:
    rng = random.Random(17)
    good = block_of(_frames(40), size=16384)
    for _ in range(3000):
        blk = bytearray(good)
        for _ in range(rng.randint(1, 12)):  # damage a few words, often in the headers
            at = rng.randrange(0, 200) if rng.random() < 0.5 else rng.randrange(len(blk) - 4)
            blk[at:at + 4] = rng.randbytes(4)
        _check_bounded(blk)
    for _ in range(300):
        _check_bounded(rng.randbytes(rng.randrange(0, 4096)))


def test_the_extension_compiles_without_a_warning(tmp_path: Path) -> None:
    """What ``pip install -e .`` builds on a fresh machine, with every warning an error."""
    src = Path(_ring.__file__).with_name("_ring.c")
    done = subprocess.run(
        ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
         f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(tmp_path / "r.so")],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sys.modules["vsockmon.live._ring"] is _ring


@pytest.mark.parametrize(("fmt", "writer"), [(PCAP, PcapWriter), (PCAPNG, PcapngWriter)])
def test_long_frames_are_written_from_the_ring_as_well(fmt: int, writer: type[PcapWriter],
                                                       tmp_path: Path) -> None:
    """Frames past the copy threshold go out as their own pieces, between gathered runs."""
    sizes = [10, 5000, 2047, 2048, 2049, 65536, 1, 65536, 3]
    frames = [(i, frame(Op.RW, bytes([i]) * n), 76 + n) for i, n in enumerate(sizes)]
    batch = _batch(block_of(frames, size=1 << 19), fmt)
    assert _written(batch, tmp_path) == _pcapio(writer, frames)
    assert _written(batch, tmp_path, 1, 6) == _pcapio(writer, frames[1:6])
