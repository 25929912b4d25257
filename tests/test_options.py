"""Options no other test reached: ``conns --stream``, ``stats --top``, ``timeline --limit``,
``--png`` over an existing file, ``follow --raw --hex``, ``decode --verify`` on stdin,
``flags has RCV`` (and every flag and comparison operator, against tshark's display
filters), ``lab status``.

Expected values come from the generator (tests/conntrack_scenarios.py: ``echo_capture``
builds seven connections whose every packet is known), from tshark, or from the file system.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conntrack_scenarios import echo_capture

from vsockmon.cli import main
from vsockmon.decode.verify import our_records

ROOT = Path(__file__).resolve().parent.parent
VSOCKMON = str(Path(sys.executable).with_name("vsockmon"))

# What echo_capture builds, stream by stream (its comments): (client, server, close, payload
# bytes both ways).
ECHO_STREAMS = {
    0: ("1:50000", "1:1234", "graceful", 24),  # "hello vsock\n" each way
    1: ("1:50000", "1:1234", "reset-by-server", 5),  # "again", then the server's RST
    2: ("1:50001", "1:5999", "refused", 0),
    3: ("3:60000", "2:5002", "graceful", 21),  # one, two-a, two-b, three; ack back
    4: ("1:50002", "1:5006", "half-closed", 7),  # "request"
    5: ("3:50003", "2:1024", "unanswered", 0),
    6: ("2:1500000", "3:5007", "open", 200),  # 100 bytes each way
}


def run(*args: str, code: int = 0, stdin: bytes | None = None) -> tuple[str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    assert result.exit_code == code, result.output + result.stderr
    return result.stdout, result.stderr


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return echo_capture(tmp_path_factory.mktemp("echo") / "echo.pcap")


# -- conns --stream -------------------------------------------------------------------------


@pytest.mark.parametrize("streams", [[2], [5, 2], [0, 6, 3]])
def test_conns_stream_selects_exactly_those(echo: Path, streams: list[int]) -> None:
    args = [a for s in streams for a in ("--stream", str(s))]
    out, _ = run("conns", str(echo), "--json", *args)
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["stream"] for r in recs] == sorted(streams)
    for r in recs:
        client, server, close, nbytes = ECHO_STREAMS[r["stream"]]
        assert (r["client"], r["server"], r["close"]) == (client, server, close)
        assert r["bytes_c2s"] + r["bytes_s2c"] == nbytes


def test_conns_stream_without_match_lists_nothing(echo: Path) -> None:
    out, _ = run("conns", str(echo), "--stream", "7")
    assert out.splitlines()[-1] == "0 of 7 connections; 40 frames"
    assert run("conns", str(echo), "--stream", "7", "--json")[0] == ""


# -- stats --top ----------------------------------------------------------------------------


@pytest.mark.parametrize("top", [1, 2, 3])
def test_stats_top_keeps_the_n_first_rows(echo: Path, top: int) -> None:
    """Rankings reasoned from the generator: connections by payload bytes (200, 24, 21, …),
    server ports by connections (1234 has streams 0 and 1, every other port one), CIDs by
    connections (CID 1: streams 0, 1, 2, 4; CIDs 2 and 3: streams 3, 5, 6 each)."""
    stats = json.loads(run("stats", str(echo), "--json", "--top", str(top))[0])
    by_bytes = sorted(ECHO_STREAMS, key=lambda s: -ECHO_STREAMS[s][3])
    assert [c["stream"] for c in stats["top_connections"]] == by_bytes[:top]
    assert [c["bytes"] for c in stats["top_connections"]] == \
        [ECHO_STREAMS[s][3] for s in by_bytes[:top]]
    assert len(stats["top_ports"]) == top and stats["top_ports"][0]["port"] == 1234
    assert stats["top_ports"][0]["connections"] == 2
    assert len(stats["top_cids"]) == top
    assert (stats["top_cids"][0]["cid"], stats["top_cids"][0]["connections"]) == (1, 4)
    assert all(c["connections"] == 3 for c in stats["top_cids"][1:])


def test_stats_top_text_rows(echo: Path) -> None:
    out, _ = run("stats", str(echo), "--top", "1")
    lines = out.splitlines()
    table = lines[lines.index("top connections by bytes"):]
    assert table[3].split()[:5] == ["6", "STREAM", "2:1500000", "3:5007", "200"]
    assert table[4] == ""  # one row only
    _, err = run("stats", str(echo), "--top", "0", code=2)
    assert "0 is not in the range x>=1" in err


# -- timeline --limit and --png over a file -----------------------------------------------------


def test_timeline_limit_draws_the_first_n_streams(echo: Path) -> None:
    out, err = run("timeline", str(echo), "--limit", "2")
    heads = [line.split()[1] for line in out.splitlines() if line.startswith("stream ")]
    assert heads == ["0", "1"]
    assert err == "the first 2 of 7 connections; use --conn or --limit\n"
    out, err = run("timeline", str(echo), "--limit", "7")
    assert [line.split()[1] for line in out.splitlines() if line.startswith("stream ")] == \
        [str(s) for s in range(7)]
    assert err == ""


def test_timeline_limit_in_html(echo: Path, tmp_path: Path) -> None:
    """Streams 0-2: three sequence diagrams, and credit plots for the two that carried data
    (stream 2 was refused)."""
    page = tmp_path / "t.html"
    run("timeline", str(echo), "--limit", "3", "--html", str(page))
    assert page.read_text().count("<svg") == 3 + 2


def test_png_is_not_overwritten_without_force(echo: Path, tmp_path: Path) -> None:
    png = tmp_path / "t.png"
    png.write_bytes(b"precious")
    _, err = run("timeline", str(echo), "--conn", "0", "--png", str(png), code=1)
    assert err.count("\n") == 1 and "exists; use --force" in err
    assert png.read_bytes() == b"precious"
    run("timeline", str(echo), "--conn", "0", "--png", str(png), "--force")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- follow --raw --hex, decode --verify on stdin ----------------------------------------------


def test_follow_raw_and_hex_together_are_refused(echo: Path) -> None:
    out, err = run("follow", str(echo), "--conn", "0", "--raw", "--hex", "--dir", "c2s", code=2)
    assert out == "" and "choose one of --raw and --hex" in err
    assert "Traceback" not in err


def test_follow_raw_refuses_a_terminal_and_writes_nothing_to_it(echo: Path) -> None:
    # A payload's escape sequences would drive the terminal (retitle it, remap keys): the
    # bytes go to a file or a pipe only. Stream 0 does carry bytes client→server.
    parent, child = pty.openpty()
    try:
        done = subprocess.run([VSOCKMON, "follow", str(echo), "--conn", "0", "--raw",
                               "--dir", "c2s"], stdout=child, stderr=subprocess.PIPE,
                              timeout=60)
        os.set_blocking(parent, False)
        try:
            shown = os.read(parent, 4096)
        except BlockingIOError:
            shown = b""
    finally:
        os.close(child)
        os.close(parent)
    assert done.returncode == 2
    assert b"redirect them to a file or a pipe, or use --hex" in done.stderr
    assert shown == b""
    assert ECHO_STREAMS[0][3] > 0


def test_decode_verify_reads_stdin() -> None:
    """Through a pipe (gzipped): the same report as for the file, which names frame 15 as
    op 7 and frames 18-20 as flagged SHUTDOWNs (fixtures/synthetic/generate.py)."""
    gz = ROOT / "fixtures" / "synthetic" / "stream-all-ops.pcap.gz"
    piped = subprocess.run([VSOCKMON, "decode", "-", "--verify"], input=gz.read_bytes(),
                           capture_output=True, check=True).stdout.decode()
    named = subprocess.run([VSOCKMON, "decode", str(gz), "--verify"], capture_output=True,
                           check=True).stdout.decode()
    assert piped == named
    assert piped.splitlines() == [
        "known Wireshark error: op 7 is CREDIT_REQUEST, Wireshark says 'Credit response' "
        "(frames 15)",
        "known Wireshark error: flag bits not decoded by Wireshark (we name them) "
        "(frames 18, 19, 20)",
        "25 frames compared: vsockmon and Wireshark agree on every field"]


def test_decode_verify_on_stdin_that_is_not_a_capture() -> None:
    done = subprocess.run([VSOCKMON, "decode", "-", "--verify"], input=b"junk",
                          capture_output=True)
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.decode() == "Error: <stdin>: not a pcap or pcapng file (magic 6a756e6b)\n"


# -- the filter language against tshark's display filters -----------------------------------


FILTERS = {
    # our filter: the same question in Wireshark's display-filter language
    "flags has RCV": "vsock.virtio.op == 4 && vsock.virtio.flags & 1",
    "flags has rcv": "vsock.virtio.op == 4 && vsock.virtio.flags & 1",
    "flags has SEND": "vsock.virtio.op == 4 && vsock.virtio.flags & 2",
    "flags has EOM": "vsock.virtio.op == 5 && vsock.virtio.type == 2 && vsock.virtio.flags & 1",
    "flags has EOR": "vsock.virtio.op == 5 && vsock.virtio.type == 2 && vsock.virtio.flags & 2",
    "not flags has RCV": "!(vsock.virtio.op == 4 && vsock.virtio.flags & 1)",
    "len < 12": "vsock.virtio.len < 12",
    "len <= 12": "vsock.virtio.len <= 12",
    "len > 12": "vsock.virtio.len > 12",
    "len >= 12": "vsock.virtio.len >= 12",
    "len == 12": "vsock.virtio.len == 12",
    "len != 12": "vsock.virtio.len != 12",
    "fwd_cnt >= 0x4000 and op == CREDIT_UPDATE":
        "vsock.virtio.fwd_cnt >= 0x4000 && vsock.virtio.op == 6",
    "cid == 3 || port == 1024":
        "vsock.virtio.src_cid == 3 || vsock.virtio.dst_cid == 3 || vsock.virtio.src_prot == 1024"
        " || vsock.virtio.dst_prot == 1024",
    "cid != 1": "vsock.virtio.op && !(vsock.virtio.src_cid == 1 || vsock.virtio.dst_cid == 1)",
    "type == SEQPACKET and (op == RW or op == SHUTDOWN)":
        "vsock.virtio.type == 2 && (vsock.virtio.op == 5 || vsock.virtio.op == 4)",
    "mon.op == CONTROL": "vsock.op == 3",
    "frame.len < 76": "frame.len < 76",
    "payload_len > 0": "vsock.payload",
}
FILTER_CAPTURES = ["synthetic/stream-all-ops.pcap", "synthetic/seqpacket-ns.pcapng",
                   "real/half-close.pcap", "real/seqpacket-echo.pcap", "real/credit-stall.pcap",
                   "real/host-guest.pcap", "synthetic/odd-frames.pcap"]


def tshark_frames(path: Path, display_filter: str) -> list[int]:
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-Y", display_filter, "-T", "fields",
                          "-e", "frame.number"], capture_output=True, text=True, check=True)
    return [int(x) for x in out.stdout.split()]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The filter captures end to end in one pcapng (mergecap -a), so tshark runs once per
    filter rather than once per filter and capture."""
    out = tmp_path_factory.mktemp("merged") / "all.pcapng"
    subprocess.run(["mergecap", "-a", "-F", "pcapng", "-w", str(out),
                    *(str(ROOT / "fixtures" / n) for n in FILTER_CAPTURES)], check=True)
    return out


@pytest.mark.parametrize("expr", list(FILTERS))
def test_filters_select_what_tshark_selects(merged: Path, expr: str) -> None:
    ours = [r["frame.number"] for r in _filtered(merged, expr)]
    assert ours == tshark_frames(merged, FILTERS[expr])
    assert ours  # every filter selects something here


def _filtered(path: Path, expr: str) -> list[dict[str, object]]:
    from vsockmon import api

    return [fb.frame(i).fields() for fb, idx in api.open(str(path)).frames(expr) for i in idx]


def test_flags_has_rcv_on_the_generated_shutdowns() -> None:
    """stream-all-ops.pcap closes with SHUTDOWN flags 2, 1, 3 (frames 18-20): RCV is set in
    the last two; seqpacket-ns.pcapng's one SHUTDOWN (frame 9) has flags 3."""
    stream = ROOT / "fixtures" / "synthetic" / "stream-all-ops.pcap"
    out, _ = run("decode", str(stream), "-Y", "flags has RCV", "--json")
    assert [json.loads(x)["frame.number"] for x in out.splitlines()] == [19, 20]
    seq = ROOT / "fixtures" / "synthetic" / "seqpacket-ns.pcapng"
    assert [r["frame.number"] for r in _filtered(seq, "flags has RCV")] == [9]
    # the EOM bit of a SEQPACKET RW is bit 1 as well, and is not RCV
    assert 1 in {r["vsock.virtio.flags"] for r in our_records(str(seq))
                 if r["vsock.virtio.op"] == 5}


# -- lab status -------------------------------------------------------------------------------


def test_lab_status_of_the_built_cache_lists_real_files() -> None:
    """The sizes printed are those the file system reports; the lab the tests boot is built."""
    done = subprocess.run([VSOCKMON, "lab", "status"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    cache = Path(lines[1].removeprefix("cache:").strip())
    assert lines[0].split()[1] == cache.name  # the kernel release names its folder
    files = [ln.split() for ln in lines[2:-1]]
    assert files and all(len(f) == 3 and f[1] == "MB" for f in files)
    for size, _mb, rel in files:
        assert size == f"{(cache / rel).stat().st_size / 1e6:.1f}"
    assert any(rel.startswith("kernel/boot/vmlinuz-") for _s, _m, rel in files)
    assert lines[-1] == "state:   built"


def test_lab_status_of_an_empty_cache_says_not_built(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    done = subprocess.run([VSOCKMON, "lab", "status"], capture_output=True, text=True, env=env)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[1] == f"cache:   {tmp_path}/vsockmon/lab/{lines[0].split()[1]}"
    assert all(ln.split()[0] == "missing" for ln in lines[2:-1]) and len(lines) > 3
    assert lines[-1] == "state:   not built: run `vsockmon lab build`"
    assert list(tmp_path.iterdir()) == []  # status only looks
