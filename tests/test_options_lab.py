"""``capture --no-mmap``, ``capture -B`` and ``lab shell`` on the real kernels of the lab.

The capture checks read what the kernel says, not what vsockmon prints: the ring's size is
the length of the socket's mapping in ``/proc/PID/maps``; the receive buffer of a
``--no-mmap`` capture is ``getsockopt(SO_RCVBUF)`` on the capture's own socket, fetched from
the running process with ``pidfd_getfd``; the frame count is the link's ``rx_packets``.
``lab shell`` is driven through tmux, as a person at a terminal would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import LAB_SHELL

from vsockmon.lab import Lab
from vsockmon.wire.pcapio import open_capture

pytestmark = pytest.mark.lab

VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))
MIB = 1 << 20

SOCKINFO = r'''
"""Print the capture's packet socket: its SO_RCVBUF, and the size of its mapping (0: none)."""
import ctypes, os, re, socket, sys

pid = int(sys.argv[1])
inodes = {line.split()[8] for line in open("/proc/net/packet").read().splitlines()[1:]}
for fd in os.listdir(f"/proc/{pid}/fd"):
    m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
    if m and m.group(1) in inodes:
        inode, target = m.group(1), int(fd)
libc = ctypes.CDLL(None, use_errno=True)
pidfd = os.pidfd_open(pid)
mine = libc.syscall(438, pidfd, target, 0)  # pidfd_getfd(2)
assert mine >= 0, os.strerror(ctypes.get_errno())
sock = socket.socket(fileno=mine)
rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
mapped = 0
for line in open(f"/proc/{pid}/maps"):
    if line.rstrip().endswith(f"socket:[{inode}]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        mapped += hi - lo
print(rcvbuf, mapped)
'''

SCRIPT = LAB_SHELL + r"""
WAIT_S=60
V=vsockmon
rx() { cat /sys/class/net/vsockmon0/statistics/rx_packets; }
# the link by hand, so its counter outlives each capture
ip link add vsockmon0 type vsockmon && ip link set vsockmon0 up
$V echo server --port 9999 2> server.err &
wait_for server.err listening
run() {  # NAME CAPTURE-OPTIONS...: a capture of 20 echoes of 100 bytes
  name=$1; shift
  $V capture -w $name.pcap "$@" 2> $name.err & CAP=$!
  wait_for $name.err listening
  python3 sockinfo.py $CAP > $name.sock
  rx > $name.rx0
  $V echo client --cid 1 --port 9999 --count 20 --size 100 --json > $name.client
  sleep 1.5  # the ring hands over a partly filled block after its 1 s timeout
  rx > $name.rx1
  kill -INT $CAP; wait $CAP; echo $? > $name.rc
}
run nommap --no-mmap
run nommap8 --no-mmap -B 8
run ring8 -B 8
run ring3 -B 3
run ring
"""


@pytest.fixture(scope="module")
def results(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("options-lab")
    (d / "script.sh").write_text(SCRIPT)
    (d / "sockinfo.py").write_text(SOCKINFO)
    done = lab.run(["bash", "script.sh"], cwd=d, timeout=900)
    (d / "lab.out").write_text(done.output)
    assert done.returncode == 0, done.output[-3000:]
    return d


def _capture(d: Path, name: str) -> tuple[int, int, int]:
    """(SO_RCVBUF, bytes of the ring mapping, frames in the file), after checking the file
    holds exactly the frames the link counted and the echo client succeeded."""
    assert (d / f"{name}.rc").read_text().strip() == "0", (d / f"{name}.err").read_text()
    client = json.loads((d / f"{name}.client").read_text())
    assert client["messages"] == 20 and client["verified"], client
    with open_capture(str(d / f"{name}.pcap")) as reader:
        frames = sum(1 for _ in reader.records())
        assert reader.stopped is None
    counted = int((d / f"{name}.rx1").read_text()) - int((d / f"{name}.rx0").read_text())
    assert frames == counted > 40  # 20 RW each way at least, nothing lost
    rcvbuf, mapped = map(int, (d / f"{name}.sock").read_text().split())
    return rcvbuf, mapped, frames


def test_no_mmap_reads_without_a_ring_and_misses_nothing(results: Path) -> None:
    _rcvbuf, mapped, _frames = _capture(results, "nommap")
    assert mapped == 0  # no TPACKET ring mapped into the process
    assert "recvmsg" in (results / "nommap.err").read_text()


def test_no_mmap_buffer_size_is_the_socket_receive_buffer(results: Path) -> None:
    """SO_RCVBUFFORCE of B MiB: the kernel keeps twice the value asked for (socket(7))."""
    default, _, _ = _capture(results, "nommap")
    rcvbuf, mapped, _ = _capture(results, "nommap8")
    assert (rcvbuf, mapped) == (2 * 8 * MIB, 0)
    assert default == 2 * 32 * MIB  # -B defaults to 32


@pytest.mark.parametrize(("name", "mib"), [("ring8", 8), ("ring3", 3), ("ring", 32)])
def test_buffer_size_is_the_ring_mapped(results: Path, name: str, mib: int) -> None:
    _rcvbuf, mapped, _ = _capture(results, name)
    assert mapped == mib * MIB
    assert "mmap ring (TPACKET_V3)" in (results / f"{name}.err").read_text()


# -- lab shell through a terminal ----------------------------------------------------------------


def _pane(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-S", "-200", "-t", session],
                          capture_output=True, text=True).stdout


def _wait_pane(session: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pane = _pane(session)
        if text in pane:
            return pane
        time.sleep(0.5)
    raise AssertionError(f"{text!r} never showed; the terminal shows:\n{_pane(session)}")


def test_lab_shell_is_an_interactive_root_shell_on_the_lab_kernel(lab: Lab,
                                                                   tmp_path: Path) -> None:
    """Type into the shell as a user would: commands run as root on the lab's kernel, with
    the vsockmon module there, and ``exit`` powers the VM off and ends the command."""
    assert shutil.which("tmux")
    session = f"vsockmon-shell-{os.getpid()}-{tmp_path.name}"  # unique on this host
    status = tmp_path / "status"
    cmd = f"{VSOCKMON} lab shell --kernel {lab.kernel}; echo exit=$? > {status}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd],
                   check=True, cwd=tmp_path)
    try:
        _wait_pane(session, f"root@vsockmon-lab:{tmp_path}#", 600)  # the guest's prompt
        # values computed by the guest's shell, so the typed line itself cannot match
        subprocess.run(["tmux", "send-keys", "-t", session,
                        "echo SUM=$((6*7)) $(id -u) $(uname -r); "
                        "ip link add vsockmon9 type vsockmon && echo LINK=$((1+1))", "Enter"],
                       check=True)
        pane = _wait_pane(session, "LINK=2", 120)
        assert f"SUM=42 0 {lab.kernel}" in pane
        subprocess.run(["tmux", "send-keys", "-t", session, "exit", "Enter"], check=True)
        deadline = time.monotonic() + 120
        while not status.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert status.read_text().strip() == "exit=0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
