"""Writing initramfs archives in the cpio "newc" format, in memory.

The kernel unpacks newc archives (several may be concatenated, compressed or not), and
writing them ourselves keeps ownership, modes and order exact without staging a directory
tree as root or depending on the ``cpio`` tool. This module does no I/O.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass

TRAILER = "TRAILER!!!"
"""Name of the entry that ends a newc archive."""


@dataclass(frozen=True)
class Entry:
    """One file, directory or symlink of an archive (owned by root).

    ``data`` is the file's content, or a symlink's target; directories have none.
    """

    name: str
    mode: int
    data: bytes = b""

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> Entry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> Entry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, name: str, target: str) -> Entry:
        return cls(name, stat.S_IFLNK | 0o777, target.encode())


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _record(ino: int, entry: Entry) -> bytes:
    """One header + name + data, each padded to 4 bytes as newc requires."""
    name = entry.name.lstrip("/").encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, 0, 0, len(name), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    head = header + name
    return head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))


def newc_archive(entries: Iterable[Entry]) -> bytes:
    """The bytes of a newc archive holding ``entries`` in order, with its trailer.

    Parents must come before their children: the kernel creates entries in archive order.
    """
    records = [_record(ino, e) for ino, e in enumerate(entries, start=1)]
    records.append(_record(0, Entry(TRAILER, 0)))
    return b"".join(records)
