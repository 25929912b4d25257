#!/usr/bin/env python3
"""Live capture under load: ``vsockmon capture`` against tcpdump, in the lab VM, same run.

On the host this boots the lab and runs itself there (``--in-lab``). In the lab, for each
write size (64 KiB and 64 B) and each configuration (our TPACKET_V3 mmap ring, our batched
recvmsg — both with the same kernel buffer as tcpdump — and both tools' defaults), it starts
an echo server, then ``vsockmon capture`` and ``tcpdump -i vsockmon0``
side by side on the same link, drives the echo client at full speed for ``--seconds``, stops
both with SIGINT and reads their own statistics: frames written, frames the kernel handed to
the socket, frames it dropped for want of buffer room, and the CPU time each capturer used
per frame written while capturing (from its "listening" line on). Both get the same kernel buffer
(``-B``) and write a bounded ring of files into the VM's tmpfs (not the 9p share), so the
comparison is about reading, not about the disk. Prints a table; ``--json`` for scripts.

Usage: ``benchmarks/bench_capture.py [--seconds S] [--reps N] [--concurrency C]
[--buffer-mb MB] [--json]``
Goal: our drop ratio no worse than tcpdump's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = (65536, 64)
PORT = 9999


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited early: {path.read_text()[-500:]}")
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {text!r} in {path}")


def _cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU the process has used so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(proc: subprocess.Popen) -> float:
    """Stop with SIGINT; the CPU seconds it used while capturing."""
    cpu = _cpu_seconds(proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    return cpu


def _tcpdump_stats(text: str) -> dict[str, int]:
    def grab(what: str) -> int:
        m = re.search(rf"(\d+) packets? {what}", text)
        return int(m.group(1)) if m else -1

    return {"written": grab("captured"), "kernel_seen": grab("received by filter"),
            "kernel_drops": grab("dropped by kernel")}


CONFIGS = {
    # name: (our extra options, tcpdump's extra options); {mb} is --buffer-mb
    "mmap": (["-B", "{mb}"], ["-B", "{kb}"]),
    "recvmsg": (["-B", "{mb}", "--no-mmap"], ["-B", "{kb}"]),
    "defaults": ([], []),  # as a user runs them: 8 MiB for vsockmon, 2 MiB for tcpdump
}


def one_round(work: Path, size: int, config: str, seconds: float, buffer_mb: int,
              concurrency: int) -> dict:
    """Both capturers on one link while the echo client runs flat out for ``seconds``."""
    tag = f"{size}-{config}"
    ours_err, td_err = work / f"ours-{tag}.err", work / f"tcpdump-{tag}.err"
    ours_opts, td_opts = (
        [o.format(mb=buffer_mb, kb=buffer_mb * 1024) for o in opts] for opts in CONFIGS[config])
    ring_mb = 40
    ours = subprocess.Popen(
        ["vsockmon", "capture", "-w", f"/tmp/ours-{tag}.pcap", "--ring", "2",
         "--ring-size", str(ring_mb), "--json", "--force", *ours_opts],
        stderr=ours_err.open("w"))
    _wait_for(ours_err, "listening on", ours)
    our_start = _cpu_seconds(ours)
    tcpdump = subprocess.Popen(
        ["tcpdump", "-i", "vsockmon0", "-w", f"/tmp/td-{tag}.pcap", "-C", str(ring_mb),
         "-W", "2", "-Z", "root", *td_opts],
        stderr=td_err.open("w"))
    _wait_for(td_err, "listening on", tcpdump)
    td_start = _cpu_seconds(tcpdump)
    client = subprocess.run(
        ["vsockmon", "echo", "client", "--cid", "1", "--port", str(PORT), "--size", str(size),
         "--duration", str(seconds), "--concurrency", str(concurrency), "--json"],
        capture_output=True, text=True)
    time.sleep(1.0)  # let both drain what is queued
    td_cpu = _stop(tcpdump)
    our_cpu = _stop(ours)
    report = json.loads(client.stdout) if client.returncode == 0 else {}
    stats = json.loads(ours_err.read_text().strip().splitlines()[-1])
    for f in Path("/tmp").glob(f"*-{tag}.pcap*"):
        f.unlink()
    return {
        "size": size, "config": config, "seconds": report.get("seconds", seconds),
        "client_msgs": report.get("messages", 0),
        "vsockmon": {"written": stats["packets"], "kernel_seen": stats["kernel_seen"],
                     "kernel_drops": stats["kernel_drops"], "cpu_s": our_cpu - our_start},
        "tcpdump": {**_tcpdump_stats(td_err.read_text()), "cpu_s": td_cpu - td_start},
    }


def _merge(rounds: list[dict]) -> dict:
    """Repetitions of one size and config, summed."""
    out = {**rounds[0], "reps": len(rounds)}
    for key in ("seconds", "client_msgs"):
        out[key] = sum(r[key] for r in rounds)
    for who in ("vsockmon", "tcpdump"):
        out[who] = {k: sum(r[who][k] for r in rounds) for k in rounds[0][who]}
    return out


def in_lab(seconds: float, buffer_mb: int, reps: int, concurrency: int) -> list[dict]:
    work = Path.cwd()
    server = subprocess.Popen(["vsockmon", "echo", "server", "--port", str(PORT)],
                              stderr=(work / "server.err").open("w"))
    _wait_for(work / "server.err", "listening", server)
    try:
        return [_merge([one_round(work, size, config, seconds, buffer_mb, concurrency)
                        for _ in range(reps)])
                for size in SIZES for config in CONFIGS]
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)


def _ratio(d: dict) -> float:
    return d["kernel_drops"] / d["kernel_seen"] * 100 if d["kernel_seen"] > 0 else 0.0


def table(rows: list[dict]) -> str:
    head = (f"{'write':>6} {'client msg/s':>12} {'capturer':>18} {'written':>9} "
            f"{'written/s':>10} {'kernel seen':>11} {'dropped':>8} {'drop %':>7} "
            f"{'CPU µs/frame':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        secs = r["seconds"] + r["reps"]  # the client's time, plus the drain second
        tail = " (defaults)" if r["config"] == "defaults" else ""
        for who, label in (("vsockmon", f"vsockmon {r['config']}"),
                           ("tcpdump", f"tcpdump{tail}")):
            d = r[who]
            lines.append(
                f"{r['size']:>6} {r['client_msgs'] / r['seconds']:>12.0f} {label:>18} "
                f"{d['written']:>9} {d['written'] / secs:>10.0f} {d['kernel_seen']:>11} "
                f"{d['kernel_drops']:>8} {_ratio(d):>6.2f}% "
                f"{d['cpu_s'] / max(d['written'], 1) * 1e6:>12.0f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="client run per round")
    ap.add_argument("--buffer-mb", type=int, default=8, help="kernel buffer of both capturers")
    ap.add_argument("--reps", type=int, default=2, help="rounds per size and config, summed")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="echo connections at once (more: overload the VM)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--in-lab", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_lab:
        rows = in_lab(args.seconds, args.buffer_mb, args.reps, args.concurrency)
        print(json.dumps(rows))
        return

    from vsockmon.lab import Lab

    with tempfile.TemporaryDirectory(prefix="bench-capture-") as tmp:
        done = Lab.build().run(
            ["python3", str(Path(__file__).resolve()), "--in-lab", "--seconds",
             str(args.seconds), "--buffer-mb", str(args.buffer_mb), "--reps", str(args.reps),
             "--concurrency", str(args.concurrency)],
            cwd=tmp, timeout=1800)
        if done.returncode != 0:
            sys.exit(f"bench_capture: the lab run failed:\n{done.output[-2000:]}")
        rows = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"vsockmon capture vs tcpdump on vsockmon0 in the lab VM (qemu TCG, loopback CID 1): "
          f"{args.reps} x {args.seconds:g} s per row, {args.concurrency} echo connection(s), "
          f"a {args.buffer_mb} MiB kernel buffer for "
          f"both unless 'defaults'; host load average {os.getloadavg()[0]:.1f}")
    print(table(rows))


if __name__ == "__main__":
    main()
