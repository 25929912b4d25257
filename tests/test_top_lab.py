"""``vsockmon top`` on a real kernel: one lab boot runs every scenario with echo traffic
flowing, and the tests check what top printed (and what it left behind) on the host.

Scenarios:
  t1  the "done when" run: ``top -b -n 4 -d 2 --json`` while an echo client sends at full rate
  t2  SIGINT and t3 SIGTERM to a batch top: the link goes, exit 0 / 143
  t4  the full screen in tmux: the echo connection on screen, ``w`` saves a pcap, SIGTERM
  t5  the full screen in tmux left with Ctrl-C
  t6  drops at the echo client's full rate: ``capture`` then ``top``, same load, same time
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import LAB_SHELL

from vsockmon.lab import Lab
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import MON_HDR_LEN, VIRTIO_HEADER, Op

pytestmark = pytest.mark.lab

SCENARIOS = LAB_SHELL + r"""
WAIT_S=90
V=vsockmon
wait_screen() {  # TEXT: until the tmux pane shows TEXT
  i=0
  while ! tmux capture-pane -p -t top | grep -q "$1"; do
    i=$((i + 1)); [ $i -gt 900 ] && { echo "timeout: $1 on screen" >&2; return 1; }
    sleep 0.1
  done
}
gone() {  # PID: until the process has ended
  while kill -0 "$1" 2> /dev/null; do sleep 0.1; done
}
link_state() { ip link show vsockmon0 > /dev/null 2>&1 && echo present || echo absent; }

$V echo server --port 9999 2> server.err & SRV=$!
wait_for server.err listening
$V echo client --cid 1 --port 9999 --size 1000 --duration 900 --json > client.json \
  2> client.err & CLI=$!
sleep 2

# t1: the done-when run
$V top -b -n 4 -d 2 --json > t1.jsonl 2> t1.err; echo $? > t1.rc
link_state > t1.link

# t2, t3: signals to a batch top
for sig in INT TERM; do
  $V top -b -d 1 --json > t.$sig.jsonl 2> t.$sig.err & TOP=$!
  wait_for t.$sig.err "top: ready"
  link_state > t.$sig.link_during
  kill -$sig $TOP; wait $TOP; echo $? > t.$sig.rc
  link_state > t.$sig.link
done

# t4: the full screen, w, SIGTERM
tmux new-session -d -s top -c "$PWD" -x 200 -y 40 "echo \$\$ > t4.pid; exec $V top -d 1"
wait_screen ':9999'
sleep 2.5
link_state > t4.link_during
tmux capture-pane -p -t top > t4.screen
tmux send-keys -t top w
wait_screen 'vsockmon-top-'
tmux send-keys -t top Enter
wait_screen 'wrote '
tmux capture-pane -p -t top > t4.saved
kill -TERM "$(cat t4.pid)"; gone "$(cat t4.pid)"
link_state > t4.link

# t5: the full screen, Ctrl-C
tmux new-session -d -s top -c "$PWD" -x 200 -y 40 "echo \$\$ > t5.pid; exec $V top -d 1"
wait_screen ':9999'
link_state > t5.link_during
tmux send-keys -t top C-c
gone "$(cat t5.pid)"
link_state > t5.link

# t6: drops under the same load, one after the other
$V capture -w /tmp/cap.pcap --duration 8 --json -q 2> t6.capture.err
rm -f /tmp/cap.pcap
$V top -b -n 4 -d 2 --json > t6.jsonl 2> t6.top.err

kill -TERM $CLI; wait $CLI
kill -INT $SRV; wait $SRV
ls vsockmon-top-*.pcap > saved.name
exit 0
"""


@pytest.fixture(scope="module")
def results(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("top-lab")
    (d / "scenarios.sh").write_text(SCENARIOS)
    done = lab.run(["bash", "scenarios.sh"], cwd=d, timeout=900)
    (d / "lab.out").write_text(done.output)
    assert done.returncode == 0, done.output[-3000:]
    return d


def _read(d: Path, name: str) -> str:
    return (d / name).read_text()


def _snapshots(d: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in _read(d, name).splitlines()]


def _echo(snap: dict) -> dict:
    """The echo connection (server port 9999, the long-running client)."""
    conns = [c for c in snap["connections"] if c["server"] == "1:9999" and c["state"] == "open"]
    assert len(conns) == 1, snap["connections"]
    return conns[0]


def test_done_when_batch_json_shows_the_echo_connection(results: Path) -> None:
    assert _read(results, "t1.rc").strip() == "0", _read(results, "t1.err")
    snaps = _snapshots(results, "t1.jsonl")
    assert len(snaps) == 4
    keys = ["stream", "client", "server", "type", "state", "bytes_c2s", "bytes_s2c",
            "rate_c2s", "rate_s2c", "peer_free_c2s", "peer_free_s2c", "stall_ms", "finding"]
    for snap in snaps:
        assert list(snap) == ["time", "connections", "findings", "frames", "drops"]
        for conn in snap["connections"]:
            assert list(conn) == keys
    echo = [_echo(s) for s in snaps]
    assert all(e["type"] == "STREAM" for e in echo)
    assert len({e["stream"] for e in echo}) == 1  # one connection all along
    for e in echo:
        assert e["bytes_c2s"] > 0 and e["rate_c2s"] > 0
        # an echo returns what it was sent; the client waits for each 1000-byte echo before
        # the next, and the capture began mid-connection: the counts differ by one at most
        assert e["bytes_s2c"] > 0 and abs(e["bytes_c2s"] - e["bytes_s2c"]) <= 1000
        assert 0 <= e["peer_free_c2s"] <= 262144  # Linux's default buf_alloc
    # the rate is the bytes sent between two snapshots over the time between them
    for a, b, ea, eb in zip(snaps, snaps[1:], echo, echo[1:], strict=False):
        assert eb["bytes_c2s"] > ea["bytes_c2s"]
        expected = (eb["bytes_c2s"] - ea["bytes_c2s"]) / (b["time"] - a["time"])
        assert eb["rate_c2s"] == pytest.approx(expected, rel=0.01)
        assert b["frames"] > a["frames"]
    # -d 2 on a fixed schedule, never sooner: in the VM at full rate a snapshot may come
    # late (the model digesting what queued up while it imported), not early
    assert snaps[-1]["time"] - snaps[0]["time"] >= 6 - 1.5
    assert _read(results, "t1.link").strip() == "absent"
    err = _read(results, "t1.err")
    listening = re.search(r"listening on vsockmon0 \(created; removed on exit\).* ([\d.]+) s "
                          r"after start", err)
    ready = re.search(r"top: ready ([\d.]+) s after start", err)
    assert listening and ready, err
    # frames captured while the model was importing count: the first snapshot (taken 2 s
    # after "ready") reaches back to the first frame, captured right after "listening"
    first = min(f["time_ns"] for f in snaps[0]["findings"] if f["rule"] == "mid-capture")
    waited = float(ready.group(1)) - float(listening.group(1))
    assert snaps[0]["time"] - first / 1e9 >= waited + 2 - 0.5
    print(f"listening {listening.group(1)} s, ready {ready.group(1)} s after start")


@pytest.mark.parametrize(("sig", "code"), [("INT", 0), ("TERM", 143)])
def test_signals_remove_the_link(results: Path, sig: str, code: int) -> None:
    assert _read(results, f"t.{sig}.link_during").strip() == "present"
    assert _read(results, f"t.{sig}.rc").strip() == str(code), _read(results, f"t.{sig}.err")
    assert _read(results, f"t.{sig}.link").strip() == "absent"
    assert "Traceback" not in _read(results, f"t.{sig}.err")


def test_full_screen_shows_the_echo_and_w_saves_a_pcap(results: Path) -> None:
    screen = _read(results, "t4.screen")
    line = next(row for row in screen.splitlines() if "1:9999" in row and "open" in row)
    assert "STREAM" in line and ("RW" in line or "CREDIT_UPDATE" in line)
    assert "connections" in screen and "frames" in screen
    saved = _read(results, "t4.saved")
    m = re.search(r"wrote (\d+) frames to (vsockmon-top-\d+-\d+\.pcap)", saved)
    assert m, saved
    assert _read(results, "saved.name").strip() == m.group(2)
    # the file is a whole pcap with exactly the frames reported, the echo's RW among them
    with open_capture(str(results / m.group(2))) as reader:
        records = list(reader.records())
        assert reader.stopped is None
    assert len(records) == int(m.group(1)) > 0
    ops = {VIRTIO_HEADER.unpack(r.data, MON_HDR_LEN)["op"] for r in records}
    assert Op.RW in ops
    assert _read(results, "t4.link_during").strip() == "present"
    assert _read(results, "t4.link").strip() == "absent"
    assert _read(results, "t5.link_during").strip() == "present"
    assert _read(results, "t5.link").strip() == "absent"


def test_top_drops_no_more_than_capture(results: Path) -> None:
    cap = json.loads(_read(results, "t6.capture.err").strip().splitlines()[-1])
    snaps = _snapshots(results, "t6.jsonl")
    assert len(snaps) == 4
    top_drops = snaps[-1]["drops"]
    print(f"capture: {cap['kernel_seen']} seen, {cap['kernel_drops']} dropped in "
          f"{cap['seconds']} s; top: {snaps[-1]['frames']} frames, {top_drops} dropped")
    # the same load for about the same time: top's ratio may not exceed capture's (plus
    # one ring block of slack, 512 KiB of 1 KB echoes ~ 1000 frames)
    assert top_drops <= cap["kernel_drops"] + 1000
