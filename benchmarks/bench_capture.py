#!/usr/bin/env python3
"""Live capture under load: ``vsockmon capture`` against tcpdump, in the lab VM, same run.

On the host this boots the lab and runs itself there (``--in-lab``). In the lab it creates
``vsockmon0``, then for each one-way workload starts ``vsockmon capture`` and
``tcpdump -i vsockmon0`` side by side on that link (each with its defaults, as a user runs
them), drives the workload at full rate from one sender to one receiver over loopback
(CID 1), stops both with SIGINT and reads their own statistics: frames written, frames the
kernel handed to the socket ("seen"), frames it dropped for want of buffer room — next to
the link's own counter of frames tapped (``/sys/class/net/vsockmon0/statistics``), the
independent truth.

Workloads (``--only`` picks some):
  burst    20,000 one-byte ``send()`` calls to a receiver that stalls reading for 6 s; both
           capturers get SIGINT 3 s after the burst, while the receiver still stalls
           (issue 17's scenario: a chatty agent, sd_notify or log lines)
  small    200,000 sends of 64 B
  bulk     ``--bulk-mib`` MiB in 64 KiB writes (2048 = 2 GiB; both write to /dev/null: the
           lab VM has 1 GiB of RAM for its tmpfs)
  seqpacket 20,000 SEQPACKET messages of 1,000 B

Usage: ``benchmarks/bench_capture.py [--reps N] [--only NAME ...] [--bulk-mib MIB]
[--vsockmon-opts '...'] [--json]``
Goal: every frame the kernel saw written, at least as many frames as tcpdump.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

PORT = 9999
LINK = "vsockmon0"


class Workload(NamedTuple):
    kind: int  # socket.SOCK_STREAM or SOCK_SEQPACKET
    size: int
    count: int
    stall: float  # seconds the receiver waits before its first read
    stop_after: float  # seconds after the last send until both capturers get SIGINT


def workloads(bulk_mib: int) -> dict[str, Workload]:
    return {
        "burst": Workload(socket.SOCK_STREAM, 1, 20_000, 6.0, 3.0),
        "small": Workload(socket.SOCK_STREAM, 64, 200_000, 0.0, 2.0),
        "bulk": Workload(socket.SOCK_STREAM, 65536, bulk_mib * 16, 0.0, 2.0),
        "seqpacket": Workload(socket.SOCK_SEQPACKET, 1000, 20_000, 0.0, 2.0),
    }


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early: {path.read_text()[-500:]}")
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {text!r} in {path}")


def _tapped() -> int:
    """Frames the link has tapped so far (vsockmon counts each as received)."""
    return int(Path(f"/sys/class/net/{LINK}/statistics/rx_packets").read_text())


def _cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU the process has used so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tcpdump_stats(text: str) -> dict[str, int]:
    def grab(what: str) -> int:
        m = re.search(rf"(\d+) packets? {what}", text)
        return int(m.group(1)) if m else -1

    return {"written": grab("captured"), "kernel_seen": grab("received by filter"),
            "kernel_drops": grab("dropped by kernel")}


def _our_stats(text: str) -> dict[str, int | str]:
    """vsockmon's --json summary, and its loss warning if any."""
    lines = text.strip().splitlines()
    stats = json.loads(next(ln for ln in reversed(lines) if ln.startswith("{")))
    return {"written": stats["packets"], "kernel_seen": stats["kernel_seen"],
            "kernel_drops": stats["kernel_drops"], "lost_at_stop": stats.get("lost_at_stop", -1),
            "warning": next((ln for ln in lines if ln.startswith("warning:")), "")}


def _receiver(server: socket.socket, stall: float, got: list[int]) -> None:
    conn, _ = server.accept()
    time.sleep(stall)
    total = 0
    while data := conn.recv(1 << 20):
        total += len(data)
    got.append(total)
    conn.close()


def _send(w: Workload) -> int:
    """The workload's sends, as fast as the sender can; returns the bytes sent."""
    s = socket.socket(socket.AF_VSOCK, w.kind)
    s.connect((1, PORT))
    buf = b"x" * w.size
    send = s.sendall if w.size > 1 else s.send
    for _ in range(w.count):
        send(buf)
    s.close()
    return w.size * w.count


def one_round(work: Path, name: str, w: Workload, our_opts: list[str]) -> dict:
    """Both capturers on one link while ``w`` runs; their statistics and the link's count."""
    to_null = name == "bulk"
    ours_out = "/dev/null" if to_null else str(work / f"ours-{name}.pcap")
    td_out = "/dev/null" if to_null else str(work / f"td-{name}.pcap")
    ours_err, td_err = work / f"ours-{name}.err", work / f"tcpdump-{name}.err"
    server = socket.socket(socket.AF_VSOCK, w.kind)
    server.bind((socket.VMADDR_CID_ANY, PORT))
    server.listen(1)
    ours = subprocess.Popen(["vsockmon", "capture", "-w", ours_out, "--json", "--force",
                             *our_opts], stderr=ours_err.open("w"))
    _wait_for(ours_err, "listening on", ours)
    our_cpu = _cpu_seconds(ours)
    tcpdump = subprocess.Popen(["tcpdump", "-i", LINK, "-w", td_out, "-Z", "root"],
                               stderr=td_err.open("w"))
    _wait_for(td_err, "listening on", tcpdump)
    td_cpu = _cpu_seconds(tcpdump)
    before = _tapped()
    got: list[int] = []
    reader = threading.Thread(target=_receiver, args=(server, w.stall, got))
    reader.start()
    start = time.monotonic()
    sent = _send(w)
    send_s = time.monotonic() - start
    if not w.stall:
        reader.join()
    time.sleep(w.stop_after)
    at_stop = _tapped() - before
    our_cpu, td_cpu = _cpu_seconds(ours) - our_cpu, _cpu_seconds(tcpdump) - td_cpu
    tcpdump.send_signal(signal.SIGINT)
    ours.send_signal(signal.SIGINT)
    tcpdump.wait(timeout=300)
    ours.wait(timeout=300)
    reader.join()
    server.close()
    for f in work.glob(f"*-{name}.pcap"):
        f.unlink()
    return {"workload": name, "sent_bytes": sent, "received_bytes": got[0] if got else -1,
            "send_s": round(send_s, 3), "tapped_at_stop": at_stop,
            "vsockmon": {**_our_stats(ours_err.read_text()), "rc": ours.returncode,
                         "cpu_s": our_cpu},
            "tcpdump": {**_tcpdump_stats(td_err.read_text()), "cpu_s": td_cpu}}


def in_lab(names: list[str], reps: int, bulk_mib: int, our_opts: list[str]) -> list[dict]:
    subprocess.run(["ip", "link", "add", "name", LINK, "type", "vsockmon"], check=True)
    subprocess.run(["ip", "link", "set", LINK, "up"], check=True)
    work = Path.cwd()
    table = workloads(bulk_mib)
    return [one_round(work, name, table[name], our_opts) for name in names for _ in range(reps)]


def table(rows: list[dict]) -> str:
    head = (f"{'workload':>9} {'send s':>7} {'tapped':>8} {'capturer':>9} {'written':>8} "
            f"{'seen':>8} {'dropped':>8} {'lost at stop':>12} {'written/tapped':>14} "
            f"{'CPU µs/frame':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for who in ("vsockmon", "tcpdump"):
            d = r[who]
            lost = d.get("lost_at_stop", "")
            lines.append(
                f"{r['workload']:>9} {r['send_s']:>7.1f} {r['tapped_at_stop']:>8} {who:>9} "
                f"{d['written']:>8} {d['kernel_seen']:>8} {d['kernel_drops']:>8} "
                f"{'' if lost in ('', -1) else lost:>12} "
                f"{d['written'] / max(r['tapped_at_stop'], 1) * 100:>13.2f}% "
                f"{d['cpu_s'] / max(d['written'], 1) * 1e6:>12.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=1, help="rounds per workload")
    ap.add_argument("--only", nargs="+", choices=list(workloads(1)),
                    default=list(workloads(1)), help="workloads to run")
    ap.add_argument("--bulk-mib", type=int, default=2048, help="MiB the bulk workload sends")
    ap.add_argument("--vsockmon-opts", default="", help="extra options for vsockmon capture")
    ap.add_argument("--kernel", default=None, help="lab kernel series (default: the lab's)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--in-lab", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_lab:
        rows = in_lab(args.only, args.reps, args.bulk_mib, shlex.split(args.vsockmon_opts))
        print(json.dumps(rows))
        return

    from vsockmon.lab import Lab

    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        lab = Lab.build(kernel=args.kernel) if args.kernel else Lab.build()
        done = lab.run(
            ["python3", str(Path(__file__).resolve()), "--in-lab", "--reps", str(args.reps),
             "--bulk-mib", str(args.bulk_mib), "--vsockmon-opts", args.vsockmon_opts,
             "--only", *args.only],
            cwd=tmp, timeout=3600)
        if done.returncode != 0:
            sys.exit(f"bench_capture: the lab run failed:\n{done.output[-3000:]}")
        rows = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"vsockmon capture vs tcpdump on vsockmon0 in the lab VM ({lab.kernel}, qemu TCG, "
          "loopback CID 1), "
          f"both with their defaults{' + ' + args.vsockmon_opts if args.vsockmon_opts else ''}; "
          "'tapped': the link's own counter from ready to SIGINT")
    print(table(rows))


if __name__ == "__main__":
    main()
