"""Facts about the Debian kernel package, read from tool output and from the kernel image.

Parsing lives here, apart from the commands that produce the text, so each rule can be
tested on a string. This module does no I/O.
"""

from __future__ import annotations

import lzma
import re
import struct
from collections.abc import Iterable

LAB_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet_virtio",
    "9p",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vsock_loopback",
    "vsockmon",
    "vsock_diag",
    "vhost_iotlb",
    "vhost",
    "vhost_vsock",
)
"""Modules the lab VM loads: virtio + 9p for the host's files, vsock over loopback, the
vsockmon tap, vsock_diag for ``ss``, and vhost-vsock to act as the host of a nested guest."""

GUEST_MODULES: tuple[str, ...] = ("virtio_pci", "vmw_vsock_virtio_transport")
"""Modules the nested guest loads: the virtio transport behind its vhost-vsock-pci device."""

_DEPENDS = re.compile(r"^\s*Depends:\s*(linux-image-\S+)\s*$", re.MULTILINE)
_INSMOD = re.compile(r"^insmod\s+(\S+\.ko(?:\.[xg]z|\.zst)?)\b", re.MULTILINE)


def versioned_package(apt_cache_depends: str) -> str | None:
    """The versioned image package a meta package depends on, from ``apt-cache depends``.

    ``linux-image-amd64`` depends on ``linux-image-6.1.0-56-amd64``; Debian bumps the ABI
    number with security updates, so it is looked up, never written down.
    """
    match = _DEPENDS.search(apt_cache_depends)
    return match.group(1) if match else None


def kernel_version(package: str) -> str:
    """The kernel release (``uname -r``, the modules directory) of an image package."""
    return package.removeprefix("linux-image-").removesuffix("-unsigned")


def load_order(show_depends: Iterable[str]) -> list[str]:
    """Module paths in load order from ``modprobe --show-depends`` outputs, each once.

    modprobe prints every dependency before the module itself, so the first mention of a
    module is already after everything it needs.
    """
    order: list[str] = []
    for text in show_depends:
        for path in _INSMOD.findall(text):
            if path not in order:
                order.append(path)
    return order


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (Debian's are xz-compressed).

    qemu boots that ELF directly (PVH), which spares the nested guest a decompression that
    costs ~35 s under nested emulation. The boot protocol header locates the payload:
    ``setup_sects`` at 0x1F1, ``payload_offset``/``payload_length`` at 0x248.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise ValueError("not a bzImage (no HdrS boot header)")
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if not payload.startswith(b"\xfd7zXZ\x00"):
        raise ValueError("the bzImage payload is not xz-compressed")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    if not elf.startswith(b"\x7fELF"):
        raise ValueError("the bzImage payload is not an ELF kernel")
    return elf


def is_static_elf(data: bytes) -> bool:
    """Whether a 64-bit little-endian ELF executable has no interpreter (PT_INTERP).

    The initramfs holds no C library: a dynamically linked busybox would not start there.
    """
    if not data.startswith(b"\x7fELF\x02\x01"):
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    types = (struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum))
    return pt_interp not in types
