"""Helpers for programs that run INSIDE the lab VM: fixture generators, lab test scripts.

Standard library only, and only what the helpers use: under emulation every import costs
15-30x. The lab puts the host's venv first on PATH, so ``python3`` in the VM imports this.

    add_link()
    with capture(Path("echo.pcap")):
        with vsock_socket() as s:
            s.connect((1, 5000))
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vsockmon.live.echo import set_connect_timeout

SETTLE = 1.5
"""Seconds between the traffic's end and stopping tcpdump. The kernel hands tcpdump a
partly filled ring block only after 1 s, and tcpdump exits on SIGINT without waiting for
it (its --immediate-mode dropped frames outright in the lab)."""
CONNECT_TIMEOUT = 60.0
"""Seconds a connect waits for its answer. Linux's default of 2 s expires when the nested
guest answers slowly under emulation on a busy host."""


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
    """An AF_VSOCK socket whose connect waits ``connect_timeout`` seconds."""
    sock = socket.socket(socket.AF_VSOCK, kind)
    try:
        set_connect_timeout(sock, connect_timeout)
    except OSError:
        sock.close()
        raise
    return sock


MONITOR_PROMPT = b"(qemu) "


def guest_monitor(command: str, timeout: float = 300.0) -> str:
    """Runs one command on the nested guest's qemu monitor (HMP) and returns its output.

    The monitor is done when it prompts again: savevm and loadvm keep the guest stopped
    until then (seconds under nested emulation), so the call returns once the guest runs."""
    with socket.socket(socket.AF_UNIX) as m:
        m.settimeout(timeout)
        m.connect(os.environ["VSOCKMON_LAB_GUEST_MONITOR"])
        _until_prompt(m)
        m.sendall(command.encode() + b"\n")
        got = _until_prompt(m)
    # The monitor echoes the command line (with terminal escapes) before the output.
    return got.decode(errors="replace").split("\r\n", 1)[-1].strip()


def _until_prompt(m: socket.socket) -> bytes:
    got = b""
    while not got.endswith(MONITOR_PROMPT):
        chunk = m.recv(4096)
        if not chunk:
            raise ConnectionError("the qemu monitor closed the connection")
        got += chunk
    return got[: -len(MONITOR_PROMPT)]


RUN_SERVICE_OFFSET = 3
"""The nested guest's run service listens on its base port + 3 (``lab-guest.c``)."""
_EXIT_LINE = "vsockmon-lab-guest: exit "


class GuestProgram:
    """A static program the nested guest runs for the lab VM, through its run service.

    The program's stdout and stderr come back over the connection. It runs until it exits
    or :meth:`stop` kills it; either way :meth:`wait`/:meth:`stop` return its exit status
    and output. Start it with the guest's CID and base port from the environment::

        with GuestProgram(Path("seed_client"), ["2", "9999"]) as client:
            status, output = client.wait()
    """

    def __init__(self, program: Path, args: list[str], cid: int | None = None,
                 port: int | None = None, timeout: float = 300.0) -> None:
        cid = int(os.environ["VSOCKMON_LAB_GUEST_CID"]) if cid is None else cid
        port = int(os.environ["VSOCKMON_LAB_GUEST_PORT"]) if port is None else port
        data = program.read_bytes()
        self._output = b""
        self._sock = vsock_socket()
        try:
            self._sock.connect((cid, port + RUN_SERVICE_OFFSET))
            self._sock.settimeout(timeout)
            header = " ".join([str(len(data)), program.name, *args])
            self._sock.sendall(header.encode() + b"\n" + data)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> GuestProgram:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._sock.close()

    def read_until(self, text: str) -> str:
        """The output so far, once it holds ``text`` (a server's "listening" line)."""
        while text.encode() not in self._output:
            chunk = self._sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"the guest program ended without saying {text!r}: "
                                   f"{self._output.decode(errors='replace')}")
            self._output += chunk
        return self._output.decode(errors="replace")

    def wait(self) -> tuple[int, str]:
        """Its exit status and whole output, once it has exited."""
        while chunk := self._sock.recv(65536):
            self._output += chunk
        text = self._output.decode(errors="replace")
        output, sep, status = text.rpartition(_EXIT_LINE)
        if not sep:
            raise RuntimeError(f"the guest's run service gave no exit status: {text}")
        return int(status.split()[0]), output

    def stop(self) -> tuple[int, str]:
        """Kill it (a server), then return as :meth:`wait` does."""
        self._sock.shutdown(socket.SHUT_WR)
        return self.wait()
