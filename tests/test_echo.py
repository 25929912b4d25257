"""The echo server and client on the host, over AF_UNIX sockets of the same types (the host's
vsock belongs to its infrastructure and is never touched; the lab tests run them on vsock):
verification, concurrency, SEQPACKET boundaries, abrupt peers, measurements, option errors."""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vsockmon.live import echo
from vsockmon.live.echo import ClientOptions, ClientReport, EchoError, EchoServer, WorkerResult

VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))
UNIX_TYPES = {"stream": socket.SOCK_STREAM, "seqpacket": socket.SOCK_SEQPACKET}


@pytest.fixture
def unix_server(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start an EchoServer on a Unix socket of the given kind; yields (server, connect)."""
    started: list[EchoServer] = []

    def start(kind: str, read_delay: float = 0.0, log=None):  # type: ignore[no-untyped-def]
        path = str(tmp_path / f"{kind}.sock")
        listener = socket.socket(socket.AF_UNIX, UNIX_TYPES[kind])
        listener.bind(path)
        listener.listen(16)
        srv = EchoServer(0, kind, read_delay=read_delay, sock=listener, log=log)
        threading.Thread(target=srv.serve, daemon=True).start()
        started.append(srv)

        def connect(opts: ClientOptions) -> socket.socket:
            s = socket.socket(socket.AF_UNIX, UNIX_TYPES[kind])
            s.settimeout(opts.timeout)
            s.connect(path)
            return s

        return srv, connect

    yield start
    for srv in started:
        srv.close()


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
def test_every_echoed_byte_is_verified(unix_server, kind: str) -> None:  # type: ignore[no-untyped-def]
    srv, connect = unix_server(kind)
    opts = ClientOptions(cid=1, port=9999, kind=kind, count=101, size=3000, concurrency=4)
    report = echo.run_client(opts, connect)
    assert report.ok and report.messages == 101 and report.mismatches == 0
    assert sorted(r.messages for r in report.results) == [25, 25, 25, 26]
    d = report.as_dict()
    assert d["bytes"] == 303000 and d["verified"] is True and d["errors"] == []
    assert 0 < d["latency_us"]["p50"] <= d["latency_us"]["p99"] <= d["latency_us"]["max"]
    assert srv.stats.connections == 4


def test_messages_larger_than_the_buffers_do_not_deadlock(unix_server) -> None:  # type: ignore[no-untyped-def]
    """Sending a whole message before reading its echo would block both sides for good."""
    _srv, connect = unix_server("stream", read_delay=0.001)
    report = echo.run_client(ClientOptions(1, 1, count=2, size=8 << 20, timeout=20), connect)
    assert report.ok, report.errors


def test_a_corrupting_server_is_caught(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def corrupt() -> None:
        with b:
            while data := b.recv(65536):
                b.sendall(data[:-1] + bytes([data[-1] ^ 1]))

    threading.Thread(target=corrupt, daemon=True).start()
    report = echo.run_client(ClientOptions(1, 1, count=5, size=10, timeout=5), lambda o: a)
    assert report.mismatches == 5 and not report.ok
    assert "NO (5 bad)" in echo.format_report(report)


def test_the_server_survives_peers_that_vanish(unix_server) -> None:  # type: ignore[no-untyped-def]
    srv, connect = unix_server("stream")
    opts = ClientOptions(1, 1, count=1, size=10)
    for _ in range(3):
        s = connect(opts)
        s.sendall(b"x" * 100_000)  # more than it will read back
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        s.close()  # abortive close mid-echo
    report = echo.run_client(ClientOptions(1, 1, count=20, size=64), connect)
    assert report.ok and srv.stats.connections == 4


def _served(srv: EchoServer, connections: int) -> dict:
    """The server's counts once ``connections`` connections have come and gone."""
    deadline = time.monotonic() + 10
    while srv.stats.connections < connections or srv.stats.active:
        assert time.monotonic() < deadline, srv.stats
        time.sleep(0.01)
    return srv.stats.as_dict()


HELLO = b"Hello, world!"


def test_a_client_that_sends_and_closes_is_counted(unix_server) -> None:  # type: ignore[no-untyped-def]
    """The seed's client: connect, send "Hello, world!", close without reading. The server
    reads only after the client has gone (read_delay), so every echo bounces."""
    lines: list[str] = []
    srv, connect = unix_server("stream", read_delay=0.2, log=lines.append)
    for _ in range(3):
        with connect(ClientOptions(1, 1)) as s:
            s.sendall(HELLO)
    stats = _served(srv, 3)
    assert (stats["connections"], stats["bytes"], stats["messages"]) == (3, 3 * len(HELLO), 3)
    assert stats["echoed"] == 0 and stats["resets"] == 0
    assert stats["clients"] == [
        {"peer": f"#{i}", "received": 13, "echoed": 0, "reads": 1, "end": "left"}
        for i in (1, 2, 3)]
    assert lines.count("#2 sent 13 bytes: b'Hello, world!'") == 1
    assert "#3 left before its echo could reach it: 13 bytes received, 0 echoed" in lines


def test_a_client_that_reads_its_echo_ends_in_order(unix_server) -> None:  # type: ignore[no-untyped-def]
    srv, connect = unix_server("stream")
    with connect(ClientOptions(1, 1)) as s:
        s.sendall(HELLO)
        assert s.recv(100) == HELLO
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    stats = _served(srv, 1)
    assert stats["clients"] == [
        {"peer": "#1", "received": 13, "echoed": 13, "reads": 1, "end": "eof"}]
    assert (stats["bytes"], stats["echoed"], stats["resets"]) == (13, 13, 0)


def test_the_totals_count_a_connection_still_open(unix_server) -> None:  # type: ignore[no-untyped-def]
    """Stopping the server mid-connection must not lose what that client already sent."""
    srv, connect = unix_server("stream")
    with connect(ClientOptions(1, 1)) as s:
        s.sendall(HELLO)
        assert s.recv(100) == HELLO  # read and echoed; the connection stays open
        deadline = time.monotonic() + 10
        while srv.stats.echoed < 13:  # the echo can reach us before the count is updated
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = srv.stats.as_dict()
    assert (stats["bytes"], stats["echoed"], stats["messages"], stats["resets"]) == (13, 13, 1, 0)
    assert stats["clients"] == [
        {"peer": "#1", "received": 13, "echoed": 13, "reads": 1, "end": "open"}]


def test_a_reset_before_any_data_is_the_only_abrupt_end(tmp_path: Path) -> None:
    """A TCP reset on loopback (SO_LINGER 0): the server code does not care which family
    its listening socket has. A reset with no byte read is abrupt; one after the client's
    bytes were read is a client leaving."""
    listener = socket.create_server(("127.0.0.1", 0))
    srv = EchoServer(0, "stream", read_delay=0.2, sock=listener)
    threading.Thread(target=srv.serve, daemon=True).start()
    try:
        for payload in (b"", HELLO):
            s = socket.create_connection(listener.getsockname())
            s.sendall(payload)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            _served(srv, 1 + bool(payload))
        stats = srv.stats.as_dict()
    finally:
        srv.close()
    first, second = stats["clients"]
    assert (first["received"], first["reads"], first["end"]) == (0, 0, "reset")
    assert (second["received"], second["echoed"], second["end"]) == (13, 0, "left")
    assert (stats["resets"], stats["bytes"]) == (1, 13)


def test_duration_and_rate_bound_the_run(unix_server) -> None:  # type: ignore[no-untyped-def]
    _srv, connect = unix_server("stream")
    report = echo.run_client(ClientOptions(1, 1, duration=0.5, rate=20, size=8), connect)
    assert report.ok and 5 <= report.messages <= 12
    assert 0.45 <= report.seconds < 2


def test_message_bytes_are_known_and_differ() -> None:
    m = echo.message(0, 0, 300)
    assert m[:3] == b"\0\1\2" and m[251:254] == b"\0\1\2" and len(m) == 300
    assert echo.message(0, 1, 10) == bytes(range(1, 11))
    assert echo.message(1, 0, 10) != echo.message(0, 0, 10)
    assert echo.message(0, 250, 3) == b"\xfa\0\1"


def test_percentiles_and_report_table() -> None:
    res = WorkerResult(messages=100, latencies_ns=[i * 1000 for i in range(1, 101)])
    report = ClientReport(ClientOptions(1, 9999, count=100, size=1000), 2.0, [res])
    d = report.as_dict()
    assert d["latency_us"] == {"p50": 50.0, "p99": 99.0, "max": 100.0}
    assert d["mb_per_s"] == 0.05 and d["msgs_per_s"] == 50.0
    table = echo.format_report(report)
    assert "latency p99  99.0 µs" in table and "yes, every byte" in table


def test_client_errors_are_counted_per_distinct_error(unix_server) -> None:  # type: ignore[no-untyped-def]
    """Of 30 connections, every third is refused and two more find their socket shut:
    two distinct errors with their counts, most frequent first."""
    _srv, connect = unix_server("stream")
    calls = iter(range(1000))
    lock = threading.Lock()

    def flaky(opts: ClientOptions) -> socket.socket:
        with lock:
            n = next(calls)
        if n % 3 == 0:
            raise EchoError("connect to 1:9999: reset (refused)")
        s = connect(opts)
        if n % 10 == 1:
            s.shutdown(socket.SHUT_RDWR)  # the exchange fails on a shut socket
        return s

    report = echo.run_client(ClientOptions(1, 9999, count=30, concurrency=30), flaky)
    refused, broken = 10, 2  # n % 3 == 0; n in (1, 11) (21 is refused first)
    assert report.failed == refused + broken and not report.ok
    assert list(report.errors.values()) == [refused, broken]
    assert next(iter(report.errors)) == "connect to 1:9999: reset (refused)"
    d = report.as_dict()
    assert d["failed_connections"] == 12 and [e["count"] for e in d["errors"]] == [10, 2]
    assert d["messages"] == 30 - 12
    assert "10 connections: connect to 1:9999: reset (refused)" in echo.format_report(report)


class FakeVsockSocket:
    """Records the options set on it; stands in for AF_VSOCK, never opened on the host."""

    def __init__(self) -> None:
        self.opts = {socket.SO_VM_SOCKETS_BUFFER_MIN_SIZE: 128,
                     socket.SO_VM_SOCKETS_BUFFER_MAX_SIZE: 262144}
        self.calls: list[tuple[int, int]] = []

    def getsockopt(self, level: int, opt: int) -> int:  # CPython: an int for AF_VSOCK
        return self.opts[opt]

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        assert level == socket.AF_VSOCK and isinstance(value, int)
        self.calls.append((opt, value))


@pytest.mark.parametrize(
    ("size", "expected"),
    [(1 << 20, [(2, 1 << 20), (1, 128), (0, 1 << 20)]),
     (64, [(2, 262144), (1, 64), (0, 64)])],
)
def test_buffer_size_widens_the_bounds_first(size: int, expected: list) -> None:
    fake = FakeVsockSocket()
    echo.set_buffer_size(fake, size)  # type: ignore[arg-type]
    assert fake.calls == expected  # MAX (2), MIN (1), then SIZE (0)


def test_no_datagram_transport_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dgram(family: int, kind: int) -> socket.socket:
        assert family == socket.AF_VSOCK
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(echo.socket, "socket", no_dgram)
    with pytest.raises(EchoError, match=r"no vsock datagram transport: socket\(AF_VSOCK, "
                                        r"SOCK_DGRAM\) failed with ENODEV"):
        echo.run_client(ClientOptions(1, 9999, kind="dgram"))
    with pytest.raises(EchoError, match="no vsock stream support here"):
        echo.open_socket("stream")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["client", "--port", "1"], "Missing option '--cid'"),
        (["client", "--cid", "1", "--type", "raw"], "'raw' is not one of"),
        (["client", "--cid", "1", "--size", "0"], "--size"),
        (["server", "--port", "-1"], "--port"),
    ],
)
def test_cli_option_errors(args: list[str], message: str) -> None:
    done = subprocess.run([VSOCKMON, "echo", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and message in done.stderr
