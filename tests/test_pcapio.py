"""Streaming capture reading and writing."""

from __future__ import annotations

import errno
import gzip
import io
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import T0, frame, write_pcap

from vsockmon.wire.pcapio import (
    CaptureError,
    CaptureReader,
    PcapngWriter,
    PcapWriter,
    create_output,
    is_stream,
    open_capture,
    open_file,
    writer_for,
)
from vsockmon.wire.protocol import Op

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "synthetic"


def frames(n: int) -> list[bytes]:
    return [frame(Op.RW, bytes([i % 256]) * (i % 300)) for i in range(n)]


@pytest.mark.parametrize("writer", [PcapWriter, PcapngWriter])
def test_write_then_read_keeps_every_byte_and_nanosecond(tmp_path: Path, writer: type) -> None:
    path = tmp_path / "x.cap"
    data = frames(500)
    with open(path, "wb") as fp:
        w = writer(fp)
        for i, f in enumerate(data):
            w.write(T0 + i * 7 + 1, f, comment="hello" if i % 2 else None)
    with open_capture(str(path)) as r:
        recs = list(r.records())
        assert r.stopped is None and r.packets == 500
    assert [x.data for x in recs] == data
    assert [x.ts_ns for x in recs] == [T0 + i * 7 + 1 for i in range(500)]


def test_small_chunks_and_big_records_read_the_same(tmp_path: Path) -> None:
    big = [frame(Op.RW, b"z" * 65536), *frames(50), frame(Op.RW, b"y" * 70000)]
    path = write_pcap(tmp_path / "big.pcap", big)
    with CaptureReader(str(path), chunk=100) as r:
        assert [x.data for x in r.records()] == big
    with CaptureReader(str(path), chunk=100) as r:
        batches = list(r.batches())
        assert len(batches) > 1 and max(len(b.buf) for b in batches) < 200_000


def test_microsecond_pcap_and_ns_pcapng_timestamps() -> None:
    with open_capture(str(FIXTURES / "stream-all-ops.pcap")) as r:
        first = next(r.records())
        assert first.ts_ns == 1_700_000_000_123_456_000
    with open_capture(str(FIXTURES / "seqpacket-ns.pcapng")) as r:
        stamps = [x.ts_ns for x in r.records()]
        assert stamps[:2] == [1_700_000_000_123_456_789, 1_700_000_000_123_456_912]
        assert r.format == "pcapng"


def test_big_endian_pcap(tmp_path: Path) -> None:
    f = frame(Op.REQUEST)
    raw = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 271)
    raw += struct.pack(">IIII", 5, 6, len(f), len(f)) + f
    (tmp_path / "be.pcap").write_bytes(raw)
    with open_capture(str(tmp_path / "be.pcap")) as r:
        rec = next(r.records())
    assert rec.ts_ns == 5_000_006_000 and rec.data == f


def test_gzip_and_stdin() -> None:
    plain = FIXTURES / "stream-all-ops.pcap"
    with open_capture(str(plain)) as r:
        want = [x.data for x in r.records()]
    with open_capture(str(FIXTURES / "stream-all-ops.pcap.gz")) as r:
        assert [x.data for x in r.records()] == want
    code = ("import sys; from vsockmon.wire.pcapio import open_capture\n"
            "r = open_capture('-'); print(sum(1 for _ in r.records()), r.stopped)")
    for data in (plain.read_bytes(), gzip.compress(plain.read_bytes())):
        out = subprocess.run([sys.executable, "-c", code], input=data, capture_output=True,
                             check=True)
        assert out.stdout.decode().split() == [str(len(want)), "None"]


def test_truncated_file_stops_at_last_whole_packet() -> None:
    with open_capture(str(FIXTURES / "truncated.pcap")) as r:
        n = sum(1 for _ in r.records())
        assert n == 12
        assert r.stopped is not None and "after packet 12" in r.stopped


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty file"),
    (b"hello world, this is text", "not a pcap or pcapng file"),
    (b"\xd4\xc3", "too short"),
    (struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1), "link type 1 (Ethernet), "
     "expected 271 (VSOCK)"),
])
def test_bad_files_get_one_clear_message(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(CaptureError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_capture(str(path))


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="no such file"):
        open_capture(str(tmp_path / "nope.pcap"))
    with pytest.raises(CaptureError, match="is a directory"):
        open_capture(str(tmp_path))


def test_corrupt_record_length_is_bounded(tmp_path: Path) -> None:
    raw = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 271)
    raw += struct.pack("<IIII", 0, 0, 0x7FFFFFFF, 10) + b"x" * 100
    (tmp_path / "c.pcap").write_bytes(raw)
    with open_capture(str(tmp_path / "c.pcap")) as r:
        assert list(r.records()) == []
        assert r.stopped and "corrupt record" in r.stopped


def test_pcapng_comment_visible_to_tshark(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    with open(path, "wb") as fp:
        w = writer_for(str(path), fp)
        w.write(T0, frame(Op.REQUEST), comment="stream 0: request")
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.comment",
                          "-e", "vsock.virtio.op"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "stream 0: request\t1"


def test_create_output_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "out.pcap"
    path.write_bytes(b"keep me")
    with pytest.raises(CaptureError, match="--force"):
        create_output(str(path), force=False)
    assert path.read_bytes() == b"keep me"
    create_output(str(path), force=True).close()
    assert path.read_bytes() == b""


def test_writer_for_picks_format_by_extension() -> None:
    assert isinstance(writer_for("a.pcapng", io.BytesIO()), PcapngWriter)
    assert isinstance(writer_for("a.pcap", io.BytesIO()), PcapWriter)


@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_pcapng_statistics_block_records_when_the_capture_stopped(tmp_path: Path,
                                                                   chunk: int) -> None:
    path = tmp_path / "end.pcapng"
    data = frames(20)
    end = T0 + 5_000_000_000  # five seconds of silence after the last packet
    with open(path, "wb") as fp:
        w = PcapngWriter(fp)
        for i, f in enumerate(data):
            w.write(T0 + i, f)
        fp.write(PcapngWriter.statistics_block(end))
    with CaptureReader(str(path), chunk=chunk) as r:
        assert r.capture_end_ns is None  # not read yet
        assert [x.data for x in r.records()] == data  # the block is not a packet
        assert r.stopped is None and r.capture_end_ns == end
    # tshark reads the block as interface 0's statistics: the same 20 packets, no complaint
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(i) for i in range(1, 21)]
    with open_capture(str(FIXTURES / "stream-all-ops.pcap")) as r:
        list(r.records())
        assert r.capture_end_ns is None  # classic pcap has no place for it


def test_statistics_block_of_a_microsecond_interface(tmp_path: Path) -> None:
    """Another writer's block: an interface without if_tsresol counts microseconds, and
    isb_endtime (option 3) wins over the block's own timestamp."""
    from vsockmon.wire.pcapio import _block, _options

    ticks, written = 1_795_000_000_123_456, 1_795_000_000_200_000

    def ts(t: int) -> bytes:
        return struct.pack("<II", t >> 32, t & 0xFFFFFFFF)
    blob = (_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + _options([]))
            + _block(1, struct.pack("<HHI", 271, 0, 0) + _options([]))
            + _block(5, struct.pack("<I", 0) + ts(written) + _options([(3, ts(ticks))])))
    path = tmp_path / "us.pcapng"
    path.write_bytes(blob)
    with open_capture(str(path)) as r:
        assert list(r.records()) == []
        assert r.capture_end_ns == ticks * 1000


def _pcap_with_corrupt_third_record() -> bytes:
    """Two whole records, then one claiming 0x7FFFFFFF captured bytes (found by fuzzing)."""
    out = io.BytesIO()
    w = PcapWriter(out)
    for i in range(2):
        w.write(T0 + i, frame(Op.RW, b"x" * 40))
    return out.getvalue() + struct.pack("<IIII", 0, 0, 0x7FFFFFFF, 10) + b"y" * 64


@pytest.mark.parametrize("chunk", [1 << 22, 64, 7])
def test_corrupt_record_names_the_same_packet_and_byte_whatever_the_chunk(chunk: int) -> None:
    # the bad record header follows the file header and two records (16-byte header each)
    byte = 24 + 2 * (16 + len(frame(Op.RW, b"x" * 40)))
    data = _pcap_with_corrupt_third_record()
    with CaptureReader(io.BytesIO(data), chunk=chunk) as r:
        assert len(list(r.records())) == 2
        assert r.stopped == ("corrupt record (captured length 2147483647) after packet 2 "
                             f"(byte {byte})")


def test_pcapng_packet_on_an_undeclared_interface_names_where(tmp_path: Path) -> None:
    out = io.BytesIO()
    w = PcapngWriter(out)
    w.write(T0, frame(Op.RW, b"abc"))
    whole = out.getvalue()
    bad = bytearray(b"".join(PcapngWriter.record_parts(T0, frame(Op.RW), 44)))
    struct.pack_into("<I", bad, 8, 5)  # interface 5: only interface 0 was declared
    for chunk in (1 << 22, 16):
        with CaptureReader(io.BytesIO(whole + bytes(bad)), chunk=chunk) as r:
            assert len(list(r.records())) == 1
            assert r.stopped == f"packet on undeclared interface 5 after packet 1 " \
                                f"(byte {len(whole)})"


def test_damaged_gzip_stream_is_a_capture_error_not_a_zlib_traceback() -> None:
    raw = bytearray(gzip.compress((FIXTURES / "stream-all-ops.pcap").read_bytes()))
    raw[20:40] = b"\xff" * 20  # deflate data past the gzip header: invalid block type
    with pytest.raises(CaptureError, match="read error"), \
            CaptureReader(io.BytesIO(bytes(raw))) as r:
        list(r.records())


def test_what_can_be_read_only_once_is_a_stream(tmp_path: Path) -> None:
    fifo, regular = tmp_path / "fifo", tmp_path / "file.pcap"
    os.mkfifo(fifo)
    regular.write_bytes(b"x")
    assert is_stream("-") and is_stream(str(fifo))
    assert not is_stream(str(regular)) and not is_stream(str(tmp_path))
    assert not is_stream(str(tmp_path / "missing"))  # opening it will say so


def test_a_fifo_without_a_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CaptureError) as e:
        open_file(str(fifo))
    assert str(e.value) == (f"{fifo}: a FIFO with no writer, nothing to read (start the "
                            "writer first, or pipe the capture into '-')")


class _FifoWriter:
    """A writer end of a FIFO held by the test: ``first`` is written before the reader
    opens it; :meth:`finish` writes ``rest`` from a thread (a pipe holds only 64 KiB) and
    closes it, the reader's end of the file."""

    def __init__(self, fifo: Path, first: bytes) -> None:
        # O_RDWR on a FIFO never blocks on Linux, and makes the test a writer
        self.fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        os.write(self.fd, first)
        self.thread: threading.Thread | None = None

    def finish(self, rest: bytes) -> None:
        def write() -> None:
            time.sleep(0.2)  # most likely the reader is waiting by now: it must wait, not end
            left = memoryview(rest)
            give_up = time.monotonic() + 10  # a reader that stopped reading must not hang us
            while left and time.monotonic() < give_up:
                try:
                    left = left[os.write(self.fd, left[:65536]):]
                except BlockingIOError:  # the pipe is full: wait for the reader
                    time.sleep(0.01)
            os.close(self.fd)
        self.thread = threading.Thread(target=write)
        self.thread.start()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


def _read_fifo(fifo: Path, first: bytes, rest: bytes) -> bytes:
    """What ``open_file`` gives for a FIFO whose writer wrote ``first`` before the reader
    opened it and ``rest`` after, read in small pieces and to its end."""
    writer = _FifoWriter(fifo, first)
    fp = open_file(str(fifo))
    writer.finish(rest)
    try:
        # the stream is named by the FIFO's descriptor, as os.fdopen names a file
        assert isinstance(fp.name, int) and stat.S_ISFIFO(os.fstat(fp.name).st_mode)
        got = bytearray()
        while chunk := fp.read(1000):
            got += chunk
        assert fp.read(1000) == b""  # and stays at its end
    finally:
        writer.join()
        fp.close()
    return bytes(got)


def test_a_fifo_gives_every_byte_written_before_and_after_it_was_opened(tmp_path: Path
                                                                        ) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    first = bytes(range(256)) * 40  # 10240 bytes, more than one read of 1000
    rest = b"the rest " * 5000
    assert _read_fifo(fifo, first, rest) == first + rest
    # a writer that has written nothing yet: the reader waits for it, nothing is made up
    assert _read_fifo(fifo, b"", rest) == rest


def test_a_capture_is_read_whole_through_a_fifo(tmp_path: Path) -> None:
    """A pcap through a FIFO whose writer wrote part before the reader opened it."""
    raw = (FIXTURES / "stream-all-ops.pcap").read_bytes()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = _FifoWriter(fifo, raw[:100])
    try:
        with CaptureReader(str(fifo)) as r:
            writer.finish(raw[100:])
            got = list(r.records())
            assert r.stopped is None
    finally:
        writer.join()
    with open_capture(str(FIXTURES / "stream-all-ops.pcap")) as want:
        assert got == list(want.records())


def test_create_output_gives_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "secret.pcap"
    path.write_bytes(b"old")
    path.chmod(0o644)
    create_output(str(path), force=True, mode=0o600).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_path_that_cannot_be_opened_says_why(tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)  # resolving it never ends: ELOOP, neither missing nor forbidden
    with pytest.raises(CaptureError) as e:
        open_file(str(loop))
    assert str(e.value) == f"{loop}: cannot open: {os.strerror(errno.ELOOP)}"


class _Stdin:
    """A stand-in for ``sys.stdin`` whose binary side is ``data`` (what a pipe would hold)."""

    def __init__(self, data: bytes) -> None:
        self.buffer = io.BufferedReader(io.BytesIO(data))


def test_sources_without_a_file_name_are_named_in_messages(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    with pytest.raises(CaptureError) as e:
        CaptureReader(io.BytesIO(b""))  # a file object with no name
    assert str(e.value) == "<file object>: empty file, not a capture"
    monkeypatch.setattr(sys, "stdin", _Stdin(b""))
    with pytest.raises(CaptureError) as e:
        CaptureReader("-")
    assert str(e.value) == "<stdin>: empty file, not a capture"


def test_closing_a_reader_closes_its_file_but_never_stdin(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    raw = (FIXTURES / "stream-all-ops.pcap").read_bytes()
    with CaptureReader(str(FIXTURES / "stream-all-ops.pcap")) as r:
        fp = r._fp
        assert not fp.closed
    assert fp.closed
    stdin = _Stdin(raw)
    monkeypatch.setattr(sys, "stdin", stdin)
    with CaptureReader("-") as r:
        assert len(list(r.records())) > 0
    assert not stdin.buffer.closed  # the process's stdin stays usable


def test_a_four_byte_file_is_judged_by_its_magic(tmp_path: Path) -> None:
    """Four bytes are enough to tell a pcap (then its header is cut short) from a stranger."""
    path = tmp_path / "four"
    path.write_bytes(struct.pack("<I", 0xA1B2C3D4))
    with pytest.raises(CaptureError) as e:
        open_capture(str(path))
    assert str(e.value) == f"{path}: truncated pcap file header"
    path.write_bytes(b"abcd")
    with pytest.raises(CaptureError) as e:
        open_capture(str(path))
    assert str(e.value) == f"{path}: not a pcap or pcapng file (magic 61626364)"


def test_a_path_we_may_not_read_says_so(tmp_path: Path) -> None:
    """A file without read permission; as root (who may read any file) a write-only sysfs
    attribute, which the kernel refuses to open for reading even to root."""
    path = tmp_path / "secret.pcap"
    if os.geteuid() == 0:
        path = Path("/sys/bus/pci/rescan")
    else:
        path.write_bytes(b"x")
        path.chmod(0)
    with pytest.raises(CaptureError) as e:
        open_file(str(path))
    assert str(e.value) == f"{path}: permission denied"
