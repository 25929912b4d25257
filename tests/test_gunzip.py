"""Gunzipping captures (vsockmon/wire/gunzip.py): the bytes equal the standard library's
gzip.decompress for every member layout and read size, damage is raised where it is
reached, and the read-ahead thread stays bounded and stops when the reader closes."""

from __future__ import annotations

import gzip
import io
import random
import threading
import zlib
from pathlib import Path
from typing import BinaryIO, cast

import pytest
from click.testing import CliRunner

from vsockmon.cli import main
from vsockmon.wire import gunzip, pcapio
from vsockmon.wire.gunzip import Gunzip, ReadAhead
from vsockmon.wire.pcapio import CaptureError, CaptureReader

ROOT = Path(__file__).resolve().parent.parent
PCAP = ROOT / "fixtures" / "synthetic" / "stream-all-ops.pcap"


def _data(seed: int, size: int) -> bytes:
    """Bytes that compress somewhat (so a member spans several compressed reads)."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(1, 12)) for _ in range(64)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def _read_all(reader: Gunzip | ReadAhead, rng: random.Random) -> bytes:
    parts = []
    while True:
        n = rng.choice([1, 7, 4096, 1 << 16, 3 << 20])
        chunk = reader.read(n)
        assert len(chunk) <= n
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


LAYOUTS = {
    "one member": lambda a, b: gzip.compress(a + b),
    "two members": lambda a, b: gzip.compress(a) + gzip.compress(b),
    "padding between and after": lambda a, b: (gzip.compress(a) + bytes(300)
                                              + gzip.compress(b) + bytes(5)),
    "an empty member": lambda a, b: gzip.compress(a) + gzip.compress(b"") + gzip.compress(b),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_gunzip_gives_what_gzip_decompress_gives(layout: str, seed: int,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gunzip, "COMPRESSED_CHUNK", 997)  # members span many reads
    a, b = _data(seed, 200_000), _data(seed + 10, 3_000)
    raw = LAYOUTS[layout](a, b)
    assert gzip.decompress(raw) == a + b  # the layout is one the standard library reads
    assert _read_all(Gunzip(io.BytesIO(raw)), random.Random(seed)) == a + b


def test_gunzip_never_returns_more_than_asked() -> None:
    """A bomb (64 MiB of zeros in 64 KiB) comes out in pieces of the size asked for."""
    raw = gzip.compress(bytes(64 << 20))
    assert len(raw) < 1 << 17
    g = Gunzip(io.BytesIO(raw))
    sizes = []
    while piece := g.read(1 << 20):
        sizes.append(len(piece))
    assert sizes == [1 << 20] * 64


def test_gunzip_raises_damage_after_the_whole_data_before_it() -> None:
    a = _data(1, 50_000)
    good = gzip.compress(a)
    damaged = bytearray(good + gzip.compress(_data(2, 50_000)))
    damaged[len(good) + 30: len(good) + 60] = b"\xff" * 30
    g = Gunzip(io.BytesIO(bytes(damaged)))
    assert g.read(len(a)) == a
    with pytest.raises(zlib.error):
        g.read(1 << 20)
    cut = gzip.compress(a)[:-6]  # the trailer's CRC and length cut off
    with pytest.raises(EOFError, match="end-of-stream"):
        Gunzip(io.BytesIO(cut)).read(1 << 20)
    with pytest.raises(zlib.error):  # not padding, not a member: garbage after the data
        Gunzip(io.BytesIO(good + b"junk")).read(1 << 20)
    with pytest.raises(zlib.error):  # a CRC that does not match the data
        bad_crc = bytearray(good)
        bad_crc[-8] ^= 1
        Gunzip(io.BytesIO(bytes(bad_crc))).read(1 << 20)


class _Counted(io.BytesIO):
    """A source that counts its reads and can fail at one of them."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        super().__init__(data)
        self.reads = 0
        self.fail_at = fail_at

    def read(self, n: int | None = -1) -> bytes:
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError(5, "Input/output error")
        return super().read(n)


@pytest.mark.parametrize("seed", range(3))
def test_read_ahead_gives_the_source_bytes_in_order(seed: int) -> None:
    data = _data(seed, 1_000_000)
    ahead = ReadAhead(cast(BinaryIO, io.BytesIO(data)), 65_536)
    assert _read_all(ahead, random.Random(seed)) == data
    assert ahead.read(10) == b""
    ahead.close()


def test_read_ahead_raises_the_source_error_where_it_comes() -> None:
    data = _data(4, 100_000)
    ahead = ReadAhead(cast(BinaryIO, _Counted(data, fail_at=3)), 10_000)
    assert ahead.read(10_000) + ahead.read(10_000) == data[:20_000]
    with pytest.raises(OSError, match="Input/output"):
        ahead.read(10_000)
    assert ahead.read(10_000) == b""
    ahead.close()


def test_read_ahead_stays_bounded_and_stops_on_close() -> None:
    source = _Counted(_data(5, 1_000_000))
    ahead = ReadAhead(cast(BinaryIO, source), 1000)
    assert len(ahead.read(1000)) == 1000
    # the thread runs ahead until DEPTH chunks wait: one taken, DEPTH waiting, one in hand
    for _ in range(200):
        if source.reads >= gunzip.DEPTH + 2:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.1)
    assert source.reads == gunzip.DEPTH + 2
    ahead.close()
    assert source.closed
    assert not any(t.name == "read-ahead" for t in threading.enumerate())
    assert source.reads <= gunzip.DEPTH + 3


def test_only_a_gzipped_regular_file_is_read_ahead(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[ReadAhead] = []

    class Seen(ReadAhead):
        def __init__(self, source: BinaryIO, chunk: int) -> None:
            super().__init__(source, chunk)
            made.append(self)

    monkeypatch.setattr(pcapio, "ReadAhead", Seen)
    plain = PCAP.read_bytes()
    gz = tmp_path / "c.pcap.gz"
    gz.write_bytes(gzip.compress(plain))
    (tmp_path / "c.pcap").write_bytes(plain)
    for path, ahead in ((str(gz), 1), (str(tmp_path / "c.pcap"), 0),
                        (io.BytesIO(gz.read_bytes()), 0)):
        with CaptureReader(path) as r:
            rows = [rec[1:] for rec in r.records()]
        assert len(made) == ahead
        assert rows == [rec[1:] for rec in CaptureReader(str(tmp_path / "c.pcap")).records()]
        made.clear()
    assert not any(t.name == "read-ahead" for t in threading.enumerate())  # closed: gone


def test_a_damaged_gzipped_file_is_one_line_from_the_cli(tmp_path: Path) -> None:
    raw = bytearray(gzip.compress(PCAP.read_bytes()))
    raw[20:40] = b"\xff" * 20
    bad = tmp_path / "bad.pcap.gz"
    bad.write_bytes(bytes(raw))
    with pytest.raises(CaptureError, match="read error"), CaptureReader(str(bad)) as r:
        list(r.records())
    run = CliRunner().invoke(main, ["conns", str(bad)])
    assert run.exit_code == 1
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"Error: {bad}: read error: ") and "decompressing" in line
