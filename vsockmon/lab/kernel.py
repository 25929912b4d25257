"""Facts about the Debian kernel package, read from tool output and from the kernel image.

Parsing lives here, apart from the commands that produce the text, so each rule can be
tested on a string. This module does no I/O.
"""

from __future__ import annotations

import lzma
import re
import struct
from collections.abc import Callable, Iterable

LAB_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_pci",
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
vsockmon tap, vsock_diag for ``ss``, and vhost-vsock to act as the host of a nested guest.
Their dependencies (netfs, and fscache where it is still a module of its own: 6.1 but not
6.12) come from ``modprobe --show-depends``, so they are not named here."""

GUEST_MODULES: tuple[str, ...] = ("virtio_pci", "vmw_vsock_virtio_transport")
"""Modules the nested guest loads: the virtio transport behind its vhost-vsock-pci device."""

_DEPENDS = re.compile(r"^\s*Depends:\s*(linux-image-\S+)\s*$", re.MULTILINE)
_IMAGE = re.compile(
    r"^linux-image-(?P<release>\d+\.\d+\.\d+(?:-\d+)?(?:\+deb\d+)?-amd64)(?P<unsigned>-unsigned)?$"
)
"""Debian's amd64 image packages: ``linux-image-6.1.0-57-amd64``,
``linux-image-6.12.117+deb12-amd64-unsigned`` (not the cloud, rt or dbg flavours)."""
_INSMOD = re.compile(r"^insmod\s+(\S+\.ko(?:\.[xg]z|\.zst)?)\b", re.MULTILINE)


def versioned_package(apt_cache_depends: str) -> str | None:
    """The versioned image package a meta package depends on, from ``apt-cache depends``.

    ``linux-image-amd64`` depends on ``linux-image-6.1.0-56-amd64``; Debian bumps the ABI
    number with security updates, so it is looked up, never written down.
    """
    match = _DEPENDS.search(apt_cache_depends)
    return match.group(1) if match else None


def release_key(release: str) -> tuple[int, ...]:
    """A release's numbers in order, for sorting newest last (6.1.0-57 < 6.1.0-58 < 6.12.1)."""
    return tuple(int(n) for n in re.findall(r"\d+", release.removesuffix("-amd64")))


def series(release: str) -> str:
    """The kernel series a release belongs to: ``6.12.117+deb12-amd64`` → ``6.12``."""
    return ".".join(release.split(".")[:2])


def matches(spec: str, release: str) -> bool:
    """Whether ``release`` is the kernel a user asked for with ``spec``: a series (``6.12``),
    a version (``6.12.117``) or a whole release (``6.1.0-57-amd64``); ``""`` matches all."""
    return not spec or release == spec or release.startswith((f"{spec}.", f"{spec}-", f"{spec}+"))


def image_packages(spec: str, package_names: Iterable[str]) -> list[str]:
    """The image packages among ``package_names`` whose release matches ``spec``, newest
    release first, and for one release the signed package before the unsigned one (both
    hold the same kernel and modules; either may be the one the archive still serves)."""
    found = []
    for name in package_names:
        m = _IMAGE.match(name.strip())
        if m and matches(spec, m["release"]):
            found.append((release_key(m["release"]), m["unsigned"] is None, name.strip()))
    return [name for *_, name in sorted(found, reverse=True)]


def is_image_package(name: str) -> bool:
    """Whether ``name`` is an image package itself, rather than a meta package naming one."""
    return _IMAGE.match(name) is not None


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


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"


def extract_vmlinux(bzimage: bytes, unzstd: Callable[[bytes], bytes] | None = None) -> bytes:
    """The uncompressed ELF kernel inside a bzImage: Debian's 6.1 payload is xz (decompressed
    here), 6.12's is zstd (decompressed by ``unzstd``: the standard library has no zstd).

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
    if payload.startswith(XZ_MAGIC):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(ZSTD_MAGIC):
        if unzstd is None:
            raise ValueError("the bzImage payload is zstd-compressed and no zstd was given")
        # The kernel's build appends the decompressed size (u32 LE) after the zstd frame.
        size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
        elf = unzstd(payload[:-4])
        if len(elf) != size:
            raise ValueError(f"the zstd payload gave {len(elf)} bytes, not the {size} it names")
    else:
        raise ValueError(f"the bzImage payload is neither xz nor zstd (magic {payload[:4].hex()})")
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
