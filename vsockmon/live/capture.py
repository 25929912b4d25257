"""Live capture from a vsockmon link: an AF_PACKET socket, a TPACKET_V3 ring, file writing.

Frames flow as *batches* of :class:`LiveFrame` (timestamp, captured bytes, original length):
:class:`LiveCapture` reads them — from a TPACKET_V3 ring shared with the kernel (one poll and
no copy per block of frames) or, as a fallback, with batched non-blocking ``recvmsg`` — and a
sink consumes them: :class:`FileSink` writes pcap/pcapng (rotating a ring of files if asked,
one ``write`` per batch so a killed capture leaves a valid file), :class:`LineSink` prints a
cheap one-line decode. :class:`CaptureStats` counts packets, bytes, ops and kernel drops.

Filtering and snap length run in the kernel (:mod:`vsockmon.live.bpf`). Signals stop a capture
between batches, never inside a write. This module must stay cheap to import in the lab VM:
no numpy, scapy or rich here.

Other consumers (``capture --diagnose``) use :meth:`LiveCapture.frames`, an iterator of
``(ts_ns, bytes)``.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO, NamedTuple, TextIO

from vsockmon.errors import VsockmonError
from vsockmon.live import bpf
from vsockmon.live.link import HeldLink, managed_link
from vsockmon.wire import pcapio
from vsockmon.wire.protocol import (
    ARPHRD_VSOCKMON,
    MON_HDR_LEN,
    VIRTIO_HDR_LEN,
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    MonOp,
    Op,
    SockType,
    Transport,
    cid_label,
    enum_name,
    flag_names,
)

SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
ETH_P_ALL = 0x0003
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33

_REQ3 = struct.Struct("=7I")  # struct tpacket_req3
_BLOCK_HDR = struct.Struct("=III")  # tpacket_hdr_v1: block_status, num_pkts, offset_to_first_pkt
_BLOCK_STATUS_OFF = 8  # after tpacket_block_desc's version and offset_to_priv
_PKT_HDR = struct.Struct("=IIIIIIH")  # tpacket3_hdr up to tp_mac
_AUXDATA = struct.Struct("=III")  # tpacket_auxdata: tp_status, tp_len, tp_snaplen
_TIMESPEC = struct.Struct("=qq")
_STATS_V3 = struct.Struct("=III")

BLOCK_SIZE = 1 << 19
"""Ring block size: holds seven of the largest frames (64 KiB payload + headers). Smaller
blocks mean less of the ring held back while one is written (libpcap's choice too)."""
BLOCK_TIMEOUT_MS = 100
"""A partly filled block is handed over after this long: the live view's latency, and the
idle capture's wake-up rate."""
TICK_S = 0.5
"""How often an idle capture wakes to update the status line and check its deadline."""
RECV_BATCH = 256

_HDRS_LEN = MON_HDR_LEN + VIRTIO_HDR_LEN
_OP_OFFSET = MON_HDR_LEN + next(f.offset for f in VIRTIO_HEADER.fields if f.name == "op")


class LiveCaptureError(VsockmonError):
    """A capture that cannot start or go on; the message is one line for the user."""


class LiveFrame(NamedTuple):
    """One captured frame: nanosecond timestamp, captured bytes, length on the wire.

    From a live capture ``data`` is a memoryview into the kernel's ring (or the receive
    arena), valid until the next batch is read: copy it (``bytes(data)``) to keep it.
    """

    ts_ns: int
    data: bytes | memoryview
    orig_len: int


LiveBatch = list[LiveFrame]


# -- stopping -----------------------------------------------------------------------------------


class Stop:
    """Why a capture should stop, set by a signal handler or by the code itself.

    The handlers only record the signal and wake the poll through a pipe
    (``signal.set_wakeup_fd``): the loop stops between batches, never inside a write.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._installed: dict[int, object] = {}
        self._old_wakeup: int | None = None

    def fileno(self) -> int:
        return self._r

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        with suppress(OSError):  # a full pipe already holds a wake-up
            os.write(self._w, b"\0")

    def install(self) -> None:
        """Catch SIGINT, SIGTERM and SIGHUP (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._installed[sig] = signal.signal(sig, self._on_signal)
        self._old_wakeup = signal.set_wakeup_fd(self._w)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.request(signal.Signals(signum).name)

    def close(self) -> None:
        for sig, old in self._installed.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
        self._installed.clear()
        if self._r >= 0:
            os.close(self._r)
            os.close(self._w)
            self._r = self._w = -1


# -- reading ------------------------------------------------------------------------------------


class _RingReader:
    """Frames from a TPACKET_V3 receive ring: blocks of frames the kernel hands over whole.

    Frames are memoryviews into the ring, not copies (a copy of every 64 KiB frame costs more
    than the rest of the path in the lab VM); the blocks they lie in go back to the kernel
    at the next :meth:`drain`, so a batch is valid until the next one is asked for.
    """

    def __init__(self, sock: socket.socket, buffer_bytes: int) -> None:
        self.blocks = max(2, buffer_bytes // BLOCK_SIZE)
        frame_size = 1 << 11
        req = _REQ3.pack(BLOCK_SIZE, self.blocks, frame_size,
                         BLOCK_SIZE // frame_size * self.blocks, BLOCK_TIMEOUT_MS, 0, 0)
        sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        sock.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self.map = mmap.mmap(sock.fileno(), BLOCK_SIZE * self.blocks,
                             mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self.map)
        self.current = 0
        self.held: list[int] = []

    def _release(self) -> None:
        for base in self.held:
            struct.pack_into("=I", self.map, base + _BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
        self.held.clear()

    def drain(self) -> LiveBatch:
        """The frames of the next block the kernel has handed over, after returning the
        previous one. One block at a time, as libpcap does: holding several while writing
        them would leave the kernel no room, and it drops what it cannot store."""
        self._release()
        mm, view, out = self.map, self.view, []
        base = self.current * BLOCK_SIZE
        status, count, first = _BLOCK_HDR.unpack_from(mm, base + _BLOCK_STATUS_OFF)
        if not status & TP_STATUS_USER:
            return out
        unpack_pkt = _PKT_HDR.unpack_from
        pos = base + first
        for _ in range(count):
            nxt, sec, nsec, snap, length, _st, mac = unpack_pkt(mm, pos)
            start = pos + mac
            out.append(LiveFrame(sec * 1_000_000_000 + nsec, view[start:start + snap], length))
            pos += nxt
        self.held.append(base)
        self.current = (self.current + 1) % self.blocks
        return out

    def close(self) -> None:
        self.view.release()
        with suppress(BufferError):  # a consumer still holds a frame: the GC unmaps later
            self.map.close()


class _RecvReader:
    """Frames by non-blocking ``recvmsg_into``, up to :data:`RECV_BATCH` per wake-up.

    Frames are received into one preallocated arena (no allocation per frame) and handed out
    as memoryviews valid until the next :meth:`drain`. Works on any datagram socket (the
    tests feed it a socketpair); on a packet socket the kernel's timestamp and original
    length come as control messages.
    """

    def __init__(self, sock: socket.socket, snaplen: int, buffer_bytes: int) -> None:
        self.sock = sock
        self.bufsize = min(snaplen, 1 << 18)
        # The socket's receive queue is this reader's kernel buffer (default ~200 KB: three
        # 64 KiB frames); as root, raise it past net.core.rmem_max like tcpdump's -B.
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, buffer_bytes)
        except OSError:
            with suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        self.arena = memoryview(bytearray(max(4 << 20, 4 * self.bufsize)))
        self.ancsize = socket.CMSG_SPACE(_TIMESPEC.size) + socket.CMSG_SPACE(32)
        sock.setblocking(False)
        if sock.family == socket.AF_PACKET:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)

    def drain(self) -> LiveBatch:
        out = []
        recvmsg_into, arena, bufsize, ancsize = (self.sock.recvmsg_into, self.arena,
                                                 self.bufsize, self.ancsize)
        pos, end = 0, len(arena) - bufsize
        while len(out) < RECV_BATCH and pos <= end:
            try:
                n, anc, _flags, _addr = recvmsg_into([arena[pos:pos + bufsize]], ancsize)
            except (BlockingIOError, InterruptedError):
                break
            ts, orig = 0, n
            for level, kind, value in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack_from(value)
                    ts = sec * 1_000_000_000 + nsec
                elif level == SOL_PACKET and kind == PACKET_AUXDATA:
                    orig = _AUXDATA.unpack_from(value)[1]
            out.append(LiveFrame(ts or time.time_ns(), arena[pos:pos + n], orig))
            pos += n
        return out

    def close(self) -> None:
        pass


class LiveCapture:
    """Frames from a vsockmon link, filtered in the kernel.

    Use as a context manager: it opens the socket (the link must exist and be up; see
    :func:`vsockmon.live.link.managed_link`) and, in the main thread, turns SIGINT/SIGTERM/SIGHUP
    into a clean stop. :meth:`batches` yields lists of :class:`LiveFrame` (an empty list when a
    tick passes without frames, so callers can refresh a status line), each list valid until
    the next is asked for; :meth:`frames` yields ``(ts_ns, bytes)`` one at a time.
    """

    def __init__(self, ifname: str = "vsockmon0", frame_filter: bpf.FrameFilter | None = None,
                 buffer_bytes: int = 8 << 20, use_mmap: bool = True,
                 expect_hatype: int | None = ARPHRD_VSOCKMON,
                 sock: socket.socket | None = None) -> None:
        self.ifname = ifname
        self.filter = frame_filter or bpf.FrameFilter()
        self.buffer_bytes = buffer_bytes
        self.use_mmap = use_mmap
        self.expect_hatype = expect_hatype
        self.sock = sock
        """A ready socket to read instead of opening one (tests pass a socketpair end)."""
        self.stop = Stop()
        self.deadline: float | None = None
        self._reader: _RingReader | _RecvReader | None = None
        self._seen = 0
        self._drops = 0

    # -- opening

    def open(self) -> LiveCapture:
        if self.sock is None:
            self.sock = self._open_packet_socket()
        if self._reader is None:
            self._reader = _RecvReader(self.sock, self.filter.snaplen, self.buffer_bytes)
        self.stop.install()
        return self

    def _open_packet_socket(self) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        except PermissionError:
            raise LiveCaptureError("opening a packet socket needs CAP_NET_RAW (run as root)"
                               ) from None
        except OSError as e:
            raise LiveCaptureError(f"cannot open a packet socket: {e.strerror}") from None
        try:
            # Filter and ring before bind: no frame may slip in unfiltered or outside the ring.
            try:
                bpf.attach(sock, self.filter.bytecode())
            except bpf.BpfFilterError as e:
                raise LiveCaptureError(str(e)) from None
            if self.use_mmap:
                try:
                    self._reader = _RingReader(sock, self.buffer_bytes)
                except OSError:
                    self._reader = None  # no mmap ring here: batched recvmsg instead
            try:
                sock.bind((self.ifname, ETH_P_ALL))
            except OSError as e:
                raise LiveCaptureError(f"cannot capture on {self.ifname}: {e.strerror}") from None
            hatype = sock.getsockname()[3]
            if self.expect_hatype is not None and hatype != self.expect_hatype:
                raise LiveCaptureError(f"{self.ifname} is not a vsockmon link (hardware type "
                                   f"{hatype}, expected {self.expect_hatype})")
        except BaseException:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            sock.close()
            raise
        return sock

    @property
    def method(self) -> str:
        return "mmap ring (TPACKET_V3)" if isinstance(self._reader, _RingReader) else "recvmsg"

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.stop.close()

    def __enter__(self) -> LiveCapture:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading

    def batches(self) -> Iterator[LiveBatch]:
        """Batches until :attr:`stop` is requested or :attr:`deadline` (monotonic) passes."""
        assert self.sock is not None and self._reader is not None, "open() first"
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.stop.fileno(), select.POLLIN)
        drain = self._reader.drain
        sock_fd = self.sock.fileno()
        while self.stop.reason is None:
            batch = drain()
            if batch:
                yield batch
                continue
            timeout = TICK_S
            if self.deadline is not None:
                timeout = min(timeout, self.deadline - time.monotonic())
                if timeout <= 0:
                    self.stop.request("duration")
                    break
            for fd, events in poller.poll(timeout * 1000):
                if fd == sock_fd and events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    self._link_gone()
            yield []

    def _link_gone(self) -> None:
        """The socket reports an error: the link was deleted (or went down) under us."""
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        why = os.strerror(code) if code else "socket error"
        raise LiveCaptureError(f"{self.ifname} went away while capturing ({why}); "
                           "what was captured until then is written")

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """``(ts_ns, frame bytes)`` one at a time: the hook for live analyses. The bytes are
        the consumer's to keep (copied out of the ring)."""
        for batch in self.batches():
            for frame in batch:
                yield frame.ts_ns, bytes(frame.data)

    def kernel_stats(self) -> tuple[int, int] | None:
        """(frames the socket saw, frames dropped for want of room), cumulative, or None
        when the socket keeps no statistics. Reading resets the kernel's counters, so they
        are summed here."""
        if self.sock is None or self.sock.family != socket.AF_PACKET:
            return None
        raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _STATS_V3.size)
        packets, drops = struct.unpack_from("=II", raw)
        self._seen += packets  # the kernel's tp_packets already includes the drops
        self._drops += drops
        return self._seen, self._drops


@contextmanager
def live_capture(ifname: str = "vsockmon0", frame_filter: bpf.FrameFilter | None = None,
                 buffer_bytes: int = 8 << 20, use_mmap: bool = True
                 ) -> Iterator[tuple[HeldLink, LiveCapture]]:
    """The link (created if missing, removed afterwards) and an open capture on it.

    The seam for live consumers other than the file writer (``capture --diagnose``)::

        with live_capture("vsockmon0") as (_link, live):
            for ts_ns, frame in live.frames():   # until Ctrl-C / SIGTERM / live.stop
                ...
    """
    with managed_link(ifname) as held, LiveCapture(ifname, frame_filter, buffer_bytes,
                                                   use_mmap) as live:
        yield held, live


# -- sinks ----------------------------------------------------------------------------------------


class OutputClosed(Exception):
    """The reader of ``-w -`` went away (broken pipe): stop quietly."""


class _Spool:
    """A file-like object that collects a batch and writes it with ``writev`` — the frames
    straight from the ring, no copy in Python — so the file only ever grows by whole
    records (valid up to the last batch, even after a kill)."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.fd = fp.fileno()
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.parts.append(data)
        self.size += len(data)
        return len(data)

    def extend(self, parts: tuple[bytes | memoryview, ...]) -> None:
        self.parts.extend(parts)
        self.size += sum(map(len, parts))

    def flush(self) -> None:
        if not self.parts:
            return
        try:
            _writev_all(self.fd, self.parts)
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as e:
            raise LiveCaptureError(f"write failed: {e.strerror}") from None
        finally:
            self.parts = []

    def close(self) -> None:
        try:
            self.flush()
        finally:
            if self.fp is not sys.stdout.buffer:
                self.fp.close()


IOV_MAX = 1024


def _writev_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """Write every part, in order, however the kernel splits the writes."""
    while parts:
        chunk = parts[:IOV_MAX]
        written = os.writev(fd, chunk)
        done = 0
        for part in chunk:
            if written < len(part):
                break
            written -= len(part)
            done += 1
        parts = parts[done:]
        if written:
            parts[0] = memoryview(parts[0])[written:]


def ring_paths(path: str, files: int | None) -> list[str]:
    """The names of a ring of ``files`` capture files (FILE.0 …), or ``[path]``."""
    return [path] if files is None else [f"{path}.{i}" for i in range(files)]


class FileSink:
    """Writes frames to a pcap or pcapng file (by extension) or stdout (``-``).

    With ``rotate_bytes``, a new file starts when the current one would pass that size:
    ``FILE.0``, ``FILE.1`` … and, with ``files``, the ring wraps and overwrites the oldest
    (tcpdump's ``-C``/``-W``). Every batch is flushed, so the file is valid after a kill.
    """

    def __init__(self, path: str, force: bool = False, snaplen: int = bpf.DEFAULT_SNAPLEN,
                 rotate_bytes: int | None = None, files: int | None = None) -> None:
        self.check(path, force, snaplen, rotate_bytes, files)
        self.path, self.snaplen = path, snaplen
        self.rotate_bytes, self.files = rotate_bytes, files
        self.index = 0
        self.written: list[str] = []
        self._open(force)

    @staticmethod
    def check(path: str, force: bool = False, snaplen: int = bpf.DEFAULT_SNAPLEN,
              rotate_bytes: int | None = None, files: int | None = None) -> None:
        """Raise :class:`LiveCaptureError` for options that cannot work or files that would be
        overwritten without ``force`` — before anything (the link) is changed."""
        if files is not None and rotate_bytes is None:
            raise LiveCaptureError("a ring of files (--ring) needs a file size (--ring-size)")
        if rotate_bytes is not None and path == "-":
            raise LiveCaptureError("cannot rotate files when writing to stdout")
        if path.endswith(".gz"):
            raise LiveCaptureError(f"{path}: live captures are written uncompressed; "
                               "compress the file afterwards")
        if force or path == "-":
            return
        names = [path] if rotate_bytes is None else ring_paths(path, files or 1)
        for name in names:
            if os.path.exists(name):
                raise LiveCaptureError(f"{name}: exists; use --force to overwrite")

    def _current_path(self) -> str:
        return self.path if self.rotate_bytes is None else f"{self.path}.{self.index}"

    def _open(self, force: bool) -> None:
        path = self._current_path()
        try:
            fp = pcapio.create_output(path, force)
        except pcapio.LiveCaptureError as e:
            raise LiveCaptureError(str(e)) from None
        self.spool = _Spool(fp)
        # pcapio frames every record as pieces, so each frame goes from the ring to the
        # file through writev without a copy.
        writer = pcapio.writer_for(self.path, self.spool,  # type: ignore[arg-type]
                                   snaplen=self.snaplen)
        self.frame_parts = writer.record_parts
        self.in_file = 0
        if path not in self.written:
            self.written.append(path)

    def _rotate(self) -> None:
        self.spool.close()
        self.index += 1
        if self.files is not None:
            self.index %= self.files
        self._open(force=True)  # our own earlier file of the ring, or a checked name

    def write(self, batch: LiveBatch) -> None:
        spool, parts_of, limit = self.spool, self.frame_parts, self.rotate_bytes
        for ts, data, orig in batch:
            if limit is not None and self.in_file and spool.size + len(data) + 36 > limit:
                spool.flush()
                self._rotate()
                spool, parts_of = self.spool, self.frame_parts
            spool.extend(parts_of(ts, data, orig))
            self.in_file += 1
        spool.flush()

    def close(self) -> None:
        self.spool.close()


_MON = VSOCKMON_HEADER.struct
_VIRTIO = VIRTIO_HEADER.struct


def format_frame(ts_ns: int, data: bytes) -> str:
    """One line per frame in ``vsockmon decode``'s style, but cheap (struct, no numpy):
    wall-clock time, ends, type, op, len, flags, credit."""
    sec, nsec = divmod(ts_ns, 1_000_000_000)
    stamp = time.strftime("%H:%M:%S", time.localtime(sec)) + f".{nsec // 1000:06d}"
    if len(data) < MON_HDR_LEN:
        return f"{stamp}  [truncated frame, {len(data)} bytes]"
    scid, dcid, sport, dport, mop, trans, tlen, _r = _MON.unpack_from(data)
    ends = f"{cid_label(scid)}:{sport} → {cid_label(dcid)}:{dport}"
    if trans != Transport.VIRTIO or len(data) < _HDRS_LEN:
        return (f"{stamp}  {ends}  {enum_name(MonOp, mop)} transport="
                f"{enum_name(Transport, trans)} trans_len={tlen} [{len(data)} bytes]")
    _s, _d, _sp, _dp, plen, stype, op, flags, buf_alloc, fwd_cnt = _VIRTIO.unpack_from(
        data, MON_HDR_LEN)
    parts = [f"{stamp}  {ends}  {enum_name(SockType, stype)} {enum_name(Op, op)} len={plen}"]
    names = flag_names(op, stype, flags)
    if names:
        parts.append("[" + ",".join(names) + "]")
    parts.append(f"buf_alloc={buf_alloc} fwd_cnt={fwd_cnt}")
    return " ".join(parts)


class LineSink:
    """Prints :func:`format_frame` lines (the live view when not writing a file)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, batch: LiveBatch) -> None:
        try:
            self.out.write("".join(format_frame(f.ts_ns, f.data) + "\n" for f in batch))
            self.out.flush()
        except BrokenPipeError:
            raise OutputClosed() from None

    def close(self) -> None:
        pass


# -- statistics -----------------------------------------------------------------------------------


class CaptureStats:
    """Packets, bytes and per-op counts of what was written, and the kernel's drop count."""

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.ops: dict[int, int] = {}
        self.kernel: tuple[int, int] | None = None
        self.started = time.monotonic()

    def add(self, batch: LiveBatch) -> None:
        ops, unpack, hdrs = self.ops, struct.unpack_from, _HDRS_LEN
        for frame in batch:
            data = frame.data
            if len(data) >= hdrs:
                op = unpack("<H", data, _OP_OFFSET)[0]
                ops[op] = ops.get(op, 0) + 1
            self.bytes += len(data)
        self.packets += len(batch)

    def op_counts(self) -> dict[str, int]:
        return {enum_name(Op, k): v for k, v in sorted(self.ops.items())}

    def line(self) -> str:
        """The status line: packets, bytes, per-op counts, kernel drops."""
        ops = " ".join(f"{k} {v}" for k, v in self.op_counts().items())
        text = f"{self.packets} packets, {_human(self.bytes)}"
        if ops:
            text += f" ({ops})"
        if self.kernel is not None:
            seen, drops = self.kernel
            ratio = drops / seen * 100 if seen else 0.0
            text += f"; kernel: {seen} seen, {drops} dropped ({ratio:.2f}%)"
        return text

    def as_dict(self) -> dict[str, object]:
        seen, drops = self.kernel or (None, None)
        return {"packets": self.packets, "bytes": self.bytes, "ops": self.op_counts(),
                "kernel_seen": seen, "kernel_drops": drops,
                "seconds": round(time.monotonic() - self.started, 3)}


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


# -- the loop -------------------------------------------------------------------------------------


def run(capture: LiveCapture, sink: FileSink | LineSink, stats: CaptureStats,
        count: int | None = None, on_tick: object = None, tick_s: float = TICK_S) -> str:
    """Move batches from ``capture`` to ``sink`` until a limit, a signal or the deadline;
    returns why it stopped. ``on_tick(stats)`` is called at most every ``tick_s``."""
    last_tick = time.monotonic()
    try:
        for batch in capture.batches():
            if batch:
                if count is not None and stats.packets + len(batch) >= count:
                    batch = batch[:count - stats.packets]
                    capture.stop.request("count")
                sink.write(batch)
                stats.add(batch)
            now = time.monotonic()
            if on_tick is not None and now - last_tick >= tick_s:
                last_tick = now
                stats.kernel = capture.kernel_stats()
                on_tick(stats)  # type: ignore[operator]
    except OutputClosed:
        capture.stop.request("output closed")
    finally:
        stats.kernel = capture.kernel_stats()
    return capture.stop.reason or "end"


def drop_privileges(user: str) -> None:
    """Become ``user`` (tcpdump's ``-Z``): the packet socket stays open, files are then
    created as that user."""
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise LiveCaptureError(f"-Z {user}: no such user") from None
    try:
        os.initgroups(entry.pw_name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except PermissionError:
        raise LiveCaptureError(f"-Z {user}: cannot change user (not root?)") from None


def fork_unprivileged(user: str) -> int | None:
    """Split into a privileged parent and a child running as ``user``.

    Returns None in the child (now ``user``) and the child's exit code in the parent. The
    parent keeps root only to remove the link it created once the child is done; it passes
    SIGINT, SIGTERM and SIGHUP on to the child, which stops cleanly.
    """
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        raise LiveCaptureError(f"-Z {user}: no such user") from None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            drop_privileges(user)
        except LiveCaptureError as e:  # leave without the parent's cleanup: it owns the link
            sys.stderr.write(f"Error: {e}\n")
            sys.stderr.flush()
            os._exit(1)
        return None

    def forward(signum: int, _frame: object) -> None:
        os.kill(pid, signum)

    old = {sig: signal.signal(sig, forward)
           for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        _, status = os.waitpid(pid, 0)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return os.waitstatus_to_exitcode(status)
