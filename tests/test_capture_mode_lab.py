"""Capture files are created mode 0600 on a real kernel: payloads can hold secrets.

One lab boot runs the scenarios below (as root inside the VM, a umask of 022 as most
systems have, so a file made the usual way would be 0644), then the tests check each
file's mode, owner and packets on the host:

  plain     ``capture -w`` with traffic: 0600 and the echoed frames in it
  umask     ``--umask 027``: 0640, from the option, whatever the process's own umask (000)
  force     an existing 0644 file replaced with ``--force``: 0600 (not the old mode)
  ring      a ring of files (``--ring``): every file 0600
  user      ``-Z nobody``: owned by nobody, 0600
  ng        pcapng (``.pcapng``): 0600
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import LAB_SHELL

from vsockmon.lab import Lab
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import MON_HDR_LEN, VIRTIO_HEADER, Op

pytestmark = pytest.mark.lab

SCENARIOS = LAB_SHELL + r"""
WAIT_S=30
V=vsockmon
umask 022
modes() { stat -c '%a %U' "$@"; }
$V echo server --port 9999 2> server.err & SRV=$!
wait_for server.err listening

$V capture -w plain.pcap -q 2> plain.err & CAP=$!
wait_for plain.err listening
$V echo client --cid 1 --port 9999 --count 5 --size 100 > /dev/null
sleep 0.3; kill -INT $CAP; wait $CAP; echo $? > plain.rc
modes plain.pcap > plain.mode

( umask 000; $V capture -w umask.pcap --umask 027 --duration 1 -q 2> umask.err
  echo $? > umask.rc )
modes umask.pcap > umask.mode

echo old > force.pcap; chmod 644 force.pcap
$V capture -w force.pcap --force --duration 1 -q 2> force.err; echo $? > force.rc
modes force.pcap > force.mode

$V capture -w ring.pcap --ring 3 --ring-size 0.1 -q 2> ring.err & CAP=$!
wait_for ring.err listening
$V echo client --cid 1 --port 9999 --count 10 --size 65536 > /dev/null
sleep 0.3; kill -INT $CAP; wait $CAP; echo $? > ring.rc
modes ring.pcap.* > ring.mode

mkdir -m 1777 /tmp/z
$V capture -Z nobody -w /tmp/z/user.pcap --duration 1 -q 2> user.err; echo $? > user.rc
modes /tmp/z/user.pcap > user.mode

$V capture -w ng.pcapng --duration 1 -q 2> ng.err; echo $? > ng.rc
modes ng.pcapng > ng.mode
kill -INT $SRV; wait $SRV
"""


@pytest.fixture(scope="module")
def results(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("capture-mode-lab")
    (d / "scenarios.sh").write_text(SCENARIOS)
    done = lab.run(["bash", "scenarios.sh"], cwd=d, timeout=600)
    (d / "lab.out").write_text(done.output)
    assert done.returncode == 0, done.output[-3000:]
    return d


def _check(d: Path, name: str) -> list[str]:
    """The ``mode owner`` lines of a scenario, after checking it exited 0 and said nothing
    on stderr but its readiness line (-q)."""
    err = (d / f"{name}.err").read_text()
    assert (d / f"{name}.rc").read_text().strip() == "0", err
    assert [line.split(" (")[0] for line in err.splitlines()] == ["listening on vsockmon0"]
    return (d / f"{name}.mode").read_text().splitlines()


def test_a_capture_file_is_0600_and_holds_the_traffic(results: Path) -> None:
    assert _check(results, "plain") == ["600 root"]
    with open_capture(str(results / "plain.pcap")) as reader:
        rw = [r for r in reader.records()
              if VIRTIO_HEADER.unpack(r.data, MON_HDR_LEN)["op"] == Op.RW]
    assert len(rw) == 10  # 5 messages each way


@pytest.mark.parametrize(("name", "want"), [
    ("umask", ["640 root"]),
    ("force", ["600 root"]),
    ("user", ["600 nobody"]),
    ("ng", ["600 root"]),
])
def test_modes_of_the_other_ways_to_write(results: Path, name: str, want: list[str]) -> None:
    assert _check(results, name) == want


def test_every_file_of_a_ring_is_0600(results: Path) -> None:
    lines = _check(results, "ring")
    assert len(lines) >= 2 and set(lines) == {"600 root"}  # 1.3 MB into 100 kB files
