"""Capture, link, echo and doctor on a real kernel: one lab boot runs every scenario (each boot
costs ~10 s and every guest Python start ~1 s), writing results and captures into the shared
directory; the tests below then check them on the host, with our reader and with tshark.

Scenarios (files prefixed by their number):
  s1  the "done when" run: echo server, ``capture -w t.pcap``, 50 × 100 B echoed, a refused
      connect (RST), SIGINT to the capture
  s2  SEQPACKET (with and without MSG_EOR), pcapng, a port filter, SIGTERM to the capture
  s3  SIGKILL to a capture: the file stays readable, ``link status`` reports the leftover
  s4  overwrite refused; s5 kernel filter, count, snap length, live decode
  s6  ring of files, duration, ``-w -`` to a pipe; s7 ``-Z nobody``
  s8  interop with socat and with the C programs in tests/c
  s9  DGRAM's clear error; s10 small buffer + slow reader (credit); s11 link by hand (and
      deleted under a running capture), doctor
  s12 concurrent clients; the server's exit on SIGINT
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import LAB_SHELL

from vsockmon.lab import Lab
from vsockmon.live.echo import message
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import (
    MON_HDR_LEN,
    VIRTIO_HDR_LEN,
    VIRTIO_HEADER,
    VSOCKMON_HEADER,
    Op,
    SeqFlag,
    SockType,
)

pytestmark = pytest.mark.lab

C_DIR = Path(__file__).with_name("c")
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))

SCENARIOS = LAB_SHELL + r"""
WAIT_S=30
V=vsockmon
link_state() { ip link show vsockmon0 > /dev/null 2>&1 && echo present || echo absent; }
now() { date +%s.%N; }
echo "start $(now)" > timing

# s1: the "done when" scenario
$V echo server --port 9999 2> s1.server.err & SRV=$!
$V capture -w t.pcap 2> s1.cap.err & CAP=$!
wait_for s1.server.err listening; wait_for s1.cap.err listening
link_state > s1.link_during
$V echo client --cid local --port 9999 --count 50 --size 100 --json > s1.client.json  # CID 1
echo $? > s1.client.rc
$V echo client --cid 1 --port 7777 --count 1 2> s1.refused.err; echo $? > s1.refused.rc
sleep 0.3
kill -INT $CAP; wait $CAP; echo $? > s1.cap.rc
link_state > s1.link
echo "s1 $(now)" >> timing

# s2: SEQPACKET, pcapng, port filter, SIGTERM
$V echo server --port 9998 --type seqpacket 2> s2.server.err & SRV2=$!
$V capture -w seq.pcapng --port 9998 --cid local 2> s2.cap.err & CAP=$!  # loopback: CID 1
wait_for s2.server.err listening; wait_for s2.cap.err listening
$V echo client --cid 1 --port 9998 --type seqpacket --count 10 --size 5000 --json > s2.client.json
$V echo client --cid 1 --port 9998 --type seqpacket --count 5 --size 100 --eor --json > s2.eor.json
$V echo client --cid 1 --port 9999 --count 3 > /dev/null  # filtered out
sleep 0.3
kill -TERM $CAP; wait $CAP; echo $? > s2.cap.rc
link_state > s2.link
kill -INT $SRV2; wait $SRV2
echo "s2 $(now)" >> timing

# s3: SIGKILL leaves a readable file and a link that status reports
$V capture -w killed.pcap 2> s3.cap.err & CAP=$!
wait_for s3.cap.err listening
$V echo client --cid 1 --port 9999 --count 20 --size 1000 > /dev/null
sleep 0.5
kill -KILL $CAP; wait $CAP 2> /dev/null
echo $CAP > s3.pid
$V link status > s3.status.out; echo $? > s3.status.rc
$V link down > s3.down.out
link_state > s3.link
echo "s3 $(now)" >> timing

# s4: an existing file is not overwritten
md5sum t.pcap > s4.before
$V capture -w t.pcap -c 1 2> s4.err; echo $? > s4.rc
md5sum t.pcap > s4.after
link_state > s4.link

# s5: kernel filter + count + snap length; then the live one-line decode
$V capture --port 9999 --op rw -c 10 -s 100 -w filt.pcap 2> s5.cap.err & CAP=$!
wait_for s5.cap.err listening
$V echo client --cid 1 --port 9999 --count 20 --size 300 > /dev/null
wait $CAP; echo $? > s5.cap.rc
$V capture --port 9999 -c 6 > s5.lines 2> s5.lines.err & CAP=$!
wait_for s5.lines.err listening
$V echo client --cid 1 --port 9999 --count 3 --size 10 > /dev/null
wait $CAP; echo $? > s5.lines.rc
echo "s5 $(now)" >> timing

# s6: ring of files; duration; -w - into a pipe
$V capture -w ring.pcap --ring 3 --ring-size 0.2 2> s6.ring.err & CAP=$!
wait_for s6.ring.err listening
$V echo client --cid 1 --port 9999 --count 40 --size 65536 > /dev/null
sleep 0.3
kill -INT $CAP; wait $CAP; echo $? > s6.ring.rc
$V capture -w dur.pcap --duration 1 --json 2> s6.dur.err; echo $? > s6.dur.rc
( $V capture -w - -c 20 2> s6.pipe.err | cat > pipe.pcap ) & PIPE=$!
wait_for s6.pipe.err listening
$V echo client --cid 1 --port 9999 --count 10 --size 10 > /dev/null
wait $PIPE
link_state > s6.link
echo "s6 $(now)" >> timing

# s7: drop privileges once the socket is open; the root parent removes the link
$V capture -Z nobody -w /tmp/z.pcap -c 5 2> s7.err & CAP=$!
wait_for s7.err listening
$V echo client --cid 1 --port 9999 --count 5 --size 10 > /dev/null
wait $CAP; echo $? > s7.rc
stat -c %U /tmp/z.pcap > s7.owner; cp /tmp/z.pcap z.pcap
link_state > s7.link
echo "s7 $(now)" >> timing

# s8: interop with socat and C programs
printf 'ping-from-socat' | socat -t 2 - VSOCK-CONNECT:1:9999 > s8.socat_to_ours.out
socat VSOCK-LISTEN:9996,fork EXEC:cat 2> s8.socat.err & SOC=$!
./echo_server 9995 2> s8.cserver.err & CSRV=$!
wait_for s8.cserver.err listening; sleep 0.3
$V echo client --cid 1 --port 9996 --count 10 --size 1000 --json > s8.ours_to_socat.json
$V echo client --cid 1 --port 9995 --count 10 --size 2000 --concurrency 2 --json > s8.ours_to_c.json
./hello_client 1 9999 > s8.c_to_ours.out; echo $? > s8.c_to_ours.rc
kill $SOC $CSRV
echo "s8 $(now)" >> timing

# s9: no datagram transport on this kernel
$V echo client --cid 1 --port 9999 --type dgram 2> s9.client.err; echo $? > s9.client.rc
$V echo server --port 9994 --type dgram 2> s9.server.err; echo $? > s9.server.rc
echo "s9 $(now)" >> timing

# s10: a 4 KiB receive buffer and a slow reader: credit updates pace the sender
$V echo server --port 9993 --buffer-size 4096 --read-delay 0.01 2> s10.server.err & SRV3=$!
$V capture -w credit.pcap --port 9993 2> s10.cap.err & CAP=$!
wait_for s10.server.err listening; wait_for s10.cap.err listening
$V echo client --cid 1 --port 9993 --count 2 --size 65536 --buffer-size 8192 --json \
  > s10.client.json
sleep 0.3
kill -INT $CAP $SRV3; wait $CAP $SRV3
echo "s10 $(now)" >> timing

# s11: link by hand, doctor
$V link up > s11.up.out; echo $? > s11.up.rc
$V link status --json > s11.status.json
$V capture -w gone.pcap 2> s11.gone.err & CAP=$!
wait_for s11.gone.err listening
$V link down > s11.down.out
wait $CAP; echo $? > s11.gone.rc
link_state > s11.link
$V doctor --json --probe > s11.doctor.json; echo $? > s11.doctor.rc
echo "s11 $(now)" >> timing

# s12: concurrent clients; the server exits cleanly on SIGINT
$V echo client --cid 1 --port 9999 --count 40 --size 512 --concurrency 4 --json \
  > s12.client.json
kill -INT $SRV; wait $SRV; echo $? > s12.server.rc
echo "end $(now)" >> timing
"""


def _read(d: Path, name: str) -> str:
    return (d / name).read_text()


@pytest.fixture(scope="module")
def results(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("capture-lab")
    for prog in ("hello_client", "echo_server"):  # built here, run only in the lab
        subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(d / prog),
                        str(C_DIR / f"{prog}.c")], check=True)
    (d / "scenarios.sh").write_text(SCENARIOS)
    done = lab.run(["bash", "scenarios.sh"], cwd=d, timeout=900)
    (d / "lab.out").write_text(done.output)
    assert done.returncode == 0, done.output[-3000:]
    return d


def _frames(path: Path) -> list[tuple[dict[str, int], dict[str, int], bytes, int]]:
    """(vsockmon header, virtio header, captured payload, caplen) of every frame."""
    out = []
    with open_capture(str(path)) as reader:
        for r in reader.records():
            mon = VSOCKMON_HEADER.unpack(r.data)
            virtio = VIRTIO_HEADER.unpack(r.data, MON_HDR_LEN)
            out.append((mon, virtio, r.data[MON_HDR_LEN + VIRTIO_HDR_LEN:], len(r.data)))
        assert reader.stopped is None, reader.stopped
    return out


def _streams(frames: list, port: int) -> dict[str, bytes]:
    """RW payload per direction of the connections to ``port``: the first ``len`` bytes of
    each frame (the header's len, never the frame length: the kernel's tap-length bug)."""
    parts: dict[str, list[bytes]] = defaultdict(list)
    for _mon, v, payload, _cap in frames:
        if v["op"] == Op.RW and port in (v["src_port"], v["dst_port"]):
            parts["to_server" if v["dst_port"] == port else "to_client"].append(
                payload[: v["len"]])
    return {k: b"".join(v) for k, v in parts.items()}


def test_done_when_scenario(results: Path) -> None:
    client = json.loads(_read(results, "s1.client.json"))
    assert _read(results, "s1.client.rc").strip() == "0"
    assert client["messages"] == 50 and client["verified"] and client["errors"] == []
    assert _read(results, "s1.cap.rc").strip() == "0"
    assert _read(results, "s1.link_during").strip() == "present"
    assert _read(results, "s1.link").strip() == "absent"
    assert "[stopped: SIGINT]" in _read(results, "s1.cap.err")

    sent = b"".join(message(0, i, 100) for i in range(50))
    streams = _streams(_frames(results / "t.pcap"), 9999)
    assert streams == {"to_server": sent, "to_client": sent}

    decoded = subprocess.run([VSOCKMON, "decode", str(results / "t.pcap"), "--json"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    ours = [json.loads(line) for line in decoded]
    shark = subprocess.run(["tshark", "-r", str(results / "t.pcap"), "-T", "fields",
                            "-e", "vsock.virtio.op", "-e", "vsock.virtio.len",
                            "-e", "vsock.virtio.dst_prot", "-e", "vsock.payload"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(ours) == len(shark) == len(_frames(results / "t.pcap"))
    shark_to_server = b"".join(bytes.fromhex(f[3].replace(":", ""))[: int(f[1])]
                               for f in (line.split("\t") for line in shark)
                               if f[0] == "5" and f[2] == "9999")
    assert shark_to_server == sent


def test_all_ops_of_a_connection_life_are_seen(results: Path) -> None:
    frames = _frames(results / "t.pcap")
    ops = {Op(v["op"]) for _m, v, _p, _c in frames}
    assert {Op.REQUEST, Op.RESPONSE, Op.RW, Op.CREDIT_UPDATE, Op.SHUTDOWN, Op.RST} <= ops
    # the refused connect: a REQUEST to 7777 answered by an RST with buf_alloc 0
    refused = [v for _m, v, _p, _c in frames if 7777 in (v["src_port"], v["dst_port"])]
    assert [Op(v["op"]) for v in refused] == [Op.REQUEST, Op.RST]
    assert refused[1]["buf_alloc"] == 0
    assert "reset (nothing listens there" in _read(results, "s1.refused.err")
    assert _read(results, "s1.refused.rc").strip() == "1"


def test_seqpacket_keeps_message_boundaries_and_sigterm_removes_the_link(results: Path
                                                                        ) -> None:
    assert _read(results, "s2.cap.rc").strip() == "0"
    assert "[stopped: SIGTERM]" in _read(results, "s2.cap.err")
    assert _read(results, "s2.link").strip() == "absent"
    for name in ("s2.client.json", "s2.eor.json"):
        assert json.loads(_read(results, name))["verified"]
    with open_capture(str(results / "seq.pcapng")) as reader:
        assert reader.format == "pcapng"
    frames = _frames(results / "seq.pcapng")
    assert all(9998 in (v["src_port"], v["dst_port"]) for _m, v, _p, _c in frames)
    rw = [v for _m, v, _p, _c in frames if v["op"] == Op.RW and v["dst_port"] == 9998]
    assert all(v["type"] == SockType.SEQPACKET for v in rw)
    last_of_message = [v for v in rw if v["flags"] & SeqFlag.EOM]
    assert len(last_of_message) == 15  # every message's last RW ends it
    assert [v["flags"] for v in last_of_message[10:]] == [SeqFlag.EOM | SeqFlag.EOR] * 5
    assert sum(v["len"] for v in rw) == 10 * 5000 + 5 * 100


def test_sigkill_leaves_a_readable_file_and_status_reports_the_link(results: Path) -> None:
    frames = _frames(results / "killed.pcap")
    assert sum(v["op"] == Op.RW for _m, v, _p, _c in frames) == 40
    pid = _read(results, "s3.pid").strip()
    assert re.fullmatch(rf"vsockmon0: up, index \d+, mtu 65568, left behind by pid {pid} "
                        r"\(not running\); remove it with: vsockmon link down -i vsockmon0\n",
                        _read(results, "s3.status.out"))
    assert _read(results, "s3.status.rc").strip() == "2"
    assert _read(results, "s3.down.out") == "vsockmon0: removed\n"
    assert _read(results, "s3.link").strip() == "absent"
    assert subprocess.run(["tshark", "-r", str(results / "killed.pcap")],
                          capture_output=True).returncode == 0


def test_overwrite_is_refused(results: Path) -> None:
    assert _read(results, "s4.rc").strip() == "1"
    assert _read(results, "s4.err") == "Error: t.pcap: exists; use --force to overwrite\n"
    assert _read(results, "s4.before") == _read(results, "s4.after")
    assert _read(results, "s4.link").strip() == "absent"


def test_kernel_filter_count_and_snaplen(results: Path) -> None:
    assert _read(results, "s5.cap.rc").strip() == "0"
    assert "port 9999 and op RW" in _read(results, "s5.cap.err")
    frames = _frames(results / "filt.pcap")
    assert len(frames) == 10
    assert all(v["op"] == Op.RW and 9999 in (v["src_port"], v["dst_port"])
               for _m, v, _p, _c in frames)
    assert {cap for *_x, cap in frames} == {100} and {v["len"] for _m, v, _p, _c in frames
                                                       } == {300}


def test_live_line_decode(results: Path) -> None:
    lines = _read(results, "s5.lines").splitlines()
    assert len(lines) == 6 and _read(results, "s5.lines.rc").strip() == "0"
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{6}  1\(local\):\d+ → 1\(local\):9999  STREAM "
                     r"REQUEST len=0 buf_alloc=262144 fwd_cnt=0$", lines[0])
    assert "STREAM RW len=10 " in "\n".join(lines)


def test_ring_of_files_duration_and_pipe(results: Path) -> None:
    assert _read(results, "s6.ring.rc").strip() == "0"
    sizes = [(results / f"ring.pcap.{i}").stat().st_size for i in range(3)]
    assert all(0 < s <= 200_000 for s in sizes) and not (results / "ring.pcap.3").exists()
    stats = json.loads(_read(results, "s6.dur.err").splitlines()[-1])
    assert _read(results, "s6.dur.rc").strip() == "0"
    assert stats["stopped"] == "duration" and 1.0 <= stats["seconds"] < 3
    assert len(_frames(results / "pipe.pcap")) == 20
    assert _read(results, "s6.link").strip() == "absent"


def test_dropping_privileges(results: Path) -> None:
    assert _read(results, "s7.rc").strip() == "0"
    assert _read(results, "s7.owner").strip() == "nobody"
    assert len(_frames(results / "z.pcap")) == 5
    assert _read(results, "s7.link").strip() == "absent"


def test_interop_with_socat_and_c(results: Path) -> None:
    assert _read(results, "s8.socat_to_ours.out") == "ping-from-socat"
    for name in ("s8.ours_to_socat.json", "s8.ours_to_c.json"):
        report = json.loads(_read(results, name))
        assert report["verified"] and report["errors"] == [], report
    assert _read(results, "s8.c_to_ours.out") == "Hello, world!\n"
    assert _read(results, "s8.c_to_ours.rc").strip() == "0"


def test_datagram_error_is_one_line(results: Path) -> None:
    for who in ("client", "server"):
        err = _read(results, f"s9.{who}.err")
        assert err.count("\n") == 1 and "no vsock datagram transport" in err
        assert _read(results, f"s9.{who}.rc").strip() == "1"


def test_small_buffer_shows_in_the_capture(results: Path) -> None:
    assert json.loads(_read(results, "s10.client.json"))["verified"]
    frames = _frames(results / "credit.pcap")
    from_server = [v for _m, v, _p, _c in frames if v["src_port"] == 9993]
    assert {v["buf_alloc"] for v in from_server} == {4096}
    to_server = [v for _m, v, _p, _c in frames if v["op"] == Op.RW and v["dst_port"] == 9993]
    assert max(v["len"] for v in to_server) <= 4096
    assert sum(v["op"] == Op.CREDIT_UPDATE for v in from_server) >= 16


def test_link_by_hand_and_doctor_in_the_lab(results: Path) -> None:
    assert _read(results, "s11.up.out").startswith("vsockmon0: created and up (index ")
    status = json.loads(_read(results, "s11.status.json"))
    assert status["exists"] and status["up"] and status["vsockmon"] and status["mtu"] == 65568
    assert status["creator_pid"] is None  # deliberate: no marker, not "left behind"
    assert _read(results, "s11.link").strip() == "absent"
    # a capture on a link deleted under it stops in one line, its file intact
    assert _read(results, "s11.gone.rc").strip() == "1"
    assert _read(results, "s11.gone.err").splitlines()[-1] == (
        "Error: vsockmon0 went away while capturing (Network is down); what was captured "
        "until then is written")
    assert _frames(results / "gone.pcap") == []
    doctor = json.loads(_read(results, "s11.doctor.json"))
    assert _read(results, "s11.doctor.rc").strip() == "0" and doctor["capture_ready"]
    checks = {c["name"]: c for c in doctor["checks"]}
    assert checks["CONFIG_VSOCKMON"]["status"] == "ok"
    assert checks["/dev/vsock"]["status"] == "ok"
    assert checks["local CID"]["detail"].startswith("2 ")  # vhost_vsock is loaded: the host
    assert checks["vsock sockets"]["status"] == "ok"
    assert "listening: stream:9999" in checks["vsock sockets"]["detail"]


def test_concurrent_clients_and_server_exit(results: Path) -> None:
    report = json.loads(_read(results, "s12.client.json"))
    assert report["messages"] == 40 and report["connections"] == 4 and report["verified"]
    assert _read(results, "s12.server.rc").strip() == "0"
    assert "served" in _read(results, "s1.server.err")
