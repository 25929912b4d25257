"""Issue 17 in the lab, so it cannot return: a burst of 20,000 one-byte ``send()`` calls over
loopback (CID 1) to a receiver that does not read, captured with the defaults, must be
written whole — however the capture stops (SIGINT, ``--duration`` set long then SIGINT,
``--duration`` running out, the link deleted under it) — and ``-c N`` writes exactly N.

The expected counts are not the capture's own: the link's counter of tapped frames
(``/sys/class/net/vsockmon0/statistics/rx_packets``, read just before the stop while nothing
moves: the receiver stalls, the sender keeps its socket open) and the generator's 20,000
one-byte RW frames, found in the file by our reader and by tshark.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import LAB_SHELL

from vsockmon.lab import Lab
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import MON_HDR_LEN, VIRTIO_HEADER, Op

pytestmark = pytest.mark.lab

BURST = 20_000

GENERATOR = r"""
import os, socket, sys, time
port, count, done = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
srv = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
srv.bind((socket.VMADDR_CID_ANY, port))
srv.listen(1)
if os.fork() == 0:  # the sender: the burst, then it keeps its socket open (a close would
    c = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # send frames later)
    c.connect((1, port))
    for _ in range(count):
        c.send(b"x")
    open(done, "w").write("sent\n")
    time.sleep(3600)
conn, _ = srv.accept()
time.sleep(3600)  # the receiver stalls until killed: its window holds all 20,000 bytes
"""

SCRIPT = LAB_SHELL + r"""
WAIT_S=60
rx() { cat /sys/class/net/vsockmon0/statistics/rx_packets; }
settle() {  # NAME: loopback taps from a worker, after send() returned: wait for the count
  # to hold still for a second, then keep it as NAME.rx
  last=-1; while [ "$(rx)" != "$last" ]; do last=$(rx); sleep 1; done; echo $last > $1.rx
}
# burst NAME PORT [capture options]: capture ready, then the burst; leaves $CAP $GEN
burst() {
  name=$1 port=$2; shift 2
  vsockmon capture -w $name.pcap --json "$@" 2> $name.err & CAP=$!
  wait_for $name.err "listening on"
  rx > $name.rx0
  setsid python3 gen.py $port %(burst)d $name.sent & GEN=$!
  wait_for $name.sent sent
}
finish() {  # NAME: the capture's status, then the generator goes
  wait $CAP; echo $? > $1.rc
  kill -- -$GEN 2> /dev/null; wait $GEN 2> /dev/null
}

# a: SIGINT a few seconds after the burst (the issue's run)
burst a 5001; settle a; kill -INT $CAP; finish a
# b: --duration 60, SIGINT a few seconds after the burst
burst b 5002 --duration 60; settle b; kill -INT $CAP; finish b
# c: --duration runs out on its own, after the burst
burst c 5003 --duration 25; settle c; finish c
# d: the link is deleted under the capture a few seconds after the burst
burst d 5004; settle d; ip link del vsockmon0; finish d
# e: -c 5000 stops in the middle of the burst
burst e 5005 -c 5000; finish e
# f: SIGKILL before any frame: a valid empty file
vsockmon capture -w f.pcap 2> f.err & CAP=$!
wait_for f.err "listening on"; kill -KILL $CAP; wait $CAP 2> /dev/null
vsockmon link down > /dev/null
"""


@pytest.fixture(scope="module")
def runs(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("capture-burst")
    (d / "gen.py").write_text(GENERATOR)
    (d / "burst.sh").write_text(SCRIPT % {"burst": BURST})
    done = lab.run(["bash", "burst.sh"], cwd=d, timeout=900)
    (d / "lab.out").write_text(done.output)
    assert done.returncode == 0, done.output[-3000:]
    return d


def _file(path: Path) -> tuple[int, int]:
    """(frames in the file, one-byte RW frames among them), read by our reader."""
    frames = burst = 0
    with open_capture(str(path)) as reader:
        for r in reader.records():
            frames += 1
            v = VIRTIO_HEADER.unpack(r.data, MON_HDR_LEN)
            burst += v["op"] == Op.RW and v["len"] == 1
        assert reader.stopped is None, reader.stopped
    return frames, burst


def _tshark_count(path: Path) -> int:
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.number"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.split())


def _summary(d: Path, name: str) -> dict:
    return json.loads((d / f"{name}.err").read_text().strip().splitlines()[-1])


def _tapped(d: Path, name: str) -> int:
    return int((d / f"{name}.rx").read_text()) - int((d / f"{name}.rx0").read_text())


@pytest.mark.parametrize("name", ["a", "b", "c"])
def test_a_burst_is_written_whole_however_the_capture_stops(runs: Path, name: str) -> None:
    tapped = _tapped(runs, name)
    frames, burst = _file(runs / f"{name}.pcap")
    assert burst == BURST  # every send() the generator made
    assert frames == tapped == _tshark_count(runs / f"{name}.pcap")
    summary = _summary(runs, name)
    assert summary["stopped"] == {"a": "SIGINT", "b": "SIGINT", "c": "duration"}[name]
    assert summary["packets"] == frames == summary["kernel_seen"]
    assert summary["kernel_drops"] == 0 and summary["lost"] == 0
    assert (runs / f"{name}.rc").read_text().strip() == "0"
    assert "frames lost" not in (runs / f"{name}.err").read_text()


def test_the_link_deleted_under_a_burst_loses_nothing(runs: Path) -> None:
    frames, burst = _file(runs / "d.pcap")
    assert burst == BURST and frames == _tapped(runs, "d")
    err = (runs / "d.err").read_text()
    assert err.splitlines()[-1] == ("Error: vsockmon0 went away while capturing (Network is "
                                    "down); what was captured until then is written")
    assert (runs / "d.rc").read_text().strip() == "1"


def test_count_writes_exactly_n_of_a_burst(runs: Path) -> None:
    frames, _burst = _file(runs / "e.pcap")
    assert frames == 5000 == _tshark_count(runs / "e.pcap")
    summary = _summary(runs, "e")
    assert summary["stopped"] == "count" and summary["packets"] == 5000
    assert summary["lost"] == 0 and (runs / "e.rc").read_text().strip() == "0"


def test_a_capture_killed_before_any_frame_leaves_a_valid_empty_file(runs: Path) -> None:
    assert (runs / "f.pcap").stat().st_size == 24  # the pcap file header, nothing else
    assert _file(runs / "f.pcap") == (0, 0)
    assert _tshark_count(runs / "f.pcap") == 0
