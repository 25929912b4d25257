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

import bisect
import io
import mmap
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import NamedTuple, TextIO

from vsockmon.errors import VsockmonError

try:
    from vsockmon.live import _ring
except ImportError:  # not built: the ring reader says so, --no-mmap still works
    _ring = None  # type: ignore[assignment]
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
DEFAULT_BUFFER = 32 << 20
"""The kernel's ring (``-B``). In the lab a bulk transfer of 64 KiB frames outran an 8 MiB ring
(0.6 s of traffic) in one run of two on a loaded host (3 % dropped) and never a 32 MiB one
(benchmarks/bench_capture.py); small frames never came near either."""
BLOCK_TIMEOUT_MS = 100
"""A partly filled block is handed over after this long: the live view's latency, and the
idle capture's wake-up rate."""
STOP_GRACE_S = 2.0
"""How long a stopping capture waits for the kernel's next block of the frames it already
took (at least a block timeout); a second Ctrl-C cuts it short."""
TICK_S = 0.5
"""How often an idle capture wakes to update the status line and check its deadline."""
RECV_BATCH = 256

_HDRS_LEN = MON_HDR_LEN + VIRTIO_HDR_LEN
_OP_OFFSET = MON_HDR_LEN + next(f.offset for f in VIRTIO_HEADER.fields if f.name == "op")
_OP = struct.Struct("<H")
_U32 = struct.Struct("=I")


class LiveCaptureError(VsockmonError):
    """A capture that cannot start or go on; the message is one line for the user."""


def _need_ring() -> None:
    if _ring is None:
        raise LiveCaptureError("vsockmon's compiled part (vsockmon/live/_ring.c) is not "
                               "built: reinstall with 'pip install -e .' (needs gcc and "
                               "python3-dev)")


class LiveFrame(NamedTuple):
    """One captured frame: nanosecond timestamp, captured bytes, length on the wire."""

    ts_ns: int
    data: bytes | memoryview
    orig_len: int


PCAP, PCAPNG = 0, 1
"""Record formats of a :class:`LiveBatch` (the values ``_ring`` takes)."""
_RECORD_PARTS = {PCAP: pcapio.PcapWriter.record_parts, PCAPNG: pcapio.PcapngWriter.record_parts}
_INDEX = struct.Struct("=5Q")
"""Per frame in :attr:`LiveBatch.index`: timestamp, end of its record in the output, offset
of its bytes in :attr:`LiveBatch.source`, captured length, original length."""


class LiveBatch:
    """The frames of one ring block (or one round of ``recvmsg``), framed as capture file
    records without a Python object per frame: the record headers of all of them
    (:attr:`heads`, built at once), where each frame lies in :attr:`source` (the kernel's
    ring block), and the counts the statistics need. :meth:`write_to` writes them with
    ``writev``, the frames straight from the ring. Iterating yields :class:`LiveFrame`
    (the line view, ``--diagnose``); their data are views of the ring, valid until the
    next batch is asked for: copy them (``bytes(data)``) to keep them.
    """

    __slots__ = ("count", "fmt", "heads", "index", "nbytes", "ops", "source")

    def __init__(self, fmt: int, heads: bytes, index: bytes, source: bytes | memoryview,
                 count: int, nbytes: int, ops: dict[int, int]) -> None:
        self.fmt, self.heads, self.index, self.source = fmt, heads, index, source
        self.count, self.nbytes, self.ops = count, nbytes, ops

    @classmethod
    def of_frames(cls, frames: Iterable[LiveFrame], fmt: int = PCAP) -> LiveBatch:
        """A batch from frames one by one (the ``recvmsg`` reader, tests), framed by pcapio."""
        parts_of = _RECORD_PARTS[fmt]
        heads: list[bytes | memoryview] = []
        datas: list[bytes | memoryview] = []
        index = bytearray()
        ops: dict[int, int] = {}
        end = at = count = 0
        for ts, data, orig in frames:
            head, _data, *tail = parts_of(ts, data, orig)
            end += len(head) + len(data) + sum(map(len, tail))
            index += _INDEX.pack(ts, end, at, len(data), orig)
            heads += (head, *tail)
            datas.append(data)
            at += len(data)
            count += 1
            if len(data) >= _HDRS_LEN:
                op = _OP.unpack_from(data, _OP_OFFSET)[0]
                ops[op] = ops.get(op, 0) + 1
        return cls(fmt, b"".join(heads), bytes(index), b"".join(datas), count, at, ops)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[LiveFrame]:
        view = memoryview(self.source)
        for ts, _end, at, cap, orig in _INDEX.iter_unpack(self.index):
            yield LiveFrame(ts, view[at:at + cap], orig)

    def record_ends(self) -> Sequence[int]:
        """Where each frame's record ends in the output."""
        return memoryview(self.index).cast("Q")[1::5]

    def write_to(self, fd: int, first: int = 0, last: int | None = None) -> None:
        """Write the records of frames ``first`` … ``last - 1`` (all by default)."""
        assert _ring is not None, "checked when the sink was made"
        _ring.writev(fd, self.fmt, self.heads, self.source, self.index, first,
                     self.count if last is None else last)


_NO_FRAMES = LiveBatch(PCAP, b"", b"", b"", 0, 0, {})


# -- stopping -----------------------------------------------------------------------------------


class Stop:
    """Why a capture should stop, set by a signal handler or by the code itself.

    The handlers only record the signal and wake the poll through a pipe
    (``signal.set_wakeup_fd``): the loop stops between batches, never inside a write. A
    second signal sets :attr:`urgent`: stop now, without draining what the kernel holds.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self.urgent = False
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
        if self.reason is not None:
            self.urgent = True
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

    Each block becomes a :class:`LiveBatch` in one call to the compiled ``_ring.block`` (no
    Python work per frame) whose frames stay in the ring; the block goes back to the kernel
    at the next :meth:`drain`, once the batch is written. One block at a time, as libpcap
    does: holding several while writing them would leave the kernel no room.
    """

    def __init__(self, sock: socket.socket, buffer_bytes: int) -> None:
        _need_ring()
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
        self.held: int | None = None
        self.damaged = 0
        """Blocks whose numbers did not add up (never seen from a real kernel)."""

    def _release(self) -> None:
        if self.held is not None:
            _U32.pack_into(self.map, self.held + _BLOCK_STATUS_OFF, TP_STATUS_KERNEL)
            self.held = None

    def drain(self, fmt: int, limit: int) -> LiveBatch | None:
        """The next block the kernel has handed over (at most ``limit`` of its frames), or
        None; the previous one goes back to the kernel first."""
        self._release()
        base = self.current * BLOCK_SIZE
        if not _U32.unpack_from(self.map, base + _BLOCK_STATUS_OFF)[0] & TP_STATUS_USER:
            return None
        assert _ring is not None
        block = self.view[base:base + BLOCK_SIZE]
        heads, index, ops, count, nbytes, damaged = _ring.block(block, fmt, limit, _OP_OFFSET,
                                                                _HDRS_LEN)
        self.held = base
        self.current = (self.current + 1) % self.blocks
        self.damaged += damaged
        return LiveBatch(fmt, heads, index, block, count, nbytes, ops)

    def close(self) -> None:
        self.view.release()
        with suppress(BufferError):  # a consumer still holds a frame: the GC unmaps later
            self.map.close()


class _RecvReader:
    """Frames by non-blocking ``recvmsg_into``, up to :data:`RECV_BATCH` per wake-up.

    Frames are received into one preallocated arena and framed into a :class:`LiveBatch`.
    Works on any datagram socket (the tests feed it a socketpair); on a packet socket the
    kernel's timestamp and original length come as control messages.
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
        self.damaged = 0
        sock.setblocking(False)
        if sock.family == socket.AF_PACKET:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)

    def drain(self, fmt: int, limit: int) -> LiveBatch | None:
        out: list[LiveFrame] = []
        recvmsg_into, arena, bufsize, ancsize = (self.sock.recvmsg_into, self.arena,
                                                 self.bufsize, self.ancsize)
        pos, end, most = 0, len(arena) - bufsize, min(RECV_BATCH, limit)
        while len(out) < most and pos <= end:
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
        return LiveBatch.of_frames(out, fmt) if out else None

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
                 buffer_bytes: int = DEFAULT_BUFFER, use_mmap: bool = True,
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
        self.record_format = PCAP
        """How batches frame their records: the file sink's format (:data:`PCAPNG` …)."""
        self.delivered = 0
        """Frames handed out by :meth:`batches` so far."""
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

    def batches(self, count: int | None = None) -> Iterator[LiveBatch]:
        """Batches until ``count`` frames, a stop (signal, :attr:`deadline`, the link's end).

        An empty batch comes when a tick passes without frames (callers refresh a status
        line). After a stop other than the count, the frames the kernel had already taken
        are drained first (:meth:`_drain_on_stop`); then a link that went away raises.
        """
        assert self.sock is not None and self._reader is not None, "open() first"
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        poller.register(self.stop.fileno(), select.POLLIN)
        sock_fd = self.sock.fileno()
        gone: str | None = None
        while self.stop.reason is None:
            batch = self._next(count)
            if batch is not None:
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
                    gone = self._why_gone()
                    self.stop.request("link gone")
            yield _NO_FRAMES
        if self.stop.reason != "count":
            yield from self._drain_on_stop(count)
        if gone is not None:
            raise LiveCaptureError(f"{self.ifname} went away while capturing ({gone}); "
                                   "what was captured until then is written")
        if self._reader.damaged:
            raise LiveCaptureError(f"{self._reader.damaged} ring block(s) from the kernel did "
                                   "not add up; the frames before the damage are written")

    def _next(self, count: int | None) -> LiveBatch | None:
        """The next batch the kernel has ready (cut to what ``count`` still allows)."""
        assert self._reader is not None
        left = -1 if count is None else count - self.delivered
        batch = self._reader.drain(self.record_format, left if left >= 0 else 1 << 62)
        if batch is None:
            return None
        self.delivered += batch.count
        if count is not None and self.delivered >= count:
            self.stop.request("count")
        return batch

    def _drain_on_stop(self, count: int | None) -> Iterator[LiveBatch]:
        """Everything the kernel delivered before the stop, within :data:`STOP_GRACE_S`.

        The filter is first swapped for one that takes nothing, so the frames to drain are
        a fixed set the kernel has counted. A partly filled ring block is handed over only
        when its timer (:data:`BLOCK_TIMEOUT_MS`) fires, so this waits for it; what the
        kernel has not handed over after :data:`STOP_GRACE_S` without a new block shows in
        the summary as lost at stop. (Without kernel counts — a socketpair — it drains for
        at most the grace period.)
        """
        self._cut()
        stats = self.kernel_stats()
        target = None if stats is None else stats[0] - stats[1]
        give_up = time.monotonic() + STOP_GRACE_S
        while not self.stop.urgent and time.monotonic() < give_up:
            if count is not None and self.delivered >= count:
                return
            batch = self._next(count)
            if batch is not None:
                yield batch
                if target is not None:  # a known, finite set: the grace is for the kernel,
                    give_up = time.monotonic() + STOP_GRACE_S  # not for our own writing
            elif target is None or self.delivered >= target:
                return
            else:
                time.sleep(0.01)

    def _cut(self) -> None:
        """Stop the kernel from delivering more frames to this socket."""
        if self.sock is not None and self.sock.family == socket.AF_PACKET:
            with suppress(bpf.BpfFilterError):  # then frames after the stop may be read too
                bpf.attach(self.sock, bpf.REJECT_ALL)

    def _why_gone(self) -> str:
        """The socket reports an error: the link was deleted (or went down) under us."""
        assert self.sock is not None
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        return os.strerror(code) if code else "socket error"

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """``(ts_ns, frame bytes)`` one at a time: the hook for live analyses."""
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
                 buffer_bytes: int = DEFAULT_BUFFER, use_mmap: bool = True
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


def _write_all(fd: int, data: bytes | memoryview, name: str) -> None:
    """Write all of ``data`` however the kernel splits the write; a closed pipe stops the
    capture quietly, any other failure in one line."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BrokenPipeError:
        raise OutputClosed() from None
    except OSError as e:
        raise LiveCaptureError(_write_failed(name, e)) from None


def _write_failed(name: str, e: OSError, packets: int | None = None) -> str:
    """One line naming the file and the kernel's reason ("no space left on device")."""
    reason = (e.strerror or str(e)).lower()
    text = f"{'standard output' if name == '-' else name}: cannot write: {reason}"
    if packets is not None:
        text += f"; the file ends with its last whole packet ({packets} packets)"
    return text


def _offset(fd: int) -> int | None:
    """The file position, or None for a pipe or a terminal (nothing to cut back)."""
    try:
        return os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None


CAPTURE_MODE = 0o600
"""A capture file's permission bits: payloads can hold secrets (keys, tokens, the guest's
traffic), so only its owner reads it unless ``--umask`` says otherwise."""


def capture_mode(umask: int | None) -> int:
    """The mode of the capture files: :data:`CAPTURE_MODE`, or 0666 less an explicit umask
    (``--umask 022``: 0644, as tcpdump's files under the usual umask)."""
    return CAPTURE_MODE if umask is None else 0o666 & ~umask


def ring_paths(path: str, files: int | None) -> list[str]:
    """The names of a ring of ``files`` capture files (FILE.0 …), or ``[path]``."""
    return [path] if files is None else [f"{path}.{i}" for i in range(files)]


_END_BLOCK = pcapio.PcapngWriter.statistics_block(0)
"""A pcapng file's last block (when the capture stopped), for its length."""


class FileSink:
    """Writes frames to a pcap or pcapng file (by extension) or stdout (``-``).

    With ``rotate_bytes``, a new file starts when the current one would pass that size:
    ``FILE.0``, ``FILE.1`` … and, with ``files``, the ring wraps and overwrites the oldest
    (tcpdump's ``-C``/``-W``). Every batch is flushed, so the file is valid after a kill.
    """

    def __init__(self, path: str, force: bool = False, snaplen: int = bpf.DEFAULT_SNAPLEN,
                 rotate_bytes: int | None = None, files: int | None = None,
                 mode: int = CAPTURE_MODE) -> None:
        self.check(path, force, snaplen, rotate_bytes, files)
        self.path, self.snaplen, self.mode = path, snaplen, mode
        self.rotate_bytes, self.files = rotate_bytes, files
        self.index = 0
        self.written: list[str] = []
        self.end_ns: int | None = None
        """When the last file closed: the end a pcapng file records (None before)."""
        self.deleted: list[str] = []
        """Files removed while being written: like tcpdump, the capture writes on into the
        open file (its packets are gone with it); the command warns at the end."""
        self._open(force)

    @staticmethod
    def check(path: str, force: bool = False, snaplen: int = bpf.DEFAULT_SNAPLEN,
              rotate_bytes: int | None = None, files: int | None = None,
              mode: int = CAPTURE_MODE) -> None:
        """Raise :class:`LiveCaptureError` for options that cannot work or files that would be
        overwritten without ``force`` — before anything (the link) is changed. Takes the
        constructor's arguments (``mode`` too, unchecked) so one set serves both."""
        _need_ring()
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
            self.fp = pcapio.create_output(path, force, self.mode)
        except pcapio.CaptureError as e:
            raise LiveCaptureError(str(e)) from None
        self.fd = self.fp.fileno()
        # The header goes out now: a capture killed before its first frame leaves a valid,
        # empty file. pcapio writes it; the records come framed by the reader.
        header = io.BytesIO()
        writer = pcapio.writer_for(self.path, header, snaplen=self.snaplen)
        self.record_format = PCAPNG if isinstance(writer, pcapio.PcapngWriter) else PCAP
        _write_all(self.fd, header.getvalue(), path)
        # the statistics block a pcapng file ends with counts against the file's size
        self.size = header.tell() + (len(_END_BLOCK) if self.records_end else 0)
        self.in_file = 0
        if path not in self.written:
            self.written.append(path)

    def _rotate(self) -> None:
        self._close_file()
        self.index += 1
        if self.files is not None:
            self.index %= self.files
        self._open(force=True)  # our own earlier file of the ring, or a checked name

    def write(self, batch: LiveBatch) -> None:
        """The batch's records in one write (a few when the file rotates inside it)."""
        if batch.fmt != self.record_format:
            raise ValueError("batch framed for another file format")
        if self.rotate_bytes is None:
            self._records(batch, 0, batch.count)
            self.in_file += batch.count
            return
        ends = batch.record_ends()
        i, start = 0, 0
        while i < batch.count:
            # the records that still fit in this file
            j = bisect.bisect_right(ends, start + self.rotate_bytes - self.size, i, batch.count)
            if j == i:
                if self.in_file:
                    self._rotate()
                    continue
                j = i + 1  # a record larger than a whole file goes alone into a fresh one
            stop = ends[j - 1]
            self._records(batch, i, j)
            self.size += stop - start
            self.in_file += j - i
            i, start = j, stop

    def _records(self, batch: LiveBatch, first: int, last: int) -> None:
        start = _offset(self.fd)
        try:
            batch.write_to(self.fd, first, last)
        except BrokenPipeError:
            raise OutputClosed() from None
        except OSError as e:  # a full disk, a quota, an I/O error
            kept = self._keep_whole(batch, first, last, start)
            raise LiveCaptureError(_write_failed(
                self._current_path(), e, None if kept is None else self.in_file + kept)
            ) from None

    def _keep_whole(self, batch: LiveBatch, first: int, last: int,
                    start: int | None) -> int | None:
        """After a failed write, cut the file back to the end of its last whole record, so
        every reader takes it as a complete capture (a half record reads as a corrupt one);
        returns how many of the batch's records it keeps (None: a pipe, nothing cut)."""
        end = _offset(self.fd)
        if start is None or end is None:
            return None
        ends = batch.record_ends()
        base = ends[first - 1] if first else 0
        kept = bisect.bisect_right(ends, base + end - start, first, last) - first
        with suppress(OSError):  # truncating never needs space; a failure leaves the tail
            os.ftruncate(self.fd, start + (ends[first + kept - 1] - base if kept else 0))
        return kept

    @property
    def records_end(self) -> bool:
        """Whether the file says when the capture stopped: a pcapng one does (an interface
        statistics block written at close), classic pcap cannot."""
        return self.record_format == PCAPNG

    def _close_file(self) -> None:
        self.end_ns = time.time_ns()
        if self.records_end:  # the capture's end, after its last packet
            # a reader gone or a full disk: the file stays valid without it
            with suppress(OutputClosed, LiveCaptureError):
                _write_all(self.fd, pcapio.PcapngWriter.statistics_block(self.end_ns),
                           self._current_path())
        if self.fp is not sys.stdout.buffer:
            with suppress(OSError):
                if os.fstat(self.fd).st_nlink == 0:
                    self.deleted.append(self._current_path())
            self.fp.close()

    def close(self) -> None:
        self._close_file()


_MON = VSOCKMON_HEADER.struct
_VIRTIO = VIRTIO_HEADER.struct


def format_frame(ts_ns: int, data: bytes | memoryview) -> str:
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
        if not batch:
            return
        try:
            self.out.write("".join(format_frame(f.ts_ns, f.data) + "\n" for f in batch))
            self.out.flush()
        except BrokenPipeError:
            raise OutputClosed() from None

    def close(self) -> None:
        pass


# -- statistics -----------------------------------------------------------------------------------


class CaptureStats:
    """What was written (packets, bytes, per-op counts) against what the kernel saw.

    After :meth:`finish`, the frames the kernel delivered but the capture did not write are
    counted as lost at stop — except after ``-c`` or a closed output, where leaving them is
    what was asked.
    """

    def __init__(self) -> None:
        self.packets = 0
        self.bytes = 0
        self.ops: dict[int, int] = {}
        self.kernel: tuple[int, int] | None = None
        self.stopped: str | None = None
        self.started = time.monotonic()

    def add(self, batch: LiveBatch) -> None:
        ops = self.ops
        for op, n in batch.ops.items():
            ops[op] = ops.get(op, 0) + n
        self.bytes += batch.nbytes
        self.packets += batch.count

    def finish(self, reason: str, kernel: tuple[int, int] | None) -> None:
        self.stopped, self.kernel = reason, kernel

    @property
    def lost_at_stop(self) -> int:
        if self.kernel is None or self.stopped in (None, "count", "output closed"):
            return 0
        seen, drops = self.kernel
        return max(0, seen - drops - self.packets)

    @property
    def lost(self) -> int:
        """Frames the kernel saw that are not in the output: its drops and the stop's."""
        return (self.kernel[1] if self.kernel else 0) + self.lost_at_stop

    def op_counts(self) -> dict[str, int]:
        return {enum_name(Op, k): v for k, v in sorted(self.ops.items())}

    def line(self) -> str:
        """The status line: packets, bytes, per-op counts, kernel drops (and, once finished,
        the frames lost at the stop)."""
        ops = " ".join(f"{k} {v}" for k, v in self.op_counts().items())
        text = f"{self.packets} packets, {_human(self.bytes)}"
        if ops:
            text += f" ({ops})"
        if self.kernel is not None:
            seen, drops = self.kernel
            ratio = drops / seen * 100 if seen else 0.0
            text += f"; kernel: {seen} seen, {drops} dropped ({ratio:.2f}%)"
            if self.stopped is not None:
                text += f", {self.lost_at_stop} lost at stop"
        return text

    def loss_line(self) -> str | None:
        """A warning when the output misses frames the kernel saw, else None."""
        if not self.lost:
            return None
        assert self.kernel is not None
        parts = []
        if self.kernel[1]:
            parts.append(f"{self.kernel[1]} dropped by the kernel for want of buffer room "
                         "(raise -B)")
        if self.lost_at_stop:
            parts.append(f"{self.lost_at_stop} still unread when the stop's grace period "
                         f"({STOP_GRACE_S:g} s without a new block) ended")
        return f"warning: {self.lost} frames lost: " + ", ".join(parts)

    def as_dict(self) -> dict[str, object]:
        seen, drops = self.kernel or (None, None)
        return {"packets": self.packets, "bytes": self.bytes, "ops": self.op_counts(),
                "kernel_seen": seen, "kernel_drops": drops, "lost_at_stop": self.lost_at_stop,
                "lost": self.lost, "seconds": round(time.monotonic() - self.started, 3)}


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


# -- the loop -------------------------------------------------------------------------------------


def run(capture: LiveCapture, sink: FileSink | LineSink, stats: CaptureStats,
        count: int | None = None, on_tick: object = None, tick_s: float = TICK_S) -> str:
    """Move batches from ``capture`` to ``sink`` until a limit, a signal, the deadline or the
    link's end (having drained what the kernel already holds); returns why it stopped.
    ``on_tick(stats)`` is called at most every ``tick_s``."""
    capture.record_format = getattr(sink, "record_format", capture.record_format)
    last_tick = time.monotonic()
    try:
        for batch in capture.batches(count):
            if batch:
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
        reason = capture.stop.reason or "end"
        stats.finish(reason, capture.kernel_stats())
    return reason


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
