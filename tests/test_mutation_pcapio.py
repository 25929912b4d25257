"""pcap and pcapng reading at the edges the format allows: every timestamp resolution
(``if_tsresol`` absent = 10^-6, powers of 10 and of 2), several interfaces and sections, both
byte orders, record-length bounds, and the exact one-line messages.

The files are built here byte by byte from the pcapng specification (draft-ietf-opsawg-pcapng)
and the pcap file format, not with our writers; expected timestamps are computed in the test
(ticks x 10^9 / resolution, floored). The writers are checked against tshark.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import T0, frame

from vsockmon.wire.pcapio import (
    MAX_RECORD,
    CaptureError,
    CaptureReader,
    PcapngWriter,
    PcapWriter,
    linktype_label,
    open_capture,
    writer_for,
)
from vsockmon.wire.protocol import Op

PKT = frame(Op.RW, b"hello")
LINKTYPE = 271


def option(code: int, value: bytes, e: str = "<") -> bytes:
    return struct.pack(e + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def block(btype: int, body: bytes, e: str = "<") -> bytes:
    n = 12 + len(body)
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def shb(e: str = "<") -> bytes:
    return block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1), e)


def idb(options: bytes = b"", linktype: int = LINKTYPE, e: str = "<") -> bytes:
    return block(1, struct.pack(e + "HHI", linktype, 0, 262144) + options, e)


def epb(ticks: int, data: bytes = PKT, iface: int = 0, e: str = "<") -> bytes:
    body = struct.pack(e + "IIIII", iface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data))
    return block(6, body + data + b"\0" * (-len(data) % 4), e)


def read(tmp_path: Path, raw: bytes) -> tuple[list[int], CaptureReader]:
    path = tmp_path / "t.pcapng"
    path.write_bytes(raw)
    with open_capture(str(path)) as r:
        stamps = [rec.ts_ns for rec in r.records()]
    return stamps, r


TICKS = 1_700_000_000_123_456_789  # fits 64 bits in every resolution below
SECONDS = 1_700_000_123


RESOLUTIONS = [
    (None, 1_700_000_000_123_456, 1_700_000_000_123_456_000),    # absent: microseconds
    (bytes([6]), 1_700_000_000_123_456, 1_700_000_000_123_456_000),
    (bytes([0]), SECONDS, SECONDS * 10**9),                        # seconds
    (bytes([3]), 1_700_000_000_123, 1_700_000_000_123_000_000),   # milliseconds
    (bytes([9]), TICKS, TICKS),
    (bytes([10]), TICKS * 10 + 7, TICKS),                         # 10^-10: floored
    (bytes([12]), 10**18 + 123_456_789_999, 10**15 + 123_456_789),  # 10^-12, floored
    (bytes([0x80]), SECONDS, SECONDS * 10**9),                    # 2^0 = seconds
    (bytes([0x80 | 10]), SECONDS * 1024 + 512, SECONDS * 10**9 + 500_000_000),
    (bytes([0x80 | 20]), SECONDS * 2**20 + 1, SECONDS * 10**9 + 10**9 // 2**20),
    (bytes([0x80 | 30]), (SECONDS << 30) + (1 << 29), SECONDS * 10**9 + 500_000_000),
]
"""(``if_tsresol`` value or None, ticks, the time in ns): computed by hand, floored."""


@pytest.mark.parametrize(("tsresol", "ticks", "want_ns"), RESOLUTIONS)
def test_every_timestamp_resolution(tmp_path: Path, tsresol: bytes | None, ticks: int,
                                    want_ns: int) -> None:
    opts = option(9, tsresol) + option(0, b"") if tsresol is not None else b""
    stamps, r = read(tmp_path, shb() + idb(opts) + epb(ticks) + epb(ticks + 0))
    assert stamps == [want_ns, want_ns] and r.stopped is None and r.packets == 2


def test_resolution_after_other_options_and_not_after_the_end(tmp_path: Path) -> None:
    """Options are walked with their padding (a 9-byte name takes 12); an if_tsresol that
    follows opt_endofopt is not an option; one with no value is ignored."""
    after_name = option(2, b"vsockmon0") + option(9, bytes([9])) + option(0, b"")
    stamps, _ = read(tmp_path, shb() + idb(after_name) + epb(TICKS))
    assert stamps == [TICKS]
    past_end = option(0, b"") + option(9, bytes([9]))
    stamps, _ = read(tmp_path, shb() + idb(past_end) + epb(1_000_000))
    assert stamps == [1_000_000 * 1000]  # still the microsecond default
    empty = struct.pack("<HH", 9, 0) + option(0, b"")
    stamps, _ = read(tmp_path, shb() + idb(empty) + epb(1_000_000))
    assert stamps == [1_000_000 * 1000]


def test_each_interface_keeps_its_resolution(tmp_path: Path) -> None:
    raw = (shb() + idb(option(9, bytes([9]))) + idb() + idb(option(9, bytes([3])))
           + epb(5, iface=0) + epb(5, iface=1) + epb(5, iface=2))
    stamps, r = read(tmp_path, raw)
    assert stamps == [5, 5_000, 5_000_000] and r.linktype == LINKTYPE


def test_a_new_section_forgets_the_interfaces_of_the_last(tmp_path: Path) -> None:
    good = shb() + idb(option(9, bytes([9]))) + epb(7) + shb() + idb() + epb(7)
    stamps, r = read(tmp_path, good + epb(7, iface=1))
    assert stamps == [7, 7_000]
    assert r.stopped == f"packet on undeclared interface 1 after packet 2 (byte {len(good)})"


def test_big_endian_sections(tmp_path: Path) -> None:
    """A section's byte order is its own: a big-endian one after a little-endian one."""
    be = shb(">") + idb(option(9, bytes([9]), ">"), e=">") + epb(TICKS, e=">")
    stamps, r = read(tmp_path, be + shb() + idb() + epb(3))
    assert stamps == [TICKS, 3_000] and r.stopped is None


def test_big_endian_first_section_gives_the_link_type(tmp_path: Path) -> None:
    raw = shb(">") + idb(linktype=LINKTYPE, e=">") + epb(1, e=">")
    stamps, r = read(tmp_path, raw)
    assert r.linktype == LINKTYPE and r.format == "pcapng" and stamps == [1_000]


def test_blocks_the_reader_skips(tmp_path: Path) -> None:
    """Unknown block types (here a Name Resolution Block, type 4) are stepped over."""
    nrb = block(4, struct.pack("<HH", 0, 0))
    stamps, r = read(tmp_path, shb() + nrb + idb() + nrb + epb(2) + nrb + epb(3))
    assert stamps == [2_000, 3_000] and r.stopped is None


@pytest.mark.parametrize("length", [8, 30, MAX_RECORD + 4])
def test_impossible_block_lengths_are_corruption(tmp_path: Path, length: int) -> None:
    """A block is at least 12 bytes, a multiple of 4, and bounded (memory)."""
    bad = struct.pack("<II", 1, length) + b"\0" * 40
    path = tmp_path / "c.pcapng"
    good = shb() + idb() + epb(1)
    path.write_bytes(good + bad)
    with open_capture(str(path)) as r:
        assert len(list(r.records())) == 1
        assert r.stopped == (f"corrupt pcapng block (length {length}) after packet 1 "
                             f"(byte {len(good)})")


def test_pcapng_without_interface(tmp_path: Path) -> None:
    path = tmp_path / "n.pcapng"
    path.write_bytes(shb())
    with pytest.raises(CaptureError) as e:
        open_capture(str(path))
    assert str(e.value) == f"{path}: pcapng file without an interface description"


def test_first_block_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "n.pcapng"
    path.write_bytes(shb() + struct.pack("<II", 1, 13) + b"\0" * 20)
    with pytest.raises(CaptureError) as e:
        open_capture(str(path))
    where = f"after packet 0 (byte {len(shb())})"
    assert str(e.value) == f"{path}: corrupt pcapng file (corrupt pcapng block (length 13) {where})"


def pcap_header(magic: int = 0xA1B2C3D4, linktype: int = LINKTYPE, e: str = "<") -> bytes:
    return struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)


def test_pcap_microseconds_and_nanoseconds(tmp_path: Path) -> None:
    for magic, frac, want in ((0xA1B2C3D4, 999_999, 5 * 10**9 + 999_999_000),
                              (0xA1B23C4D, 999_999_999, 5 * 10**9 + 999_999_999)):
        path = tmp_path / "p.pcap"
        path.write_bytes(pcap_header(magic) + struct.pack("<IIII", 5, frac, len(PKT), 900)
                         + PKT)
        with open_capture(str(path)) as r:
            (rec,) = list(r.records())
        assert (rec.ts_ns, rec.orig_len, rec.data, rec.linktype) == (want, 900, PKT, LINKTYPE)


def test_pcap_link_type_keeps_only_its_low_28_bits(tmp_path: Path) -> None:
    """The top 4 bits of the pcap link-type word carry FCS information, not the type."""
    path = tmp_path / "p.pcap"
    path.write_bytes(pcap_header(linktype=0x10000000 | LINKTYPE))
    with open_capture(str(path)) as r:
        assert r.linktype == LINKTYPE and r.format == "pcap"


def test_record_length_bound_is_exact(tmp_path: Path) -> None:
    """A record may claim up to MAX_RECORD (16 MiB) bytes; one more is corruption."""
    assert MAX_RECORD == 16 * 1024 * 1024
    path = tmp_path / "p.pcap"
    path.write_bytes(pcap_header() + struct.pack("<IIII", 0, 0, MAX_RECORD + 1, 10) + b"x")
    with open_capture(str(path)) as r:
        assert list(r.records()) == []
        assert r.stopped == f"corrupt record (captured length {MAX_RECORD + 1}) after packet 0 " \
                            "(byte 24)"
    path.write_bytes(pcap_header() + struct.pack("<IIII", 0, 0, MAX_RECORD, 10) + b"x" * 5)
    with open_capture(str(path)) as r:
        assert list(r.records()) == []
        assert r.stopped == "file ends inside a packet after packet 0 (byte 24, 21 bytes left over)"


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file, not a capture"),
    (b"\xd4\xc3\xb2", "not a pcap or pcapng file (too short)"),
    (b"hello world", "not a pcap or pcapng file (magic 68656c6c)"),
    (struct.pack("<I", 0xA1B2C3D4) + b"\0" * 10, "truncated pcap file header"),
    (struct.pack(">I", 0xA1B23C4D) + b"\0" * 10, "truncated pcap file header"),
])
def test_bad_headers_in_one_exact_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(CaptureError) as e:
        open_capture(str(path))
    assert str(e.value) == f"{path}: {message}"


def test_wrong_link_type_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "eth.pcap"
    path.write_bytes(pcap_header(linktype=1))
    with pytest.raises(CaptureError) as e:
        open_capture(str(path))
    assert str(e.value) == f"{path}: link type 1 (Ethernet), expected 271 (VSOCK)"
    with open_capture(str(path), require_linktype=None) as r:
        assert r.linktype == 1
    with pytest.raises(CaptureError) as e:
        open_capture(str(path), require_linktype=4242)
    assert str(e.value) == f"{path}: link type 1 (Ethernet), expected 4242 (?)"
    assert linktype_label(4242) == "link type 4242"
    assert linktype_label(271) == "link type 271 (VSOCK)"


def test_missing_and_directory_messages(tmp_path: Path) -> None:
    with pytest.raises(CaptureError) as e:
        open_capture(str(tmp_path / "nope.pcap"))
    assert str(e.value) == f"{tmp_path / 'nope.pcap'}: no such file"
    with pytest.raises(CaptureError) as e:
        open_capture(str(tmp_path))
    assert str(e.value) == f"{tmp_path}: is a directory, not a capture file"


def test_a_file_object_is_read_from_where_it_stands(tmp_path: Path) -> None:
    path = tmp_path / "p.pcap"
    path.write_bytes(b"junk" + pcap_header() + struct.pack("<IIII", 1, 2, len(PKT), len(PKT))
                     + PKT)
    with open(path, "rb") as fp:
        fp.read(4)
        with CaptureReader(fp) as r:
            assert r.name == str(path)
            assert [(x.ts_ns, x.data) for x in r.records()] == [(1_000_002_000, PKT)]


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    cmd = ["tshark", "-r", str(path), "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines()]


@pytest.mark.parametrize("writer", [PcapWriter, PcapngWriter])
def test_writers_agree_with_tshark_to_the_nanosecond(tmp_path: Path, writer: type) -> None:
    path = tmp_path / ("w.pcapng" if writer is PcapngWriter else "w.pcap")
    stamps = [T0 + 1, T0 + 999_999_999, (T0 | 0xFFFFFFFF)]  # low 32-bit word all ones
    with open(path, "wb") as fp:
        w = writer(fp)
        for i, ts in enumerate(stamps):
            w.write(ts, PKT[: len(PKT) - i], orig_len=len(PKT) + 3 * i,
                    comment=f"c{i}" if i else None)
        w.flush()
    rows = tshark_fields(path, "frame.time_epoch", "frame.cap_len", "frame.len",
                         "frame.comment", "vsock.op")
    want_comments = ["", "c1", "c2"] if writer is PcapngWriter else ["", "", ""]
    assert rows == [[f"{ts // 10**9}.{ts % 10**9:09d}", str(len(PKT) - i), str(len(PKT) + 3 * i),
                     want_comments[i], "4"] for i, ts in enumerate(stamps)]
    head = path.read_bytes()[:24]
    if writer is PcapWriter:
        assert struct.unpack("<IHHiIII", head) == (0xA1B23C4D, 2, 4, 0, 0, 262144, LINKTYPE)


def test_writer_options(tmp_path: Path) -> None:
    """Link type, snap length and interface name land where tshark reads them."""
    path = tmp_path / "o.pcapng"
    with open(path, "wb") as fp:
        PcapngWriter(fp, snaplen=1000, ifname="tap9", app="probe").write(T0, PKT)
    rows = tshark_fields(path, "frame.interface_name", "frame.time_epoch")
    assert rows == [["tap9", f"{T0 // 10**9}.{T0 % 10**9:09d}"]]
    data = path.read_bytes()
    assert option(4, b"probe") in data  # shb_userappl
    assert struct.pack("<HHI", LINKTYPE, 0, 1000) in data  # IDB link type, reserved, snaplen
    pcap = tmp_path / "o.pcap"
    with open(pcap, "wb") as fp:
        PcapWriter(fp, linktype=1, snaplen=1500)
    assert struct.unpack("<IHHiIII", pcap.read_bytes()) == (0xA1B23C4D, 2, 4, 0, 0, 1500, 1)


@pytest.mark.parametrize(("name", "cls"), [
    ("a.pcapng", PcapngWriter), ("a.pcapng.gz", PcapngWriter), ("a.ntar", PcapngWriter),
    ("a.ntar.gz", PcapngWriter), ("a.pcap", PcapWriter), ("a.pcap.gz", PcapWriter),
    ("a.cap", PcapWriter), ("pcapng", PcapWriter),
])
def test_writer_for_every_extension(tmp_path: Path, name: str, cls: type) -> None:
    with open(tmp_path / "x", "wb") as fp:
        w = writer_for(name, fp, snaplen=77)
        assert type(w) is cls
    raw = (tmp_path / "x").read_bytes()
    if cls is PcapWriter:
        assert struct.unpack_from("<I", raw, 16)[0] == 77
    else:
        assert struct.pack("<HHI", LINKTYPE, 0, 77) in raw


@pytest.mark.parametrize("chunk", [4, 13, 1 << 20])
def test_interfaces_only_and_small_reads(tmp_path: Path, chunk: int) -> None:
    """A pcapng that ends right after its interface description (no options at all) has a
    link type and no packet, whatever the read size."""
    path = tmp_path / "i.pcapng"
    path.write_bytes(shb() + idb())
    with CaptureReader(str(path), chunk=chunk) as r:
        assert (r.format, r.linktype) == ("pcapng", LINKTYPE)
        assert list(r.records()) == [] and r.stopped is None
    path.write_bytes(shb() + block(4, b"\0" * 64) + idb(option(9, bytes([9]))) + epb(5))
    with CaptureReader(str(path), chunk=chunk) as r:
        assert [x.ts_ns for x in r.records()] == [5] and r.stopped is None


def test_option_padding_of_every_length_before_the_resolution(tmp_path: Path) -> None:
    """Values are padded to 4 bytes: 4, 8 and 16-byte values take no padding, 5 takes 3."""
    for value in (b"tap0", b"12345678", b"0123456789abcdef", b"five5"):
        opts = option(2, value) + option(9, bytes([9])) + option(0, b"")
        stamps, _ = read(tmp_path, shb() + idb(opts) + epb(TICKS))
        assert stamps == [TICKS], value


def test_link_types_and_snaplen_are_unsigned(tmp_path: Path) -> None:
    path = tmp_path / "l.pcapng"
    path.write_bytes(shb() + block(1, struct.pack("<HHI", 40000, 0, 0xFFFFFFFF)) + epb(1))
    with CaptureReader(str(path)) as r:
        assert r.linktype == 40000
        assert [x.linktype for x in r.records()] == [40000]


# -- interface statistics blocks (isb_endtime): when the capture stopped ------------------

def isb(ticks: int, options: bytes = b"", iface: int = 0, e: str = "<") -> bytes:
    """An interface statistics block (type 5): interface, timestamp high and low, options."""
    return block(5, struct.pack(e + "III", iface, ticks >> 32, ticks & 0xFFFFFFFF) + options, e)


def ts_value(ticks: int, e: str = "<") -> bytes:
    return struct.pack(e + "II", ticks >> 32, ticks & 0xFFFFFFFF)


def capture_end(tmp_path: Path, raw: bytes) -> int | None:
    _, r = read(tmp_path, raw)
    assert r.stopped is None
    return r.capture_end_ns


@pytest.mark.parametrize(("tsresol", "ticks", "want_ns"), RESOLUTIONS)
def test_statistics_block_time_in_every_resolution(tmp_path: Path, tsresol: bytes | None,
                                                   ticks: int, want_ns: int) -> None:
    """Without isb_endtime the block's own timestamp is the end, in its interface's units
    (the same table as the packets': the conversion must agree with theirs), as an int."""
    opts = option(9, tsresol) + option(0, b"") if tsresol is not None else b""
    end = capture_end(tmp_path, shb() + idb(opts) + epb(ticks) + isb(ticks))
    assert end == want_ns and type(end) is int


def test_statistics_block_time_beyond_int64_is_clamped(tmp_path: Path) -> None:
    # 2^64 - 1 ns is past 2262: clamped to the largest int64, like a packet's time
    assert capture_end(tmp_path, shb() + idb(option(9, bytes([9])))
                       + isb(2**64 - 1)) == 2**63 - 1


def test_isb_endtime_wins_after_options_of_every_padding(tmp_path: Path) -> None:
    """Options before isb_endtime are stepped over with their padding: comments of 5, 8
    and 16 bytes take 8, 8 and 16 (and an 8-byte comment is not a time)."""
    block_ticks, end_ticks = 1_000_000, (7 << 32) | 0x80000001  # a low word with bit 31
    opts = (option(1, b"five5") + option(1, b"12345678") + option(1, b"0123456789abcdef")
            + option(3, ts_value(end_ticks)) + option(0, b""))
    base = shb() + idb(option(9, bytes([9])))
    assert capture_end(tmp_path, base + isb(block_ticks, opts)) == end_ticks


def test_isb_options_that_are_not_an_endtime_leave_the_block_time(tmp_path: Path) -> None:
    base = shb() + idb(option(9, bytes([9])))
    ticks = (5 << 32) | 17  # a high word: the timestamp is both words
    # an 8-byte comment; isb_endtime of the wrong length; one after opt_endofopt
    for opts in (option(1, b"12345678"), option(1, b"12345678") + option(0, b""),
                 option(3, b"1234") + option(0, b""),
                 option(0, b"") + option(3, ts_value(99))):
        assert capture_end(tmp_path, base + isb(ticks, opts)) == ticks, opts


def test_isb_endtime_as_the_last_option_and_cut_short(tmp_path: Path) -> None:
    base = shb() + idb(option(9, bytes([9])))
    # the last option, no opt_endofopt: its 8 bytes end exactly where the block does
    assert capture_end(tmp_path, base + isb(1, option(3, ts_value(2**40 + 3)))) == 2**40 + 3
    # a block that holds only 4 of the 8 bytes the option announces: not read
    cut = struct.pack("<HH", 3, 8) + b"\xff" * 4
    assert capture_end(tmp_path, base + isb(1, cut)) == 1


def test_isb_option_longer_than_its_block_ends_the_options(tmp_path: Path) -> None:
    """A declared length past the block (0xFFFC, damage) ends the walk, never loops."""
    base = shb() + idb(option(9, bytes([9])))
    opts = struct.pack("<HH", 1, 0xFFFC) + option(3, ts_value(99))
    assert capture_end(tmp_path, base + isb(1, opts)) == 1


def test_statistics_blocks_of_undeclared_interfaces_are_ignored(tmp_path: Path) -> None:
    base = shb() + idb(option(9, bytes([9])))
    # interface 1 is the first undeclared one; 0xFFFFFFFF is one too (the field is unsigned)
    for iface in (1, 0xFFFFFFFF):
        assert capture_end(tmp_path, base + isb(5, iface=iface)) is None, iface
    assert capture_end(tmp_path, base + isb(5, iface=1) + isb(6)) == 6


def test_the_latest_statistics_block_is_the_end(tmp_path: Path) -> None:
    """Blocks need not come in time order: the end is the latest time any says."""
    base = shb() + idb(option(9, bytes([9]))) + idb()
    assert capture_end(tmp_path, base + isb(9) + isb(4)) == 9
    assert capture_end(tmp_path, base + isb(4) + isb(9)) == 9
    # interface 1 counts microseconds: 4 of its ticks are 4000 ns, later than 9 ns
    assert capture_end(tmp_path, base + isb(9) + isb(4, iface=1)) == 4000


def test_big_endian_statistics_block(tmp_path: Path) -> None:
    be = shb(">") + idb(option(9, bytes([9]), ">"), e=">")
    opts = option(3, ts_value(2**33 + 5, ">"), ">") + option(0, b"", ">")
    assert capture_end(tmp_path, be + isb(1, opts, e=">")) == 2**33 + 5


def test_written_statistics_block_is_read_back_to_the_nanosecond(tmp_path: Path) -> None:
    # a low word with bit 31 set: both words are unsigned
    end = (400_000_000 << 32) | 0x9000_0001
    assert capture_end(tmp_path, shb() + idb(option(9, bytes([9])))
                       + PcapngWriter.statistics_block(end)) == end


def test_pcapng_writer_defaults(tmp_path: Path) -> None:
    """By default: interface "vsockmon0" (if_name, option 2), application "vsockmon"
    (shb_userappl, option 4), snap length 262144, and a section of unknown length (-1)."""
    out = io.BytesIO()
    PcapngWriter(out).write(T0, PKT)
    data = out.getvalue()
    # 12 bytes of block frame, 16 of body, shb_userappl (4 + 8) and opt_endofopt (4)
    assert struct.unpack_from("<IIIHHq", data) == (0x0A0D0D0A, 44, 0x1A2B3C4D, 1, 0, -1)
    assert option(4, b"vsockmon") in data
    assert option(2, b"vsockmon0") + option(9, bytes([9])) in data
    assert struct.pack("<HHI", LINKTYPE, 0, 262144) in data


def test_writers_take_every_unsigned_value(tmp_path: Path) -> None:
    """Link types are u16 and snap lengths u32 in both formats; an option is as long as 65535
    bytes (its length is a u16)."""
    out = io.BytesIO()
    PcapngWriter(out, linktype=0xFFFF, snaplen=0xFFFFFFFF).write(T0, PKT, comment="c" * 40000)
    data = out.getvalue()
    assert struct.pack("<HHI", 0xFFFF, 0, 0xFFFFFFFF) in data
    assert struct.pack("<HH", 1, 40000) + b"c" * 40000 in data
    path = tmp_path / "u.pcapng"
    path.write_bytes(data)
    with CaptureReader(str(path)) as r:  # and it reads back
        assert [x.data for x in r.records()] == [PKT] and r.linktype == 0xFFFF


def test_an_idb_whose_last_option_is_the_resolution(tmp_path: Path) -> None:
    """No opt_endofopt: if_tsresol's 8 bytes end where the block's options do."""
    stamps, _ = read(tmp_path, shb() + idb(option(9, bytes([9]))) + epb(TICKS))
    assert stamps == [TICKS]


def test_a_statistics_block_too_short_to_hold_a_time_is_skipped(tmp_path: Path) -> None:
    """12 and 20-byte statistics blocks (no room for interface and timestamp) are stepped
    over, not called damage; a 24-byte one has exactly what it needs."""
    base = shb() + idb(option(9, bytes([9])))
    stamps, r = read(tmp_path, base + block(5, b"") + epb(3) + block(5, b"\0" * 8) + epb(4))
    assert stamps == [3, 4] and r.stopped is None and r.capture_end_ns is None


def test_a_control_block_of_exactly_the_largest_size_is_read(tmp_path: Path) -> None:
    """MAX_RECORD is the largest block accepted (an interface description padded with a
    long option), one more word is damage (test_impossible_block_lengths_are_corruption)."""
    left = MAX_RECORD - 12 - 8 - 8 - 4  # less the frame, IDB body, if_tsresol, the end
    fill = []
    while left:  # comments (option 1) of at most 65532 bytes, each 4 + its length
        size = min(left, 65536)
        fill.append(option(1, b"n" * (size - 4)))
        left -= size
    opts = b"".join(fill) + option(9, bytes([9])) + option(0, b"")
    big = idb(opts)
    assert len(big) == MAX_RECORD
    stamps, r = read(tmp_path, shb() + big + epb(TICKS))
    assert stamps == [TICKS] and r.stopped is None


def test_a_block_length_with_the_top_bit_set_is_named_unsigned(tmp_path: Path) -> None:
    good = shb() + idb() + epb(1)
    path = tmp_path / "t.pcapng"
    path.write_bytes(good + struct.pack("<II", 1, 0xFFFFFFFC) + b"\0" * 40)
    with open_capture(str(path)) as r:
        assert len(list(r.records())) == 1
        assert r.stopped == (f"corrupt pcapng block (length 4294967292) after packet 1 "
                             f"(byte {len(good)})")


def test_damaged_packet_blocks_are_named(tmp_path: Path) -> None:
    """A packet block of an impossible length, and one whose captured length does not fit
    in it: the first damage is named with the packets before it."""
    good = shb() + idb() + epb(1) + epb(2)
    bad_len = struct.pack("<II", 6, 30) + b"\0" * 40
    _, r = read(tmp_path, good + bad_len)
    assert r.stopped == f"corrupt pcapng block (length 30) after packet 2 (byte {len(good)})"
    body = struct.pack("<IIIII", 0, 0, 5, 1000, 1000) + PKT + b"\0" * (-len(PKT) % 4)
    too_long = block(6, body)  # claims 1000 captured bytes in a block that holds fewer
    _, r = read(tmp_path, good + too_long)
    assert r.stopped == (f"corrupt packet block (captured length 1000) after packet 2 "
                         f"(byte {len(good)})")
