"""The compiled engine: the C record walk on any bytes, pcapng time resolutions, and the bulk
line and JSON renderers equal to the per-frame reference on every fixture and odd frames."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from helpers import T0, frame

from vsockmon.decode import render
from vsockmon.decode.frames import FrameBatch, decode_batches
from vsockmon.payload import dissect_frame
from vsockmon.wire.pcapio import CaptureError, CaptureReader, PcapWriter, open_capture
from vsockmon.wire.protocol import MON_HDR_LEN, VSOCKMON_HEADER, Op, Transport

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = sorted(p for pattern in ("*.pcap", "*.pcapng", "*.pcap.gz")
                  for p in (ROOT / "fixtures").rglob(pattern) if p.name != "ethernet.pcap")


# -- pcapng: any if_tsresol ---------------------------------------------------------------


def _block(endian: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = 12 + len(body)
    return struct.pack(endian + "II", btype, n) + body + struct.pack(endian + "I", n)


def _pcapng(endian: str, tsresol: int | None, ticks: list[int], data: bytes) -> bytes:
    shb = _block(endian, 0x0A0D0D0A, struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1))
    opts = b""
    if tsresol is not None:
        opts = struct.pack(endian + "HH", 9, 1) + bytes([tsresol, 0, 0, 0])
    idb = _block(endian, 1, struct.pack(endian + "HHI", 271, 0, 0) + opts
                 + struct.pack(endian + "HH", 0, 0))
    epbs = b"".join(
        _block(endian, 6, struct.pack(endian + "IIIII", 0, t >> 32, t & 0xFFFFFFFF, len(data),
                                      len(data)) + data)
        for t in ticks)
    return shb + idb + epbs


def _expected_ns(ticks: int, tsresol: int | None) -> int:
    """The pcapng specification's arithmetic, in exact fractions: a tick is 10^-e seconds,
    or 2^-e with the high bit set; microseconds without the option."""
    code = 6 if tsresol is None else tsresol
    tick = Fraction(1, 2 ** (code & 0x7F)) if code & 0x80 else Fraction(1, 10 ** (code & 0x7F))
    return min(int(ticks * tick * 10**9), 2**63 - 1)


TICKS = [0, 1, 999, 1_700_000_000_123_456, 2**32 + 7, 2**63 + 12345, 2**64 - 1]


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("tsresol", [None, 0, 3, 6, 9, 10, 12, 19, 28, 29, 40, 127,
                                     0x80 | 0, 0x80 | 10, 0x80 | 30, 0x80 | 64, 0x80 | 127])
def test_pcapng_any_tsresol(tmp_path: Path, endian: str, tsresol: int | None) -> None:
    path = tmp_path / "t.pcapng"
    path.write_bytes(_pcapng(endian, tsresol, TICKS, frame(Op.RW, b"x")))
    with open_capture(str(path)) as r:
        stamps = [rec.ts_ns for rec in r.records()]
        assert r.stopped is None
    assert stamps == [_expected_ns(t, tsresol) for t in TICKS]


# -- the walk on any bytes ----------------------------------------------------------------


PCAP_SCALE = {struct.pack("<I", 0xA1B2C3D4): 1000, struct.pack("<I", 0xA1B23C4D): 1}


def _reference_pcap(raw: bytes) -> list[tuple[int, bytes, int]]:
    """Records of a little-endian pcap by the format's definition, up to the first record
    that does not fit or claims more than 16 MiB."""
    scale = PCAP_SCALE[raw[:4]]
    out, off = [], 24
    while off + 16 <= len(raw):
        sec, frac, cap, orig = struct.unpack_from("<IIII", raw, off)
        if cap > 16 << 20 or off + 16 + cap > len(raw):
            break
        out.append((sec * 10**9 + frac * scale, raw[off + 16 : off + 16 + cap], orig))
        off += 16 + cap
    return out


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    buf = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        what = rng.random()
        pos = rng.randrange(len(buf)) if buf else 0
        if what < 0.4 and buf:
            buf[pos] = rng.randrange(256)
        elif what < 0.6 and len(buf) > pos + 4:
            struct.pack_into("<I", buf, pos, rng.choice([0, 1, 11, 12, 13, 2**31, 2**32 - 1,
                                                         rng.randrange(2**32)]))
        elif what < 0.75:
            del buf[pos:]
        elif what < 0.9:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 64))
        else:
            del buf[pos : pos + rng.randint(1, 64)]
    return bytes(buf)


def _read_everything(path: Path, chunk: int) -> list[tuple[int, bytes, int]]:
    """Read, decode and render a capture the way the CLI does; only CaptureError may stop it."""
    out: list[tuple[int, bytes, int]] = []
    with CaptureReader(str(path), chunk=chunk) as r:
        for fb, batch in _decoded(r):
            assert all(o >= 0 and o + c <= len(batch.buf)
                       for o, c in zip(batch.offsets, batch.caplens, strict=True))
            idx = np.arange(len(fb))
            assert render.summary_lines(fb, idx, 0).count(b"\n") == len(fb)
            assert fb.json_text(idx).count(b"\n") == len(fb)
            out += [(t, batch.buf[o : o + c], g) for o, c, g, t in
                    zip(batch.offsets, batch.caplens, batch.orig_lens, batch.ts_ns, strict=True)]
    return out


def _decoded(reader: CaptureReader):  # type: ignore[no-untyped-def]
    from vsockmon.decode.frames import decode_batch

    first = 1
    for batch in reader.batches():
        yield decode_batch(batch, first), batch
        first += len(batch)


def test_thousands_of_mutated_and_random_files_never_crash(tmp_path: Path) -> None:
    rng = random.Random(12)
    seeds = [p.read_bytes() for p in FIXTURES if not p.name.endswith(".gz")]
    path = tmp_path / "fuzz.cap"
    stopped = compared = 0
    for i in range(3000):
        raw = (rng.randbytes(rng.randint(0, 600)) if i % 10 == 0
               else _mutate(rng, rng.choice(seeds)))
        if i % 10 == 1:  # a pcapng header then noise: the block walk
            raw = seeds[[s[:4] for s in seeds].index(b"\n\r\r\n")][:rng.randint(28, 200)] \
                + rng.randbytes(rng.randint(0, 400))
        path.write_bytes(raw)
        try:
            records = _read_everything(path, rng.choice([16, 64, 1000, 1 << 20]))
        except CaptureError:
            stopped += 1
            continue
        if raw[:4] in PCAP_SCALE and len(raw) >= 24:
            assert records == _reference_pcap(raw)
            compared += 1
    assert 100 < stopped < 3000 and compared > 500  # both outcomes were exercised


# -- bulk rendering equals the per-frame reference ----------------------------------------


def _reference_summary(f: object) -> str | None:
    """What ``decode`` printed after ``|`` per frame before the bulk path."""
    info = dissect_frame(f) if f.has_virtio and f.virtio["len"] else None  # type: ignore[attr-defined]
    if info is None or info.protocol == "text":
        return None
    return f"{info.protocol}: {info.summary}"


def _bulk_summary(payload: bytes, src_port: int, dst_port: int) -> str | None:
    from vsockmon.payload import dissect

    info = dissect(payload, src_port, dst_port)
    return None if info is None or info.protocol == "text" else f"{info.protocol}: {info.summary}"


def _assert_same(fbs: list[FrameBatch]) -> None:
    t0 = int(fbs[0].ts_ns[0])
    for fb in fbs:
        rng = np.random.default_rng(len(fb))
        for idx in (np.arange(len(fb)), np.sort(rng.choice(len(fb), len(fb) // 2 + 1))):
            lines = [render.summary_line(fb.frame(i), t0, _reference_summary(fb.frame(i)))
                     for i in idx.tolist()]
            assert render.summary_lines(fb, idx, t0, _bulk_summary).decode() == \
                "".join(line + "\n" for line in lines)
            assert fb.json_text(idx).decode().splitlines() == [
                json.dumps(fb.records(i, i + 1)[0], separators=(",", ":"), ensure_ascii=False)
                for i in idx.tolist()]


@pytest.mark.parametrize("path", FIXTURES, ids=[str(p.relative_to(ROOT)) for p in FIXTURES])
def test_bulk_lines_and_json_equal_the_per_frame_reference(path: Path) -> None:
    with open_capture(str(path)) as reader:
        fbs = list(decode_batches(reader.batches()))
    _assert_same(fbs)


def _odd_frames(rng: random.Random, n: int) -> list[tuple[int, bytes, int]]:
    """Frames of every kind the bulk path branches on, at times that test its rounding."""
    texts = [b"", b"hello", b'say "hi"\\n', b"tab\there\r\n", b"x" * 24, b"y" * 25,
             bytes(range(256)), "héllo".encode(), b"\x7f", b"READY=1\n", b'{"execute":"x"}',
             b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]
    out = []
    for _ in range(n):
        payload = rng.choice(texts) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 40))
        f = frame(Op(rng.randrange(8)), payload, src=(rng.choice([1, 2, 3, 2**64 - 1]),
                                                      rng.randrange(2**32)),
                  dst=(rng.randrange(2**64), rng.choice([1024, 5004, 9999])),
                  type_=rng.randrange(5), flags=rng.choice([0, 1, 2, 3, 4, 2**31, 7]),
                  buf_alloc=rng.randrange(2**32), fwd_cnt=rng.randrange(2**32),
                  length=rng.choice([None, None, 0, 3, 1000]))
        kind = rng.random()
        if kind < 0.1:
            f = f[: rng.randrange(len(f))]  # truncated, maybe below the vsockmon header
        elif kind < 0.2:  # another transport, or a wrong transport length
            mon = bytearray(f[:MON_HDR_LEN])
            names = VSOCKMON_HEADER.names
            at = VSOCKMON_HEADER.fields[names.index("transport")].offset
            struct.pack_into("<HH", mon, at, rng.choice([Transport.NO_INFO, 7, Transport.VIRTIO]),
                             rng.choice([0, 44, 50]))
            f = bytes(mon) + f[MON_HDR_LEN:]
        # times: ties at half a microsecond, exact binary ties (0.0078125 s), before the
        # first frame, far later than 2^50 ns
        ts = T0 + rng.choice([0, 500, 1500, 7_812_500, 123_456_789, -2500, -1,
                              2**50 + 500, 2**52 + 1, rng.randrange(10**12)])
        out.append((ts, f, len(f) + rng.choice([0, 0, 5])))
    return out


def test_bulk_rendering_of_odd_frames(tmp_path: Path) -> None:
    path = tmp_path / "odd.pcap"
    with open(path, "wb") as fp:
        w = PcapWriter(fp)
        w.write(T0, frame(Op.REQUEST))  # t0
        for ts, data, orig in _odd_frames(random.Random(7), 4000):
            w.write(ts, data, orig)
    with CaptureReader(str(path), chunk=20_000) as reader:
        fbs = list(decode_batches(reader.batches()))
    assert len(fbs) > 3
    _assert_same(fbs)


def test_a_batch_built_by_hand_without_link_types_decodes_as_vsock() -> None:
    """The live diagnose path appends packets to a RecordBatch and leaves out link types."""
    from vsockmon.decode.frames import decode_batch
    from vsockmon.wire.pcapio import RecordBatch

    frames = [frame(Op.REQUEST), frame(Op.RW, b"abc")]
    batch = RecordBatch(b"".join(frames))
    for i, f in enumerate(frames):
        batch.offsets.append(len(frames[0]) * i)
        batch.caplens.append(len(f))
        batch.orig_lens.append(len(f))
        batch.ts_ns.append(T0 + i)
    fb = decode_batch(batch, 1)
    assert fb.anomalies.tolist() == [0, 0]
    assert fb.virtio["op"].tolist() == [Op.REQUEST, Op.RW]
    assert fb.payload(1) == b"abc"


# -- the command's process -------------------------------------------------------------------

_THREADS = ("import os, vsockmon.cli, numpy; "
            "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: OpenBLAS starts no worker")
def test_the_cli_runs_numpy_without_blas_worker_threads() -> None:
    """numpy alone starts an OpenBLAS worker per further core (the check that this test can
    fail); once the CLI is loaded, only the main thread runs, and a value the user set wins."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    bare = "import os, numpy; print(len(os.listdir('/proc/self/task')))"
    alone = subprocess.run([sys.executable, "-c", bare], env=env, capture_output=True,
                           text=True, check=True).stdout.split()
    assert int(alone[0]) > 1
    out = subprocess.run([sys.executable, "-c", _THREADS], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["1", "1"]
    mine = subprocess.run([sys.executable, "-c", _THREADS],
                          env={**env, "OPENBLAS_NUM_THREADS": "2"}, capture_output=True,
                          text=True, check=True).stdout.split()
    assert mine == ["2", "2"]
