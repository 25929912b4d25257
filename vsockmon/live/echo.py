"""An echo server and a measuring echo client over vsock: traffic to capture and to test with.

The client sends messages whose every byte is known (:func:`message`), checks that each comes
back unchanged, and measures throughput, messages per second and round-trip latency. The
server echoes STREAM bytes, SEQPACKET messages and DGRAM datagrams for many clients at once
(a thread each), survives peers that vanish mid-message, and can read slowly
(``read_delay``) or with a small buffer to provoke credit stalls for fixtures.

Stays cheap to import (stdlib only): in the lab VM every import costs seconds.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

from vsockmon.errors import VsockmonError
from vsockmon.wire.protocol import VMADDR_CID_ANY

TYPES = {
    "stream": socket.SOCK_STREAM,
    "seqpacket": socket.SOCK_SEQPACKET,
    "dgram": socket.SOCK_DGRAM,
}
MAX_MESSAGE = 1 << 20
"""Largest SEQPACKET message or datagram the server echoes whole."""
STREAM_CHUNK = 64 << 10
"""What one STREAM read takes: a byte stream has no message to keep whole, and the buffer is
held per connection, so 1,000 clients cost 64 MiB of buffers, not a GiB."""
DEFAULT_BACKLOG = socket.SOMAXCONN
"""The listener's accept queue (``listen``'s backlog; Linux caps it at net.core.somaxconn,
4096 by default). When the queue is full the kernel answers a REQUEST with RST
(``sk_acceptq_is_full`` in ``virtio_transport_recv_listen``), which a client cannot tell from
"nothing listens": with the former backlog of 128, 1,000 simultaneous clients got 116
such resets in the lab."""
THREAD_STACK = 256 << 10
"""Stack of each connection's thread (set by the commands with ``threading.stack_size``,
a process-wide setting): its loop is shallow, and 8 MiB each (the default) is 8 GiB of
address space for 1,000 clients."""
_PATTERN_PERIOD = 251  # prime: consecutive messages start at different pattern offsets


class EchoError(VsockmonError):
    """A failure to report in one line (no vsock, refused connection, bad echo …)."""


def message(worker: int, index: int, size: int) -> bytes:
    """The bytes of message ``index`` of connection ``worker``: a shifted 0…250 ramp, so a
    lost, repeated or reordered chunk shows, and tests can rebuild every sent byte."""
    start = (worker * 7919 + index) % _PATTERN_PERIOD
    reps = (start + size) // _PATTERN_PERIOD + 1
    return (bytes(range(_PATTERN_PERIOD)) * reps)[start:start + size]


def open_socket(kind: str) -> socket.socket:
    """An AF_VSOCK socket of ``kind`` (stream, seqpacket, dgram), with one-line errors."""
    try:
        return socket.socket(socket.AF_VSOCK, TYPES[kind])
    except OSError as e:
        if e.errno == errno.ENODEV and kind == "dgram":
            raise EchoError("this kernel has no vsock datagram transport: socket(AF_VSOCK, "
                            "SOCK_DGRAM) failed with ENODEV; use --type stream or seqpacket"
                            ) from None
        if e.errno in (errno.EAFNOSUPPORT, errno.ENODEV):
            raise EchoError(f"no vsock {kind} support here ({e.strerror}): load vsock and a "
                            "transport (vsock_loopback, vmw_vsock_virtio_transport, "
                            "vhost_vsock)") from None
        raise EchoError(f"cannot create a vsock {kind} socket: {e.strerror}") from None


def set_buffer_size(sock: socket.socket, size: int) -> None:
    """Set the receive buffer (SO_VM_SOCKETS_BUFFER_SIZE) — what the peer sees as buf_alloc.

    The kernel clamps the size into [MIN, MAX], so widen those first. (Python passes vsock
    options as 64-bit integers: no byte strings here.)
    """
    level = socket.AF_VSOCK
    try:
        high = max(size, sock.getsockopt(level, socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE))
        sock.setsockopt(level, socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE, high)
        low = min(size, sock.getsockopt(level, socket.SO_VM_SOCKETS_BUFFER_MIN_SIZE))
        sock.setsockopt(level, socket.SO_VM_SOCKETS_BUFFER_MIN_SIZE, low)
        sock.setsockopt(level, socket.SO_VM_SOCKETS_BUFFER_SIZE, size)
    except OSError as e:
        raise EchoError(f"cannot set the vsock buffer size to {size}: {e.strerror or e}"
                        ) from None


_SO_VM_SOCKETS_CONNECT_TIMEOUT = 6  # level AF_VSOCK, a struct timeval


def set_connect_timeout(sock: socket.socket, seconds: float) -> None:
    """Let a vsock connect wait ``seconds`` instead of Linux's 2 s (a nested guest under
    emulation answers later than that).

    Python's setsockopt sends every AF_VSOCK value as a u64; the option takes a struct
    timeval, so it goes through libc (ctypes is imported here only: it costs time in the
    lab VM, and only connecting needs it).
    """
    import ctypes
    import struct

    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setsockopt(sock.fileno(), socket.AF_VSOCK, _SO_VM_SOCKETS_CONNECT_TIMEOUT,
                       timeval, len(timeval)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setsockopt SO_VM_SOCKETS_CONNECT_TIMEOUT: {os.strerror(err)}")


def addr_text(cid: int, port: int) -> str:
    return f"{'ANY' if cid == VMADDR_CID_ANY else cid}:{port}"


# -- server ---------------------------------------------------------------------------------------


@dataclass
class ConnectionRecord:
    """What one client sent and how it went: the server's answer to "did my bytes arrive?".

    ``end`` is ``eof`` (the client shut down its side in order, every echo sent), ``left``
    (it went away — closed or reset — after its data was read, while an echo could no
    longer reach it: the usual shape of a client that sends and closes) or ``reset`` (a
    reset before any of its data was read: the only end counted as abrupt).
    """

    peer: str
    received: int = 0
    echoed: int = 0
    reads: int = 0
    end: str = "open"

    def as_dict(self) -> dict[str, object]:
        return {"peer": self.peer, "received": self.received, "echoed": self.echoed,
                "reads": self.reads, "end": self.end}


@dataclass
class ServerStats:
    connections: int = 0
    active: int = 0
    bytes: int = 0
    """Bytes received (whether or not their echo reached the client), counted as read:
    the totals include connections still open when the server stops."""
    echoed: int = 0
    messages: int = 0
    resets: int = 0
    clients: list[ConnectionRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict[str, object]:
        with self.lock:
            return {"connections": self.connections, "bytes": self.bytes,
                    "echoed": self.echoed, "messages": self.messages,
                    "resets": self.resets,
                    "clients": [c.as_dict() for c in self.clients]}


Log = Callable[[str], None]
_END_TEXT = {
    "eof": "closed",
    "left": "left before its echo could reach it",
    "reset": "reset before sending anything",
    "open": "still open",
}


def peer_text(peer: object, index: int) -> str:
    """A client as the server names it: ``CID:PORT`` for vsock, ``#N`` otherwise (the
    tests' AF_UNIX peers have no address)."""
    if isinstance(peer, tuple) and len(peer) == 2:
        return f"{peer[0]}:{peer[1]}"
    return f"#{index}"


def shown_bytes(data: bytes | memoryview, limit: int = 64) -> str:
    """Received bytes as the seed's server prints them (Python's ``bytes`` repr), cut to
    ``limit`` bytes so a bulk transfer does not flood the terminal."""
    text = repr(bytes(data[:limit]))
    return text + (f" … (+{len(data) - limit} bytes)" if len(data) > limit else "")


class EchoServer:
    """Echoes everything back. Bind and listen in the constructor (errors surface at once),
    then :meth:`serve` until :meth:`close` or an exception (KeyboardInterrupt) in the caller.

    ``log`` (``-v``) hears every read's bytes and every connection's end.
    """

    def __init__(self, port: int, kind: str = "stream", cid: int = VMADDR_CID_ANY,
                 buffer_size: int | None = None, read_delay: float = 0.0,
                 sock: socket.socket | None = None, log: Log | None = None,
                 backlog: int = DEFAULT_BACKLOG) -> None:
        self.kind, self.read_delay, self.log = kind, read_delay, log
        self.stats = ServerStats()
        if sock is not None:  # already bound and listening (the tests' AF_UNIX sockets)
            self.sock, self.port = sock, port
            return
        self.sock = open_socket(kind)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if buffer_size is not None:
                set_buffer_size(self.sock, buffer_size)  # accepted sockets inherit it
            self.sock.bind((cid, port))
            if kind != "dgram":
                self.sock.listen(backlog)
        except OSError as e:
            self.sock.close()
            raise EchoError(f"cannot listen on vsock {addr_text(cid, port)} ({kind}): "
                            f"{e.strerror}") from None
        except EchoError:
            self.sock.close()
            raise
        self.port = self.sock.getsockname()[1]

    def serve(self) -> None:
        """Accept until closed. The loop does nothing but accept and hand over: every
        connection gets its own thread at once, so the accept queue drains as fast as
        clients arrive and a slow or stuck client never holds up the next one."""
        if self.kind == "dgram":
            self._serve_datagrams()
            return
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError as e:
                if self.sock.fileno() < 0:  # closed by close()
                    return
                if e.errno in (errno.ECONNABORTED, errno.EINTR):
                    continue
                raise EchoError(f"accept failed: {e.strerror}") from None
            with self.stats.lock:
                self.stats.connections += 1
                self.stats.active += 1
                record = ConnectionRecord(peer_text(peer, self.stats.connections))
                self.stats.clients.append(record)
            threading.Thread(target=self._echo, args=(conn, record), daemon=True).start()

    def _echo(self, conn: socket.socket, record: ConnectionRecord) -> None:
        """Read until the client is done, echoing while it still listens.

        Every byte is counted when it is read, before its echo: a client that sends and
        closes (the seed's programs) has sent its bytes even though its echo bounces. Once
        an echo fails the server keeps reading, only to count what else arrives.
        """
        seqpacket = self.kind == "seqpacket"
        buf = bytearray(MAX_MESSAGE if seqpacket else STREAM_CHUNK)
        view = memoryview(buf)
        echoing = True
        try:
            while True:
                if self.read_delay:
                    time.sleep(self.read_delay)
                n = conn.recv_into(buf)
                if not n:
                    record.end = "eof" if echoing else "left"
                    break
                with self.stats.lock:
                    record.received += n
                    record.reads += 1
                    self.stats.bytes += n
                    self.stats.messages += 1
                if self.log:
                    self.log(f"{record.peer} sent {n} bytes: {shown_bytes(view[:n])}")
                if echoing:
                    echoing = self._send_echo(conn, view[:n], seqpacket)
                    if echoing:
                        with self.stats.lock:
                            record.echoed += n
                            self.stats.echoed += n
        except OSError:  # reset, timeout: the peer went away abruptly
            record.end = "left" if record.received else "reset"
        finally:
            conn.close()
            self._finish(record)

    @staticmethod
    def _send_echo(conn: socket.socket, data: memoryview, seqpacket: bool) -> bool:
        """Echo ``data``; False when the client no longer takes it (closed, reset)."""
        try:
            if seqpacket:
                conn.send(data)
            else:
                conn.sendall(data)
        except OSError:
            return False
        return True

    def _finish(self, record: ConnectionRecord) -> None:
        with self.stats.lock:
            self.stats.active -= 1
            self.stats.resets += record.end == "reset"
        if self.log:
            self.log(f"{record.peer} {_END_TEXT[record.end]}: {record.received} bytes "
                     f"received, {record.echoed} echoed")

    def _serve_datagrams(self) -> None:
        buf = bytearray(MAX_MESSAGE)
        while True:
            try:
                n, peer = self.sock.recvfrom_into(buf)
                self.sock.sendto(memoryview(buf)[:n], peer)
            except OSError:
                if self.sock.fileno() < 0:
                    return
                continue
            with self.stats.lock:
                self.stats.bytes += n
                self.stats.echoed += n
                self.stats.messages += 1

    def close(self) -> None:
        self.sock.close()


# -- client ---------------------------------------------------------------------------------------


@dataclass
class ClientOptions:
    cid: int
    port: int
    kind: str = "stream"
    count: int | None = None
    """Messages in total over all connections (None: until ``duration``)."""
    size: int = 64
    concurrency: int = 1
    duration: float | None = None
    rate: float | None = None
    """Messages per second over all connections (None: as fast as possible)."""
    buffer_size: int | None = None
    timeout: float = 10.0
    eor: bool = False
    """SEQPACKET: send with MSG_EOR (the packets then also carry SEQ_EOR)."""


@dataclass
class WorkerResult:
    messages: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    mismatches: int = 0
    error: str | None = None


@dataclass
class ClientReport:
    options: ClientOptions
    seconds: float
    results: list[WorkerResult]

    @property
    def messages(self) -> int:
        return sum(r.messages for r in self.results)

    @property
    def mismatches(self) -> int:
        return sum(r.mismatches for r in self.results)

    @property
    def errors(self) -> dict[str, int]:
        """Failed connections per distinct error, most frequent first: under load hundreds
        of connections fail alike, and a list of hundreds of equal lines hides the rare
        one that differs."""
        counts: dict[str, int] = {}
        for r in self.results:
            if r.error:
                counts[r.error] = counts.get(r.error, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @property
    def failed(self) -> int:
        """Connections that ended in an error."""
        return sum(1 for r in self.results if r.error)

    @property
    def ok(self) -> bool:
        return not self.errors and not self.mismatches and self.messages > 0

    def as_dict(self) -> dict[str, object]:
        lat = sorted(x for r in self.results for x in r.latencies_ns)
        sent = self.messages * self.options.size
        secs = self.seconds or 1e-9
        return {
            "type": self.options.kind,
            "cid": self.options.cid,
            "port": self.options.port,
            "connections": self.options.concurrency,
            "size": self.options.size,
            "messages": self.messages,
            "bytes": sent,
            "seconds": round(self.seconds, 6),
            "mb_per_s": round(sent / secs / 1e6, 3),
            "msgs_per_s": round(self.messages / secs, 1),
            "latency_us": {
                "p50": _percentile_us(lat, 50),
                "p99": _percentile_us(lat, 99),
                "max": round(lat[-1] / 1000, 1) if lat else None,
            },
            "verified": self.mismatches == 0 and self.messages > 0,
            "mismatches": self.mismatches,
            "failed_connections": self.failed,
            "errors": [{"error": e, "count": n} for e, n in self.errors.items()],
        }


def _percentile_us(sorted_ns: list[int], pct: float) -> float | None:
    """Nearest-rank percentile (no statistics import: it is slow to import in the lab)."""
    if not sorted_ns:
        return None
    rank = max(1, -(-len(sorted_ns) * pct // 100))
    return round(sorted_ns[int(rank) - 1] / 1000, 1)


def connect_vsock(opts: ClientOptions) -> socket.socket:
    """A socket connected to ``opts.cid:opts.port``, with one-line errors."""
    sock = open_socket(opts.kind)
    try:
        if opts.buffer_size is not None:
            set_buffer_size(sock, opts.buffer_size)
        set_connect_timeout(sock, opts.timeout)
        sock.settimeout(opts.timeout)
        sock.connect((opts.cid, opts.port))
    except OSError as e:
        sock.close()
        where = addr_text(opts.cid, opts.port)
        if e.errno == errno.ECONNRESET:
            raise EchoError(f"connect to {where}: reset (nothing listens there, not with "
                            f"type {opts.kind}, or its accept queue is full)") from None
        if isinstance(e, TimeoutError) or e.errno == errno.ETIMEDOUT:
            raise EchoError(f"connect to {where}: timed out (is the peer's transport up?)"
                            ) from None
        raise EchoError(f"connect to {where}: {e.strerror or e}") from None
    except EchoError:
        sock.close()
        raise
    return sock


def _exchange(sock: socket.socket, poller: select.poll, msg: bytes, view: memoryview,
              size: int, timeout_ms: int) -> None:
    """Send ``msg`` and read ``size`` echoed bytes at the same time.

    Sending all before reading would deadlock once the message outgrows the buffers: the
    server blocks writing the echo into our full receive window while we block writing into
    its full one. The socket is non-blocking; poll only when neither side can move.
    """
    out = memoryview(msg)
    sent = got = 0
    while got < size:
        if sent < size:
            with suppress(BlockingIOError):
                sent += sock.send(out[sent:])
        try:
            n = sock.recv_into(view[got:size])
        except BlockingIOError:
            poller.modify(sock, select.POLLIN | (select.POLLOUT if sent < size else 0))
            if not poller.poll(timeout_ms):
                raise TimeoutError(f"no echo for {timeout_ms / 1000:g} s") from None
            continue
        if not n:
            raise EchoError(f"the server closed the connection after {got} of {size} bytes")
        got += n


Connect = Callable[[ClientOptions], socket.socket]


def _run_worker(worker: int, opts: ClientOptions, connect: Connect, quota: int | None,
                deadline: float | None, result: WorkerResult) -> None:
    size = opts.size
    buf = bytearray(max(size, 1) + 1)
    view = memoryview(buf)
    interval = opts.concurrency / opts.rate if opts.rate else 0.0
    stream = opts.kind == "stream"
    flags = socket.MSG_EOR if opts.eor else 0
    clock = time.perf_counter_ns
    try:
        sock = connect(opts)
    except EchoError as e:
        result.error = str(e)
        return
    timeout_ms = int(opts.timeout * 1000)
    poller = select.poll()
    if stream:
        sock.setblocking(False)
        poller.register(sock, select.POLLIN)
    try:
        next_at = time.monotonic()
        index = 0
        while quota is None or index < quota:
            if deadline is not None and time.monotonic() >= deadline:
                break
            if interval:
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                next_at += interval
            msg = message(worker, index, size)
            t0 = clock()
            if stream:
                _exchange(sock, poller, msg, view, size, timeout_ms)
                same = buf[:size] == msg
            else:
                sock.send(msg, flags)
                n = sock.recv_into(buf)
                same = n == size and buf[:n] == msg
            result.latencies_ns.append(clock() - t0)
            if not same:
                result.mismatches += 1
            result.messages += 1
            index += 1
        _close_cleanly(sock, stream, opts.timeout)
    except (OSError, EchoError) as e:
        text = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        # No connection number or message count in the text: equal failures aggregate.
        result.error = f"exchange failed: {text}"
    finally:
        sock.close()


def _close_cleanly(sock: socket.socket, stream: bool, timeout: float) -> None:
    """Half-close and wait for the server's EOF, so both sides see an orderly SHUTDOWN."""
    if not stream:
        return
    sock.settimeout(timeout)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(4096):
        pass


def run_client(opts: ClientOptions, connect: Connect = connect_vsock) -> ClientReport:
    """Run ``opts.concurrency`` connections at once and collect what they measured."""
    if opts.size < 1:
        raise EchoError("--size must be at least 1")
    if opts.count is None and opts.duration is None:
        opts.count = 10
    if opts.kind == "dgram" and connect is connect_vsock:
        open_socket("dgram").close()  # the kernel's answer, in one line, before threads
    quotas: list[int | None] = [None] * opts.concurrency
    if opts.count is not None:
        base, extra = divmod(opts.count, opts.concurrency)
        quotas = [base + (i < extra) for i in range(opts.concurrency)]
    results = [WorkerResult() for _ in range(opts.concurrency)]
    start = time.monotonic()
    deadline = start + opts.duration if opts.duration else None
    threads = [threading.Thread(target=_run_worker, daemon=True,
                                args=(i, opts, connect, quotas[i], deadline, results[i]))
               for i in range(opts.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(0.2)
    return ClientReport(opts, time.monotonic() - start, results)


def format_report(report: ClientReport) -> str:
    """The measurements as a small aligned table."""
    d = report.as_dict()
    lat = d["latency_us"]
    rows = [
        ("type", d["type"]),
        ("peer", f"{d['cid']}:{d['port']}"),
        ("connections", d["connections"]),
        ("messages", f"{d['messages']} x {d['size']} B"),
        ("seconds", f"{d['seconds']:.3f}"),
        ("throughput", f"{d['mb_per_s']:.3f} MB/s each way"),
        ("rate", f"{d['msgs_per_s']:.1f} msgs/s"),
        ("latency p50", f"{lat['p50']} µs"),  # type: ignore[index]
        ("latency p99", f"{lat['p99']} µs"),  # type: ignore[index]
        ("verified", "yes, every byte" if d["verified"] else f"NO ({d['mismatches']} bad)"),
    ]
    rows += [("error", e if n == 1 else f"{n} connections: {e}")
             for e, n in report.errors.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
