"""Streaming pcap and pcapng reading and writing (gzip and stdin too), in bounded memory.

The reader's one mechanism is the *batch*: a chunk of the file with the offsets of the
packets inside it. The bulk decoder turns a batch into numpy columns without a per-packet
Python object; :meth:`CaptureReader.records` derives the per-packet view from the same batches.
Timestamps are integer nanoseconds, so µs and ns captures keep every digit.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, NamedTuple, cast

from vsockmon import output
from vsockmon.errors import VsockmonError
from vsockmon.wire import _walk
from vsockmon.wire.gunzip import Gunzip, ReadAhead
from vsockmon.wire.protocol import LINKTYPE_NAMES, LINKTYPE_VSOCK

CHUNK = 4 << 20
"""Bytes read at a time: the memory a reader holds, plus at most one oversized packet."""
MAX_RECORD = 16 << 20
"""A record claiming more than this is corruption, not a packet (bounded memory)."""

MAX_TS_NS = 2**63 - 1
"""A pcapng timestamp beyond this (year 2262) is damage; clamped so columns stay int64."""

PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BOM = 0x1A2B3C4D
_IDB, _SPB, _EPB, _PB, _ISB = 1, 3, 6, 2, 5
_ISB_ENDTIME = 3


class CaptureError(VsockmonError):
    """A capture that cannot be read: the message is one line for the user."""


class Record(NamedTuple):
    """One packet as stored in the file."""

    ts_ns: int
    orig_len: int
    data: bytes
    linktype: int


def _column() -> array[int]:
    return array("q")


@dataclass
class RecordBatch:
    """Packets of one chunk: ``buf[offsets[i]:offsets[i]+caplens[i]]`` is packet i.

    Columns are native int64 ``array``s, not numpy: the reader stays free of numpy (the
    live capture imports this module), and the bulk decoder views them without a copy.
    """

    buf: bytes
    offsets: array[int] = field(default_factory=_column)
    caplens: array[int] = field(default_factory=_column)
    orig_lens: array[int] = field(default_factory=_column)
    ts_ns: array[int] = field(default_factory=_column)
    linktypes: array[int] = field(default_factory=_column)

    def __len__(self) -> int:
        return len(self.offsets)

    def extend(self, columns: list[bytes]) -> None:
        """Append the walker's columns (offsets, caplens, orig_lens, ts_ns, linktypes)."""
        for col, raw in zip((self.offsets, self.caplens, self.orig_lens, self.ts_ns,
                             self.linktypes), columns, strict=True):
            col.frombytes(raw)


def linktype_label(linktype: int) -> str:
    name = LINKTYPE_NAMES.get(linktype)
    return f"link type {linktype} ({name})" if name else f"link type {linktype}"


def _open_source(path: str | BinaryIO) -> tuple[BinaryIO, str]:
    """The file (or stdin for ``-``, or a binary file object read from where it stands),
    transparently gunzipped, and a name for messages."""
    raw: BinaryIO
    if not isinstance(path, str):
        raw, name = path, str(getattr(path, "name", "<file object>"))
    elif path == "-":
        raw = sys.stdin.buffer
        name = "<stdin>"
    else:
        name = path
        raw = open_file(path)
    buffered = (raw if isinstance(raw, io.BufferedReader)
                else io.BufferedReader(cast(io.RawIOBase, raw)))
    if buffered.peek(2)[:2] != b"\x1f\x8b":
        return buffered, name
    gunzipped = cast(BinaryIO, Gunzip(cast(BinaryIO, buffered)))
    if isinstance(path, str) and _is_regular(raw):  # gunzip on the other core
        return cast(BinaryIO, ReadAhead(gunzipped, CHUNK)), name
    return gunzipped, name


def _is_regular(fp: BinaryIO) -> bool:
    """Whether ``fp`` reads a regular file (whose reads never wait on a writer)."""
    try:
        return stat.S_ISREG(os.fstat(fp.fileno()).st_mode)
    except (OSError, ValueError, io.UnsupportedOperation):
        return False


def is_stream(path: str) -> bool:
    """Whether the capture at ``path`` can be read only once: stdin (``-``), a FIFO, or a
    shell's ``<(…)``. False for a path that does not exist (opening it will say so)."""
    try:
        return path == "-" or stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def open_file(path: str) -> BinaryIO:
    """``path`` opened for reading, never waiting: a FIFO is opened without blocking, and
    one with no writer is refused (a blocking open would wait for one forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CaptureError(f"{path}: no such file") from None
    except PermissionError:
        raise CaptureError(f"{path}: permission denied") from None
    except OSError as e:
        raise CaptureError(f"{path}: cannot open: {e.strerror}") from None
    kind = os.fstat(fd).st_mode
    first = b""
    try:
        if stat.S_ISDIR(kind):
            raise CaptureError(f"{path}: is a directory, not a capture file")
        if stat.S_ISFIFO(kind):
            first = _fifo_start(path, fd)
    except CaptureError:
        os.close(fd)
        raise
    os.set_blocking(fd, True)  # from now on a reader waits for a slow writer, as it should
    raw = os.fdopen(fd, "rb", buffering=0)
    return cast(BinaryIO, _Prefixed(first, raw) if first else raw)


def _fifo_start(path: str, fd: int) -> bytes:
    """What a FIFO holds already (possibly nothing), or :class:`CaptureError` when no writer
    has it open: a read without a writer is the end of the file."""
    try:
        first = os.read(fd, 1 << 16)
    except BlockingIOError:  # a writer, not written yet
        return b""
    if not first:
        raise CaptureError(f"{path}: a FIFO with no writer, nothing to read (start the "
                           "writer first, or pipe the capture into '-')")
    return first


class _Prefixed(io.RawIOBase):
    """A raw stream that gives ``first`` back before the rest of ``raw`` (a FIFO's bytes
    read while checking it had a writer)."""

    def __init__(self, first: bytes, raw: io.FileIO) -> None:
        super().__init__()
        self._first, self._raw = first, raw
        self.name = raw.name

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:  # any writable buffer, as RawIOBase's
        if not self._first:
            return self._raw.readinto(buf) or 0
        view = memoryview(buf).cast("B")
        n = min(len(view), len(self._first))
        view[:n], self._first = self._first[:n], self._first[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


class CaptureReader:
    """Reads a pcap or pcapng capture as batches of packets, never the whole file at once.

    After iteration, :attr:`stopped` says why reading ended early (a truncated or corrupt
    file), or is ``None`` when the file was read to its end.
    """

    def __init__(self, path: str | BinaryIO, chunk: int = CHUNK) -> None:
        self._chunk = chunk
        self._fp, self.name = _open_source(path)
        self.stopped: str | None = None
        self.packets = 0
        self.offset = 0
        """Bytes of the file consumed so far: where a damaged file stopped."""
        self._pending = b""
        self._eof = False
        self._interfaces: list[tuple[int, int, int]] = []
        """(link type, ``if_tsresol`` code, snaplen) of each interface of the section."""
        self.capture_end_ns: int | None = None
        """When the capture stopped, as a pcapng interface statistics block records it
        (``isb_endtime``), once read past it; None when the file does not say (classic
        pcap has no place for it). A capture may go on, silent, after its last packet."""
        try:
            self.format, self.linktype = self._read_file_header()
        except CaptureError:
            self.close()
            raise

    # -- opening --------------------------------------------------------------------------

    def _read(self, n: int) -> bytes:
        try:
            return self._fp.read(n)
        except (OSError, EOFError, zlib.error) as e:
            # zlib.error: a damaged gzip stream; EOFError: one cut short
            raise CaptureError(f"{self.name}: read error: {e}") from None

    def _read_file_header(self) -> tuple[str, int]:
        head = self._read(24)
        if not head:
            raise CaptureError(f"{self.name}: empty file, not a capture")
        if len(head) < 4:
            raise CaptureError(f"{self.name}: not a pcap or pcapng file (too short)")
        for endian in "<>":
            magic = struct.unpack_from(endian + "I", head)[0]
            if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
                if len(head) < 24:
                    raise CaptureError(f"{self.name}: truncated pcap file header")
                self._endian = endian
                self._ts_scale = 1 if magic == PCAP_MAGIC_NS else 1000
                self.offset = 24
                return "pcap", struct.unpack_from(endian + "I", head, 20)[0] & 0x0FFFFFFF
        if struct.unpack_from("<I", head)[0] == PCAPNG_SHB:
            self._pending = head
            self._endian = "<"
            return "pcapng", self._pcapng_first_linktype()
        raise CaptureError(f"{self.name}: not a pcap or pcapng file (magic {head[:4].hex()})")

    def _pcapng_first_linktype(self) -> int:
        """Read blocks up to the first interface description, so the link type is known."""
        want = 12
        while not self._interfaces:
            self._fill(want)
            if self._eof and len(self._pending) < want:
                raise CaptureError(f"{self.name}: pcapng file without an interface description")
            # 0: every whole block was read, the next one needs at least its 12-byte frame
            # (not the size of the block before it, which may be more than the file has left)
            want = self._parse_pcapng(RecordBatch(b""), stop_after_idb=True) or 12
            if self.stopped:
                raise CaptureError(f"{self.name}: corrupt pcapng file ({self.stopped})")
        return self._interfaces[0][0]

    # -- chunked reading ------------------------------------------------------------------

    def _fill(self, need: int) -> None:
        """Make ``_pending`` hold at least ``need`` bytes, or all that is left of the file."""
        parts = [self._pending]
        have = len(self._pending)
        while have < need and not self._eof:
            more = self._read(max(self._chunk, need - have))
            if not more:
                self._eof = True
            parts.append(more)
            have += len(more)
        self._pending = b"".join(parts)

    def batches(self) -> Iterator[RecordBatch]:
        """Batches of packets in file order; stops at the first damaged record."""
        parse = self._parse_pcap if self.format == "pcap" else self._parse_pcapng
        want = self._chunk
        while self.stopped is None:
            self._fill(want)
            if not self._pending:
                return
            batch = RecordBatch(b"")
            want = parse(batch)
            self.packets += len(batch)
            if len(batch):
                yield batch
            if want and self._eof and len(self._pending) < want:
                left = len(self._pending)
                self.stopped = (f"file ends inside a packet after packet {self.packets} "
                                f"(byte {self.offset}, {left} bytes left over)")
            want = max(want, self._chunk)

    def records(self) -> Iterator[Record]:
        """One :class:`Record` per packet, derived from :meth:`batches`."""
        for b in self.batches():
            for off, cap, orig, ts, lt in zip(
                b.offsets, b.caplens, b.orig_lens, b.ts_ns, b.linktypes, strict=True
            ):
                yield Record(ts, orig, b.buf[off : off + cap], lt)

    def _corrupt(self, why: str, batch: RecordBatch) -> int:
        """Stop at damage. Called once the whole records before it are in ``batch`` and
        consumed, so the packet and byte named are the same whatever the chunk size."""
        self.stopped = f"{why} after packet {self.packets + len(batch)} (byte {self.offset})"
        self._pending = b""
        return 0

    def _consume(self, batch: RecordBatch, buf: bytes, off: int) -> None:
        batch.buf = buf
        self._pending = buf[off:]
        self.offset += off

    def _parse_pcap(self, batch: RecordBatch) -> int:
        """Walk the whole records of ``_pending`` into ``batch`` (compiled: ``_walk``).

        Returns 0 when nothing is left over, else the bytes needed to complete the next record.
        """
        buf = self._pending
        _n, *columns, off, status, value = _walk.walk_pcap(
            buf, self._endian == ">", self._ts_scale, self.linktype, MAX_RECORD)
        batch.extend(columns)
        self._consume(batch, buf, off)
        if status == _walk.WALK_BAD_RECORD:
            return self._corrupt(f"corrupt record (captured length {value})", batch)
        return int(value)

    def _parse_pcapng(self, batch: RecordBatch, stop_after_idb: bool = False) -> int:
        """Walk the whole blocks of ``_pending``; packets go to ``batch``.

        Packet blocks are walked by ``_walk``, which stops at each section header and
        interface description for this method to read.
        Returns 0 when nothing is left over, else the bytes needed to complete the next block.
        """
        buf = self._pending
        off = want = 0
        while True:
            _n, *columns, off, status, value = _walk.walk_pcapng(
                buf, off, self._endian == ">", self._interfaces, MAX_RECORD)
            batch.extend(columns)
            if status == _walk.WALK_CONTROL:
                blen = self._control_block_length(buf, off)
                if blen < 12 or blen % 4 or blen > MAX_RECORD:
                    self._consume(batch, buf, off)
                    return self._corrupt(f"corrupt pcapng block (length {blen})", batch)
                if off + blen > len(buf):
                    want = blen
                    break
                btype = struct.unpack_from(self._endian + "I", buf, off)[0]
                if btype == _IDB and blen >= 20:
                    self._interfaces.append(self._parse_idb(buf, off + 8, off + blen - 4))
                elif btype == _ISB and blen >= 24:
                    self._read_isb(buf, off + 8, off + blen - 4)
                off += blen
                if stop_after_idb and self._interfaces:
                    break
                continue
            if status == _walk.WALK_BAD_BLOCK:
                self._consume(batch, buf, off)
                return self._corrupt(f"corrupt pcapng block (length {value})", batch)
            if status == _walk.WALK_BAD_IFACE:
                self._consume(batch, buf, off)
                return self._corrupt(f"packet on undeclared interface {value}", batch)
            if status == _walk.WALK_BAD_PACKET:
                self._consume(batch, buf, off)
                return self._corrupt(f"corrupt packet block (captured length {value})", batch)
            want = value
            break
        self._consume(batch, buf, off)
        return int(want)

    def _control_block_length(self, buf: bytes, off: int) -> int:
        """The length of the section header or interface description at ``off``; a section
        header first sets the byte order and forgets the interfaces of the last section."""
        if struct.unpack_from("<I", buf, off)[0] == PCAPNG_SHB:
            bom = struct.unpack_from("<I", buf, off + 8)[0]
            self._endian = "<" if bom == PCAPNG_BOM else ">"
            self._interfaces = []
        length: int = struct.unpack_from(self._endian + "I", buf, off + 4)[0]
        return length

    def _parse_idb(self, buf: bytes, body: int, end: int) -> tuple[int, int, int]:
        """(link type, ``if_tsresol`` code, snaplen) of an interface description."""
        linktype, _res, snaplen = struct.unpack_from(self._endian + "HHI", buf, body)
        tsresol = 6  # default resolution: microseconds
        opt = body + 8
        while opt + 4 <= end:
            code, length = struct.unpack_from(self._endian + "HH", buf, opt)
            if code == 0:
                break
            if code == 9 and length >= 1:
                tsresol = buf[opt + 4]
            opt += 4 + (length + 3) // 4 * 4
        return linktype, tsresol, snaplen

    def _read_isb(self, buf: bytes, body: int, end: int) -> None:
        """Note the capture's end from an interface statistics block: its ``isb_endtime``,
        else the time the block was written."""
        iface, high, low = struct.unpack_from(self._endian + "III", buf, body)
        if iface >= len(self._interfaces):
            return
        ticks = high << 32 | low
        opt = body + 12
        while opt + 4 <= end:
            code, length = struct.unpack_from(self._endian + "HH", buf, opt)
            if code == 0:
                break
            if code == _ISB_ENDTIME and length == 8 and opt + 12 <= end:
                high, low = struct.unpack_from(self._endian + "II", buf, opt + 4)
                ticks = high << 32 | low
            opt += 4 + (length + 3) // 4 * 4
        ns = _ticks_to_ns(ticks, self._interfaces[iface][1])
        self.capture_end_ns = ns if self.capture_end_ns is None else max(ns, self.capture_end_ns)

    def close(self) -> None:
        if self._fp is not sys.stdin.buffer:
            self._fp.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_capture(path: str | BinaryIO, require_linktype: int | None = LINKTYPE_VSOCK
                 ) -> CaptureReader:
    """Open a capture; with ``require_linktype``, refuse any other link type in one line."""
    reader = CaptureReader(path)
    if require_linktype is not None and reader.linktype != require_linktype:
        reader.close()
        raise CaptureError(
            f"{reader.name}: {linktype_label(reader.linktype)}, "
            f"expected {require_linktype} ({LINKTYPE_NAMES.get(require_linktype, '?')})"
        )
    return reader


# -- writing ------------------------------------------------------------------------------


Part = bytes | memoryview
_PCAP_RECORD = struct.Struct("<IIII")
_EPB_HEAD = struct.Struct("<IIIIIII")  # type, length, interface, ts high, ts low, cap, orig
_PAD = (b"", b"\0", b"\0\0", b"\0\0\0")


class PcapWriter:
    """Writes a nanosecond pcap. Each record is written whole, so the file of a writer that
    is killed is valid up to its last flush."""

    def __init__(self, fp: BinaryIO, linktype: int = LINKTYPE_VSOCK, snaplen: int = 262144):
        self.fp = fp
        fp.write(struct.pack("<IHHiIII", PCAP_MAGIC_NS, 2, 4, 0, 0, snaplen, linktype))

    @staticmethod
    def record_parts(ts_ns: int, data: Part, orig_len: int, comment: str | None = None
                     ) -> tuple[Part, ...]:
        """A record as pieces to write in order: the packet itself is not copied, so a live
        capture can hand frames from the kernel's ring straight to ``writev``. Classic pcap
        has no comments; ``comment`` is ignored."""
        sec, nsec = divmod(ts_ns, 1_000_000_000)
        return _PCAP_RECORD.pack(sec, nsec, len(data), orig_len), data

    def write(self, ts_ns: int, data: bytes, orig_len: int | None = None,
              comment: str | None = None) -> None:
        orig = len(data) if orig_len is None else orig_len
        self.fp.write(b"".join(self.record_parts(ts_ns, data, orig, comment)))

    def flush(self) -> None:
        self.fp.flush()


class PcapngWriter(PcapWriter):
    """Writes pcapng with one interface (ns resolution) and optional per-packet comments."""

    def __init__(self, fp: BinaryIO, linktype: int = LINKTYPE_VSOCK, snaplen: int = 262144,
                 ifname: str = "vsockmon0", app: str = "vsockmon"):
        self.fp = fp
        fp.write(_block(PCAPNG_SHB, struct.pack("<IHHq", PCAPNG_BOM, 1, 0, -1)
                        + _options([(4, app.encode())])))
        fp.write(_block(_IDB, struct.pack("<HHI", linktype, 0, snaplen)
                        + _options([(2, ifname.encode()), (9, bytes([9]))])))

    @staticmethod
    def record_parts(ts_ns: int, data: Part, orig_len: int, comment: str | None = None
                     ) -> tuple[Part, ...]:
        """An enhanced packet block on interface 0, as pieces (see PcapWriter's)."""
        n = len(data)
        pad = -n % 4
        opts = _options([(1, comment.encode())]) if comment else b""
        total = _EPB_HEAD.size + n + pad + len(opts) + 4
        head = _EPB_HEAD.pack(_EPB, total, 0, ts_ns >> 32, ts_ns & 0xFFFFFFFF, n, orig_len)
        return head, data, _PAD[pad] + opts + total.to_bytes(4, "little")

    @staticmethod
    def statistics_block(end_ns: int) -> bytes:
        """An interface statistics block for interface 0 saying when the capture stopped
        (``isb_endtime``, ns): written last, it tells a reader that the capture went on
        after its last packet, so silences (a half-close nobody answers) are measured up to
        the real end, as they were live."""
        ts = struct.pack("<II", end_ns >> 32, end_ns & 0xFFFFFFFF)
        return _block(_ISB, struct.pack("<I", 0) + ts + _options([(_ISB_ENDTIME, ts)]))


def _ticks_to_ns(ticks: int, tsresol: int) -> int:
    """A pcapng timestamp in nanoseconds, from ticks of the interface's ``if_tsresol``
    (10^-n s, or 2^-n s when the high bit is set); clamped like the packets' (_walk)."""
    if tsresol & 0x80:
        ns = ticks * 1_000_000_000 >> (tsresol & 0x7F)
    else:  # exact in Python's integers, so one floor division serves every power of 10
        ns = ticks * 10**9 // 10**tsresol
    return min(ns, MAX_TS_NS)


def _options(opts: list[tuple[int, bytes]]) -> bytes:
    out = b"".join(
        struct.pack("<HH", code, len(v)) + v + b"\0" * (-len(v) % 4) for code, v in opts
    )
    return out + struct.pack("<HH", 0, 0)


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def writer_for(path: str, fp: BinaryIO, **kw: object) -> PcapWriter | PcapngWriter:
    """A pcapng writer for ``.pcapng``/``.ntar`` names, else classic pcap."""
    base = path.removesuffix(".gz")
    cls = PcapngWriter if base.endswith((".pcapng", ".ntar")) else PcapWriter
    return cls(fp, **kw)  # type: ignore[arg-type]


def create_output(path: str, force: bool, mode: int | None = None) -> BinaryIO:
    """Open ``path`` for writing, refusing to replace an existing file without ``force``:
    :func:`vsockmon.output.create_output` (``mode`` too), failing with a
    :class:`CaptureError`."""
    return output.create_output(path, force, CaptureError, mode)
