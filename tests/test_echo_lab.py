"""The seed article's programs against vsockmon echo, in the lab, captured: each seed client
(Python, C, Go) against ``vsockmon echo server``, and ``vsockmon echo client`` against each
seed server — on loopback (CID 1), then across the nested guest (CID 3 → 2, the seed's
topology: C and Go, which run there as static binaries; the nested guest has no Python).

Expected values come from the seed itself: every seed client sends the 13 bytes
"Hello, world!"; ``vsockmon echo client --count 3 --size 13`` sends ``bytes(range(i, i+13))``
for message i (the documented ramp). The pcap is read on the host.
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
from seed_programs import HELLO, build, command

from vsockmon.lab import Lab
from vsockmon.wire.pcapio import open_capture
from vsockmon.wire.protocol import MON_HDR_LEN, VIRTIO_HDR_LEN, VIRTIO_HEADER, Op

pytestmark = pytest.mark.lab

CLIENT_BYTES = b"".join(bytes(range(i, i + 13)) for i in range(3))
"""What ``vsockmon echo client --count 3 --size 13`` sends on its one connection."""
SERVER_PORTS = {"python": 10001, "c": 10002, "go": 10003}
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))

LOOPBACK = LAB_SHELL + r"""
WAIT_S=60
now() { date +%s.%N; }
echo "start $(now)" > timing
vsockmon capture -w loop.pcap 2> cap.err & CAP=$!
wait_for cap.err listening
vsockmon echo server --port 9999 -v --json > server.json 2> server.err & SRV=$!
wait_for server.err listening
n=0
for lang in python c go; do
  case $lang in python) c="@client_python@";; c) c="@client_c@";; go) c="@client_go@";; esac
  $c 1 9999 > client_$lang.out 2>&1; echo $? > client_$lang.rc
  n=$((n + 1)); wait_for server.err "bytes received, " $n
done
kill -INT $SRV; wait $SRV; echo $? > server.rc
echo "clients $(now)" >> timing
for lang in python c go; do
  case $lang in
    python) s="@server_python@"; port=10001;; c) s="@server_c@"; port=10002;;
    go) s="@server_go@"; port=10003;;
  esac
  $s $port > server_$lang.out 2> server_$lang.err & S=$!
  wait_for server_$lang.err listening
  vsockmon echo client --cid 1 --port $port --count 3 --size 13 --json \
    > client_to_$lang.json; echo $? > client_to_$lang.rc
  wait_for server_$lang.out "closed:"
  kill $S; wait $S 2> /dev/null
done
echo "servers $(now)" >> timing
sleep 0.5
kill -INT $CAP; wait $CAP; echo $? > cap.rc
"""

NESTED = r"""
import json, signal, subprocess, time
from pathlib import Path
from vsockmon.lab.inside import GuestProgram

def wait_for(path, text, count=1, timeout=300):
    deadline = time.monotonic() + timeout
    while Path(path).read_text().count(text) < count:
        assert time.monotonic() < deadline, f"timeout: {text} in {path}"
        time.sleep(0.1)

start = time.monotonic()
# Port 9999 only: the programs' uploads to the guest's run service stay out of the capture.
with open("cap.err", "w") as err:
    cap = subprocess.Popen(["vsockmon", "capture", "-w", "nested.pcap", "--port", "9999",
                            "--json"], stderr=err)
wait_for("cap.err", "listening")
with open("server.json", "w") as out, open("server.err", "w") as err:
    srv = subprocess.Popen(["vsockmon", "echo", "server", "--port", "9999", "-v", "--json"],
                           stdout=out, stderr=err)
wait_for("server.err", "listening")
for n, lang in enumerate(("c", "go"), 1):
    with GuestProgram(Path(f"seed_client_{lang}"), ["2", "9999"]) as client:
        code, output = client.wait()
    Path(f"client_{lang}.out").write_text(output)
    Path(f"client_{lang}.rc").write_text(f"{code}\n")
    wait_for("server.err", "bytes received, ", n)
srv.send_signal(signal.SIGINT)
Path("server.rc").write_text(f"{srv.wait()}\n")
clients = time.monotonic()
for lang in ("c", "go"):
    with GuestProgram(Path(f"seed_server_{lang}"), ["9999"]) as server:
        server.read_until("listening on")
        done = subprocess.run(["vsockmon", "echo", "client", "--cid", "3", "--port", "9999",
                               "--count", "3", "--size", "13", "--timeout", "60", "--json"],
                              capture_output=True, text=True)
        Path(f"client_to_{lang}.json").write_text(done.stdout + done.stderr)
        Path(f"client_to_{lang}.rc").write_text(f"{done.returncode}\n")
        server.read_until("closed:")
        code, output = server.stop()
    Path(f"server_{lang}.out").write_text(output)
time.sleep(0.5)
cap.send_signal(signal.SIGINT)
Path("cap.rc").write_text(f"{cap.wait()}\n")
end = time.monotonic()
Path("timing").write_text(f"clients {clients - start:.1f}\nservers {end - clients:.1f}\n")
"""


def _script(template: str) -> str:
    for role in ("server", "client"):
        for lang in ("python", "c", "go"):
            template = template.replace(f"@{role}_{lang}@", command(role, lang))
    return template


@pytest.fixture(scope="module")
def loopback(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("echo-loopback")
    build(d)
    (d / "matrix.sh").write_text(_script(LOOPBACK))
    done = lab.run(["bash", "matrix.sh"], cwd=d, timeout=600)
    (d / "lab.out").write_text(done.output)
    assert done.returncode == 0, done.output[-3000:]
    (d / "boot").write_text(f"{done.boot_seconds:.1f} {done.seconds:.1f}\n")
    return d


@pytest.fixture(scope="module")
def nested(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole nested part of the matrix in one boot of the nested guest (60-180 s)."""
    d = tmp_path_factory.mktemp("echo-nested")
    build(d)
    (d / "matrix.py").write_text(NESTED)
    done = lab.run(["python3", "matrix.py"], cwd=d, timeout=900, guest_cid=3)
    (d / "lab.out").write_text(done.output)
    assert done.returncode == 0, done.output[-3000:]
    (d / "boot").write_text(f"{done.boot_seconds:.1f} {done.seconds:.1f}\n")
    return d


def _connections(path: Path) -> list[dict]:
    """Each connection of the capture in order of appearance: its ends and the RW bytes
    each way (the header's len bytes of each frame: the kernel may tap more)."""
    conns: dict[tuple[int, int, int, int], dict] = {}
    with open_capture(str(path)) as reader:
        for record in reader.records():
            v = VIRTIO_HEADER.unpack(record.data, MON_HDR_LEN)
            src, dst = (v["src_cid"], v["src_port"]), (v["dst_cid"], v["dst_port"])
            if v["op"] == Op.REQUEST and (*src, *dst) not in conns:
                conns[(*src, *dst)] = {"client": src, "server": dst,
                                       "to_server": b"", "to_client": b""}
            payload = record.data[MON_HDR_LEN + VIRTIO_HDR_LEN:][: v["len"]]
            if v["op"] != Op.RW:
                continue
            if (*src, *dst) in conns:
                conns[(*src, *dst)]["to_server"] += payload
            elif (*dst, *src) in conns:
                conns[(*dst, *src)]["to_client"] += payload
        assert reader.stopped is None, reader.stopped
    return list(conns.values())


def _by_server_port(conns: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for c in conns:
        out[c["server"][1]].append(c)
    return out


def _check_clients_against_echo_server(d: Path, langs: tuple[str, ...], client_cid: int,
                                       server_cid: int, pcap: str) -> None:
    """Seed clients → ``vsockmon echo server``: each sent 13 bytes, the capture holds them,
    the server counted them, and nothing ended abruptly."""
    for lang in langs:
        assert (d / f"client_{lang}.rc").read_text().strip() == "0", (d / f"client_{lang}.out"
                                                                     ).read_text()
        assert f"sent 13 bytes to {server_cid}:9999" in (d / f"client_{lang}.out").read_text()
    assert (d / "server.rc").read_text().strip() == "0"
    to_echo = [c for c in _connections(d / pcap) if c["server"] == (server_cid, 9999)]
    assert [c["to_server"] for c in to_echo] == [HELLO] * len(langs)
    assert {c["client"][0] for c in to_echo} == {client_cid}
    assert {c["server"][0] for c in to_echo} == {server_cid}
    stats = json.loads((d / "server.json").read_text())
    assert stats["connections"] == len(langs) and stats["resets"] == 0
    assert stats["bytes"] == 13 * len(langs)
    # one entry per client, named by the address the capture shows, in the same order
    assert [c["peer"] for c in stats["clients"]] == [
        f"{c['client'][0]}:{c['client'][1]}" for c in to_echo]
    for entry in stats["clients"]:
        assert entry["received"] == 13 and entry["end"] in ("eof", "left")
        assert entry["echoed"] in (0, 13)  # the echo bounces when the client is gone first
    err = (d / "server.err").read_text()
    assert err.count("sent 13 bytes: b'Hello, world!'") >= len(langs)
    summary = re.search(r"served (\d+) connections, \d+ reads, (\d+) bytes received, "
                        r"\d+ echoed, (\d+) ended abruptly", err)
    assert summary and summary.groups() == (str(len(langs)), str(13 * len(langs)), "0")


def _check_echo_client_against_seed_servers(d: Path, servers: dict[str, int],
                                            client_cid: int, server_cid: int,
                                            pcap: str) -> None:
    """``vsockmon echo client`` → seed servers (language → port, in the order they ran):
    every byte came back, the capture holds the client's bytes both ways, and the seed
    server printed the 39 bytes it got."""
    conns = _by_server_port(_connections(d / pcap))
    for lang, port in servers.items():
        assert (d / f"client_to_{lang}.rc").read_text().strip() == "0"
        report = json.loads((d / f"client_to_{lang}.json").read_text())
        assert report["verified"] and report["messages"] == 3 and report["bytes"] == 39
        ours = [c for c in conns[port] if c["server"] == (server_cid, port)]
        sharing = [other for other, p in servers.items() if p == port]
        assert len(ours) == len(sharing)
        conn = ours[sharing.index(lang)]  # servers on one port ran one after another
        assert conn["client"][0] == client_cid
        assert conn["to_server"] == CLIENT_BYTES and conn["to_client"] == CLIENT_BYTES
        out = (d / f"server_{lang}.out").read_text()
        assert f"connection from {client_cid}:{conn['client'][1]} closed: 39 bytes" in out


def test_seed_clients_against_the_echo_server_on_loopback(loopback: Path) -> None:
    _check_clients_against_echo_server(loopback, ("python", "c", "go"), 1, 1, "loop.pcap")
    assert (loopback / "cap.rc").read_text().strip() == "0"


def test_the_seed_python_client_is_counted_as_13_bytes_received(loopback: Path) -> None:
    """The issue's first report: the Python seed client was "0 bytes, ended abruptly"."""
    first = json.loads((loopback / "server.json").read_text())["clients"][0]
    assert (first["received"], first["reads"] > 0) == (13, True)
    assert first["end"] != "reset"


def test_echo_client_against_seed_servers_on_loopback(loopback: Path) -> None:
    _check_echo_client_against_seed_servers(loopback, SERVER_PORTS, 1, 1, "loop.pcap")
    python_out = (loopback / "server_python.out").read_text()
    assert "received" in python_out and "b'\\x00\\x01\\x02" in python_out


def test_seed_go_clients_against_the_echo_server_across_the_nested_guest(nested: Path
                                                                        ) -> None:
    """CID 3 → 2: the seed's own topology, the C and Go clients in the nested guest."""
    _check_clients_against_echo_server(nested, ("c", "go"), 3, 2, "nested.pcap")
    assert (nested / "cap.rc").read_text().strip() == "0"
    stats = json.loads((nested / "cap.err").read_text().splitlines()[-1])
    assert stats["kernel_drops"] == 0


def test_echo_client_against_seed_go_servers_in_the_nested_guest(nested: Path) -> None:
    _check_echo_client_against_seed_servers(nested, {"c": 9999, "go": 9999}, 2, 3,
                                            "nested.pcap")


def _read_back(pcap: Path, clients: int, server_cid: int) -> None:
    """The seed clients' bytes (to ``server_cid``:9999) as tshark and the walkthrough's
    commands (``conns``, ``follow``) read them from the capture, on the host."""
    rw_to_server = (f"vsock.virtio.op == 5 && vsock.virtio.dst_cid == {server_cid} && "
                    "vsock.virtio.dst_prot == 9999")
    tshark = subprocess.run(["tshark", "-r", str(pcap), "-Y", rw_to_server, "-T", "fields",
                             "-e", "vsock.payload"], capture_output=True, text=True, check=True)
    assert tshark.stdout.split() == [HELLO.hex()] * clients
    conns = subprocess.run([VSOCKMON, "conns", str(pcap), "--json"], capture_output=True,
                           text=True, check=True)
    streams = [c["stream"] for c in map(json.loads, conns.stdout.splitlines())
               if (c["server_cid"], c["server_port"]) == (server_cid, 9999)]
    assert len(streams) == clients
    for stream in streams:
        follow = subprocess.run([VSOCKMON, "follow", str(pcap), "--conn", str(stream), "--raw",
                                 "--dir", "c2s"], capture_output=True, check=True)
        assert follow.stdout == HELLO
        shown = subprocess.run([VSOCKMON, "follow", str(pcap), "--conn", str(stream)],
                               capture_output=True, text=True, check=True).stdout
        assert shown.splitlines()[-1] == HELLO.decode()
    table = subprocess.run([VSOCKMON, "conns", str(pcap)], capture_output=True, text=True,
                           check=True).stdout
    rows = [line.split() for line in table.splitlines() if f" {server_cid}:9999 " in line]
    # bytes c→s/s→c: 13 from each client; the echo is there only when it beat the close
    assert [row[8].split("/")[0] for row in rows] == ["13"] * clients


def test_the_loopback_capture_read_back(loopback: Path) -> None:
    _read_back(loopback / "loop.pcap", 3, 1)


def test_the_nested_capture_read_back(nested: Path) -> None:
    _read_back(nested / "nested.pcap", 2, 2)
