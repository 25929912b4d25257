"""Runs INSIDE the lab VM: measures what a kernel's vsock tap and transport do, as JSON.

Standard library and vsockmon.lab.inside only (imports cost seconds under emulation). Each
probe captures loopback (CID 1) traffic with tcpdump on vsockmon0 and reports what the tap
showed next to what was sent, so tests/test_kernel_facts_lab.py can hold the kernel table
(vsockmon/live/kernel_facts.py, doctor's source) against the real kernel.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from pathlib import Path

from vsockmon.lab.inside import add_link, capture, vsock_socket

SO_ZEROCOPY = 60
MSG_ZEROCOPY = 0x4000000
SO_VM_SOCKETS_BUFFER_SIZE = 0
SO_VM_SOCKETS_BUFFER_MIN_SIZE = 1
SO_VM_SOCKETS_BUFFER_MAX_SIZE = 2
PATTERN = bytes(range(256)) * 256  # 64 KiB whose every byte is known


def rw_payloads(path: Path, port: int) -> list[bytes]:
    """The captured payload (all bytes after the two headers) of each RW frame to ``port``."""
    data = path.read_bytes()
    out, pos = [], 24
    while pos + 16 <= len(data):
        caplen = struct.unpack_from("<I", data, pos + 8)[0]
        frame = data[pos + 16: pos + 16 + caplen]
        pos += 16 + caplen
        if len(frame) >= 76 and struct.unpack_from("<H", frame, 32 + 30)[0] == 5 \
                and struct.unpack_from("<I", frame, 32 + 20)[0] == port:
            out.append(frame[76:])
    return out


def serve(port: int, stall: float, got: list[int]) -> threading.Thread:
    """A listener on ``port`` that accepts once, waits ``stall`` seconds, then reads to EOF."""
    listener = vsock_socket()
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen()

    def run() -> None:
        conn, _ = listener.accept()
        time.sleep(stall)
        try:
            while chunk := conn.recv(1 << 16):
                got.append(len(chunk))
        except OSError as e:
            got.append(-e.errno)
        conn.close()
        listener.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def zerocopy(port: int = 6001) -> dict[str, object]:
    """Send 64 KiB with MSG_ZEROCOPY; does the tap show the bytes that were sent?"""
    got: list[int] = []
    thread = serve(port, 0.0, got)
    path = Path("zerocopy.pcap")
    result: dict[str, object] = {}
    with capture(path), vsock_socket() as s:
        s.connect((1, port))
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
            s.send(PATTERN, MSG_ZEROCOPY)
            result["supported"] = True
        except OSError as e:
            result["supported"] = False
            result["error"] = os.strerror(e.errno or 0)
            s.sendall(PATTERN)
        s.shutdown(socket.SHUT_WR)
        thread.join()
    tapped = b"".join(rw_payloads(path, port))
    result["sent"] = len(PATTERN)
    result["received"] = sum(n for n in got if n > 0)
    result["tap_bytes"] = len(tapped)
    result["tap_equal"] = tapped == PATTERN
    return result


def tiny_writes(port: int = 6002, count: int = 20000) -> dict[str, object]:
    """``count`` one-byte writes to a reader that stalls 6 s: is the connection reset?"""
    got: list[int] = []
    thread = serve(port, 6.0, got)
    error = ""
    with vsock_socket() as s:
        s.connect((1, port))
        try:
            for _ in range(count):
                s.send(b"x")
        except OSError as e:
            error = os.strerror(e.errno or 0)
        s.shutdown(socket.SHUT_WR) if not error else None
        thread.join()
    return {"count": count, "send_error": error,
            "received": sum(n for n in got if n > 0),
            "recv_error": next((os.strerror(-n) for n in got if n < 0), "")}


def buffer_options() -> dict[str, int]:
    with vsock_socket() as s:
        return {name: s.getsockopt(socket.AF_VSOCK, opt)
                for name, opt in (("buffer_size", SO_VM_SOCKETS_BUFFER_SIZE),
                                  ("buffer_min", SO_VM_SOCKETS_BUFFER_MIN_SIZE),
                                  ("buffer_max", SO_VM_SOCKETS_BUFFER_MAX_SIZE))}


if __name__ == "__main__":
    add_link()
    facts = {"release": os.uname().release,
             "proc_version": Path("/proc/version").read_text(), "zerocopy": zerocopy(),
             "tiny_writes": tiny_writes(), "options": buffer_options()}
    print("FACTS " + json.dumps(facts), flush=True)
