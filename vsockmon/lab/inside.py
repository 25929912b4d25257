"""Helpers for programs that run INSIDE the lab VM: fixture generators, lab test scripts.

Standard library only, and only what the helpers use: under emulation every import costs
15-30x. The lab puts the host's venv first on PATH, so ``python3`` in the VM imports this.

    add_link()
    with capture(Path("echo.pcap")):
        with vsock_socket() as s:
            s.connect((1, 5000))
"""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SETTLE = 1.5
"""Seconds between the traffic's end and stopping tcpdump. The kernel hands tcpdump a
partly filled ring block only after 1 s, and tcpdump exits on SIGINT without waiting for
it (its --immediate-mode dropped frames outright in the lab)."""
CONNECT_TIMEOUT = 60.0
"""Seconds a connect waits for its answer. Linux's default of 2 s expires when the nested
guest answers slowly under emulation on a busy host."""
_SO_VM_SOCKETS_CONNECT_TIMEOUT = 6  # level AF_VSOCK, a struct timeval


class IncompleteCapture(RuntimeError):
    """tcpdump wrote fewer frames than the link tapped."""


def add_link(name: str = "vsockmon0") -> None:
    """Creates the vsockmon link and brings it up (frames are tapped only while it is up)."""
    subprocess.run(["ip", "link", "add", "name", name, "type", "vsockmon"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)


def tapped(link: str = "vsockmon0") -> int:
    """Frames the link has passed so far: vsockmon counts every tapped frame as received."""
    return int(Path(f"/sys/class/net/{link}/statistics/rx_packets").read_text())


@contextmanager
def capture(path: Path, link: str = "vsockmon0", settle: float = SETTLE) -> Iterator[None]:
    """tcpdump on ``link`` writes ``path`` while the block runs; the file is complete after.

    Prints ``<file>: <n> frames``; raises IncompleteCapture when tcpdump missed frames
    (compared with the link's own counter), RuntimeError when tcpdump did not start.
    """
    proc = subprocess.Popen(
        ["tcpdump", "-i", link, "-Z", "root", "-w", str(path)], stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    while "listening on" not in (line := proc.stderr.readline()):  # the tap is open
        if not line:
            raise RuntimeError(f"tcpdump did not start (status {proc.wait()})")
    before = tapped(link)
    try:
        yield
        time.sleep(settle)
    finally:
        proc.send_signal(signal.SIGINT)
        summary = proc.stderr.read()
        proc.wait()
    captured = int(summary.split(" packets captured")[0].split()[-1])
    print(f"{path.name}: {captured} frames", flush=True)
    if captured != tapped(link) - before:
        raise IncompleteCapture(f"{path.name}: tcpdump got {captured} of {tapped(link) - before}")


def vsock_socket(
    kind: int = socket.SOCK_STREAM, connect_timeout: float = CONNECT_TIMEOUT
) -> socket.socket:
    """An AF_VSOCK socket whose connect waits ``connect_timeout`` seconds.

    Python's setsockopt sends every AF_VSOCK value as a u64; the connect timeout is a
    struct timeval, so it goes through libc.
    """
    sock = socket.socket(socket.AF_VSOCK, kind)
    seconds = int(connect_timeout)
    timeval = struct.pack("@ll", seconds, int((connect_timeout - seconds) * 1e6))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = sock.fileno()
    if libc.setsockopt(fd, socket.AF_VSOCK, _SO_VM_SOCKETS_CONNECT_TIMEOUT, timeval, 16) != 0:
        sock.close()
        raise OSError(ctypes.get_errno(), "setsockopt SO_VM_SOCKETS_CONNECT_TIMEOUT")
    return sock
