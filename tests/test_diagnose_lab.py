"""``capture --diagnose`` on a real kernel: findings reported live, then the same findings
from ``vsockmon diagnose`` on the file it wrote — or, when the capture stops during a silence
a pcap file cannot record, the live report saying which findings the file gives differently;
a pcapng file records the stop, and the two agree. One lab boot, three captures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import LAB_SHELL

from vsockmon.cli import main
from vsockmon.lab import Lab

pytestmark = pytest.mark.lab

HALF_CLOSE = r"""
import os, socket, sys, time
port, ready, done = int(sys.argv[1]), sys.argv[2], sys.argv[3]
lst = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
lst.bind((socket.VMADDR_CID_ANY, port)); lst.listen()
c = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM); c.connect((1, port))
s, _ = lst.accept()
c.sendall(b"request"); c.shutdown(socket.SHUT_WR)
while s.recv(100): pass
open(ready, "w").close()
while not os.path.exists(done):  # the server neither answers nor closes
    time.sleep(0.1)              # until the capture has stopped, however slow
"""

SCRIPT = LAB_SHELL + r"""
WAIT_S=30
vsockmon echo server --port 9999 2> server.err &
vsockmon capture -w live.pcap --diagnose -q 2> capture.err & CAP=$!
wait_for server.err listening; wait_for capture.err listening
vsockmon echo client --cid 1 --port 9999 --count 5 --size 100 > /dev/null
vsockmon echo client --cid 1 --port 7777 --count 1 2> /dev/null
python3 half_close.py 5300 half_close.ready capture.rc & PY=$!
until [ -e half_close.ready ]; do sleep 0.1; done; sleep 2.5
vsockmon echo client --cid 1 --port 9999 --count 1 > /dev/null  # life goes on elsewhere
sleep 0.5
kill -INT $CAP; wait $CAP; echo $? > capture.rc
wait $PY
# the second capture stops while the half-closed connection is still silent
vsockmon capture -w end.pcap --diagnose -q 2> end.err & CAP=$!
wait_for end.err listening
python3 half_close.py 5301 end.ready end.rc & PY=$!
until [ -e end.ready ]; do sleep 0.1; done; sleep 2.5
kill -INT $CAP; wait $CAP; echo $? > end.rc
wait $PY
# the same, written as pcapng: the file records when the capture stopped
vsockmon capture -w end.pcapng --diagnose -q 2> ng.err & CAP=$!
wait_for ng.err listening
python3 half_close.py 5302 ng.ready ng.rc & PY=$!
until [ -e ng.ready ]; do sleep 0.1; done; sleep 2.5
kill -INT $CAP; wait $CAP; echo $? > ng.rc
wait $PY
"""


@pytest.fixture(scope="module")
def run(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("diagnose-lab")
    (work / "half_close.py").write_text(HALF_CLOSE)
    result = lab.run(["sh", "-c", SCRIPT], cwd=work, timeout=300)
    assert result.returncode == 0, result.output
    return work


def test_capture_reports_findings_live(run: Path) -> None:
    lines = (run / "capture.err").read_text().splitlines()
    live = [ln for ln in lines if ln.startswith("diagnose: ") and "(" in ln]
    assert any(ln.startswith("diagnose: ERROR no-listener (stream ") for ln in live), lines
    assert any(ln.startswith("diagnose: WARNING half-close-hang ") for ln in live), lines
    assert "diagnose: 1 error(s), 1 warning(s)" in "\n".join(lines)
    assert (run / "capture.rc").read_text().strip() == "0"


def test_the_file_gives_the_same_findings(run: Path) -> None:
    out = CliRunner().invoke(main, ["diagnose", str(run / "live.pcap"), "--json",
                                    "--min-severity", "warning"])
    assert out.exit_code == 1, out.output
    found = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(f["rule"] for f in found) == ["half-close-hang", "no-listener"]
    live = (run / "capture.err").read_text()
    for f in found:  # the live report named the same stream and frames
        frames = ",".join(map(str, f["frames"]))
        assert f"{f['rule']} (stream {f['stream']}, frames {frames})" in live


def _offline(path: Path) -> list[dict[str, Any]]:
    out = CliRunner().invoke(main, ["diagnose", str(path), "--json"])
    assert out.exit_code in (0, 1), out.output
    return [json.loads(line) for line in out.stdout.splitlines()]


def _headline(f: dict[str, Any]) -> str:
    frames = ",".join(map(str, f["frames"]))
    rule = f"{f['rule']}/{f['kind']}" if f["kind"] else f["rule"]
    return f"{str(f['severity']).upper()} {rule} (stream {f['stream']}, frames {frames})"


def test_a_capture_stopped_in_a_silence_says_why_the_file_differs(run: Path) -> None:
    """Live, the half-close's silence runs up to the capture's stop (2.5 s: a hang); the
    file ends at the connection's last frame, so offline the connection was merely cut off
    by the capture's end. The live report must name both and say why."""
    err = (run / "end.err").read_text()
    assert (run / "end.rc").read_text().strip() == "0", err
    # the only traffic: REQUEST, RESPONSE, RW "request", SHUTDOWN(SEND) and the credit
    # update that acknowledges the read — the half-close is stream 0, its SHUTDOWN frame 4
    offline = _offline(run / "end.pcap")
    assert [(f["rule"], f["kind"], f["stream"]) for f in offline] == [
        ("mid-capture", "end", 0)], offline
    live = [ln for ln in err.splitlines() if ln.startswith("diagnose: WARNING ")]
    assert len(live) == 1 and live[0].startswith(
        "diagnose: WARNING half-close-hang (stream 0, frames 4,"), err
    hang = live[0].split(": ")[1]  # WARNING half-close-hang (stream 0, frames 4,N)
    assert "the written file ends at its last frame" in err
    assert f"diagnose:   not in the file's report: {hang}\n" in err, err
    for f in offline:  # everything the file gives is either reported live or announced
        assert f"diagnose:   only in the file's report: {_headline(f)}\n" in err, err
    assert "diagnose: 0 error(s), 1 warning(s), 0 note(s)" in err


def test_a_pcapng_capture_stopped_in_a_silence_agrees_with_the_file(run: Path) -> None:
    """The same capture written as pcapng: the file records when the capture stopped (an
    interface statistics block), so offline the silence also lasts up to the stop."""
    err = (run / "ng.err").read_text()
    assert (run / "ng.rc").read_text().strip() == "0", err
    offline = _offline(run / "end.pcapng")
    assert [(f["rule"], f["stream"]) for f in offline] == [("half-close-hang", 0)], offline
    assert offline[0]["frames"][0] == 4  # REQUEST, RESPONSE, RW, then the SHUTDOWN
    assert offline[0]["evidence"]["silence_s"] >= 2.5  # the script's sleep before the stop
    live = [ln for ln in err.splitlines() if ln.startswith("diagnose: ") and " (" in ln]
    assert [ln.split(": ")[1] for ln in live] == [_headline(f) for f in offline], err
    assert "report differ" not in err and "report differently" not in err
    assert "diagnose: 0 error(s), 1 warning(s), 0 note(s)" in err
    # tshark reads the statistics block as such: every packet, nothing reported as damaged
    tshark = subprocess.run(["tshark", "-r", str(run / "end.pcapng"), "-T", "fields",
                             "-e", "frame.number"], capture_output=True, text=True)
    assert tshark.returncode == 0 and tshark.stdout.split()[-1] == str(
        offline[0]["frames"][-1]), tshark.stderr
