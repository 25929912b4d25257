"""Building the lab: Debian's kernel from the archive, the initramfs images, the nested guest.

Everything lands in a cache directory keyed by the kernel release. Each step checks its
own output first, so a second build only resolves the package, hashes a few files and says
"cached". The kernel package is unpacked with ``dpkg -x``, never installed on the host.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from vsockmon.lab import cpio, kernel
from vsockmon.lab.errors import LabError

KERNEL_META_PACKAGE = "linux-image-amd64"
"""The Debian package whose dependency names the current kernel image package: the lab's
default kernel (Debian 12's 6.1) when no other is asked for."""

REQUIRED_TOOLS: dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg": "dpkg",
    "depmod": "kmod",
    "modprobe": "kmod",
    "gcc": "gcc",
    "zstd": "zstd",
}
"""Commands the lab needs → the Debian package that provides each."""

_SOURCES = Path(__file__).parent
_RECIPE = ("build.py", "cpio.py", "kernel.py", "init.sh", "guest-init.sh", "lab-guest.c")
"""The files that shape the cache's images: any change to them rebuilds the images."""

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    """A progress callback that says nothing."""


IMAGES_KEPT_UNUSED = 24 * 3600.0
"""Seconds an image set no build has asked for stays in the cache."""


@dataclass(frozen=True)
class LabFiles:
    """Where one kernel release's lab lives in the cache.

    The images live in a directory of their own per recipe (``images/<hash>``): work trees
    with different recipes sharing one cache (branches, parallel sessions) each keep their
    own images instead of rebuilding them under each other's running tests.
    """

    dir: Path
    kernel_version: str
    recipe: str = ""
    """The hash of what shapes the images (:func:`_recipe_hash`)."""

    @property
    def images(self) -> Path:
        return self.dir / "images" / self.recipe[:16]

    @property
    def kernel_root(self) -> Path:
        """The kernel package's files as ``dpkg -x`` left them, with ``depmod`` run."""
        return self.dir / "kernel"

    @property
    def vmlinuz(self) -> Path:
        return self.kernel_root / "boot" / f"vmlinuz-{self.kernel_version}"

    @property
    def initrd(self) -> Path:
        """The lab VM's initramfs: busybox, modules, /init."""
        return self.images / "initrd.img"

    @property
    def nested_initrd(self) -> Path:
        """The lab VM's initramfs plus the nested guest's kernel and initramfs."""
        return self.images / "initrd-nested.img"

    @property
    def guest_initrd(self) -> Path:
        return self.images / "guest-initrd.img"

    @property
    def guest_program(self) -> Path:
        return self.images / "lab-guest"

    @property
    def stamp(self) -> Path:
        """The recipe hash the images were built from; written last."""
        return self.images / "recipe.sha256"

    def products(self) -> tuple[Path, ...]:
        return (
            self.vmlinuz,
            self.initrd,
            self.nested_initrd,
            self.guest_initrd,
            self.guest_program,
        )


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/vsockmon/lab`` (``~/.cache/vsockmon/lab`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "vsockmon" / "lab"


def which(command: str) -> str | None:
    """A command's path; also looks in /usr/sbin, which a non-root PATH often lacks."""
    return shutil.which(command) or shutil.which(command, path="/usr/sbin:/sbin")


def check_tools() -> dict[str, str]:
    """The path of every command the lab needs, or a LabError naming the first missing."""
    found = {}
    for command, package in REQUIRED_TOOLS.items():
        path = which(command)
        if path is None:
            raise LabError(
                f"{command} not found; install the Debian package {package} (./scripts/setup does)"
            )
        found[command] = path
    if not kernel.is_static_elf(Path(found["busybox"]).read_bytes()):
        raise LabError(
            f"{found['busybox']} is not statically linked; "
            "install the Debian package busybox-static"
        )
    return found


def _run(argv: Sequence[str | Path], cwd: Path | None = None) -> str:
    """Runs a tool, returning its stdout; raises CalledProcessError with output kept."""
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout


def apt_reason(error: subprocess.CalledProcessError) -> str:
    """The gist of a failed apt command: its last ``E:`` line, else its last line.

    "Failed to fetch URL  WHY" becomes WHY: the URL makes the line long and says little.
    """
    lines = [ln.strip() for ln in f"{error.stdout or ''}\n{error.stderr or ''}".splitlines()]
    errors = [ln.removeprefix("E:").strip() for ln in lines if ln.startswith("E:")]
    rest = [ln for ln in lines if ln]
    reason = errors[-1] if errors else rest[-1] if rest else f"exit status {error.returncode}"
    fetch, sep, why = reason.partition("  ")
    return why.strip() if sep and fetch.startswith("Failed to fetch") else reason


class _StaleLists(Exception):
    """The package lists may be out of date: ``apt-get update`` and try once more."""


def _resolve_meta(meta: str) -> str:
    try:
        text = _run(["apt-cache", "depends", meta])
    except subprocess.CalledProcessError as error:
        raise _StaleLists(f"cannot resolve {meta}: {apt_reason(error)}") from None
    package = kernel.versioned_package(text)
    if package is None:
        raise _StaleLists(f"cannot resolve {meta}: it depends on no linux-image-* package")
    return package


def _archive_images(spec: str) -> list[str]:
    """The archive's image packages matching ``spec``, newest first (see kernel.matches)."""
    try:
        names = _run(["apt-cache", "pkgnames", "linux-image-"]).split()
    except subprocess.CalledProcessError as error:
        raise _StaleLists(f"cannot list kernel packages: {apt_reason(error)}") from None
    return kernel.image_packages(spec, names)


def _downloadable(package: str) -> bool:
    """Whether the archive serves ``package`` (a name can be listed with no version left)."""
    try:
        return "Filename:" in _run(["apt-cache", "show", "--no-all-versions", package])
    except subprocess.CalledProcessError:
        return False


def _resolve_kernel(spec: str) -> str:
    """The newest image package the archive serves for ``spec`` (``6.12``, ``6.1.0-57-amd64``)."""
    for package in _archive_images(spec):
        if _downloadable(package):
            return package
    raise _StaleLists(f"no Debian kernel image package matches {spec!r} "
                      "(see `vsockmon lab kernels`)")


def _resolve_package(meta: str, spec: str | None = None) -> str:
    """The image package to boot: the one ``spec`` asks for, else ``meta`` itself if it is
    an image package, else the image package the meta package depends on."""
    if spec:
        return _resolve_kernel(spec)
    if kernel.is_image_package(meta):
        return meta
    return _resolve_meta(meta)


def available() -> dict[str, str]:
    """Kernel series → the newest image package the archive serves for it (6.1, 6.12, …)."""
    newest: dict[str, str] = {}
    for package in _archive_images(""):
        release = kernel.kernel_version(package)
        key = kernel.series(release)
        if key not in newest and _downloadable(package):
            newest[key] = package
    return dict(sorted(newest.items(), key=lambda kv: kernel.release_key(kv[0])))


def cached() -> list[LabFiles]:
    """The kernels the cache holds, oldest series first, each with this recipe's images
    (built or not: see :func:`fresh`). Needs the lab's tools (busybox is in the recipe)."""
    root = cache_root()
    dirs = [d for d in root.iterdir() if (d / "kernel").is_dir()] if root.is_dir() else []
    tools = check_tools() if dirs else {}
    return [LabFiles(d, d.name, _recipe_hash(tools, d.name))
            for d in sorted(dirs, key=lambda d: kernel.release_key(d.name))]


def fresh(files: LabFiles) -> bool:
    """Whether ``files`` holds images built by this recipe."""
    return _is_fresh(files)


def _fetch_kernel(package: str, files: LabFiles, progress: Progress) -> None:
    """Downloads the image package and unpacks it into ``files.kernel_root``, atomically."""
    work = files.dir / "kernel.partial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    progress(f"downloading {package}")
    try:
        _run(["apt-get", "download", package], cwd=work)
    except subprocess.CalledProcessError as error:
        raise _StaleLists(
            f"cannot download {package}: {apt_reason(error)}; needs network "
            "access to Debian's package archive"
        ) from None
    (deb,) = work.glob("*.deb")
    progress(f"unpacking {deb.name}")
    _run(["dpkg", "-x", deb, work / "root"])
    _run(["depmod", "-b", work / "root", files.kernel_version])
    (work / "root").rename(files.kernel_root)
    shutil.rmtree(work)


def _recipe_hash(tools: dict[str, str], kernel_version: str) -> str:
    digest = hashlib.sha256(kernel_version.encode())
    for name in _RECIPE:
        digest.update((_SOURCES / name).read_bytes())
    digest.update(Path(tools["busybox"]).read_bytes())
    return digest.hexdigest()


def _module_paths(tools: dict[str, str], files: LabFiles, names: Sequence[str]) -> list[Path]:
    text = _run(
        [
            tools["modprobe"],
            "-d",
            files.kernel_root,
            "-S",
            files.kernel_version,
            "--show-depends",
            "-a",
            *names,
        ]
    )
    return [Path(p) for p in kernel.load_order([text])]


def _busybox_entries(busybox: Path, bin_dir: str) -> list[cpio.Entry]:
    """busybox and a symlink per applet (not one for busybox itself: it would loop)."""
    applets = _run([busybox, "--list"]).split()
    links = [cpio.Entry.symlink(f"{bin_dir}/{a}", "busybox") for a in applets if a != "busybox"]
    return [cpio.Entry.file(f"{bin_dir}/busybox", busybox.read_bytes(), 0o755), *links]


def _module_entries(paths: Sequence[Path], mod_dir: str) -> list[cpio.Entry]:
    order = "".join(f"{p.name}\n" for p in paths).encode()
    files = [cpio.Entry.file(f"{mod_dir}/{p.name}", p.read_bytes()) for p in paths]
    return [*files, cpio.Entry.file(f"{mod_dir}/order", order)]


def _dirs(*names: str) -> list[cpio.Entry]:
    return [cpio.Entry.directory(name) for name in names]


def _compile_guest_program(gcc: str, out: Path) -> None:
    try:
        _run([gcc, "-static", "-O2", "-s", "-Wall", "-o", out, _SOURCES / "lab-guest.c"])
    except subprocess.CalledProcessError as error:
        last = (error.stderr or "").strip().splitlines()[-1:] or ["?"]
        raise LabError(
            f"cannot compile the nested guest's program: {last[0]}; "
            "gcc -static needs the Debian package libc6-dev"
        ) from None


def _unzstd(zstd: str, data: bytes) -> bytes:
    """zstd-compressed bytes decompressed by Debian's ``zstd`` (6.12's kernel payload)."""
    return subprocess.run([zstd, "-dc"], input=data, capture_output=True, check=True).stdout


def _write(path: Path, data: bytes) -> None:
    """Writes a file whole or not at all (a reader never sees half an image)."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(path)


def _gzip(data: bytes) -> bytes:
    """gzip, padded to 4 bytes so a cpio archive can follow it in the same initrd."""
    packed = gzip.compress(data, compresslevel=6, mtime=0)
    return packed + b"\0" * (-len(packed) % 4)


def _assemble(tools: dict[str, str], files: LabFiles, progress: Progress) -> None:
    """Builds the lab VM's and the nested guest's initramfs images from the kernel tree."""
    busybox = Path(tools["busybox"])
    progress("compiling the nested guest's program")
    _compile_guest_program(tools["gcc"], files.guest_program)
    progress("assembling initramfs images")
    lab = [
        *_dirs(
            "/lab", "/lab/bin", "/lab/modules", "/proc", "/sys", "/dev", "/host", "/tmp", "/run"
        ),
        cpio.Entry.file("/init", (_SOURCES / "init.sh").read_bytes(), 0o755),
        *_busybox_entries(busybox, "/lab/bin"),
        *_module_entries(_module_paths(tools, files, kernel.LAB_MODULES), "/lab/modules"),
    ]
    guest = [
        *_dirs("/bin", "/lib", "/lib/modules", "/proc", "/sys", "/dev"),
        cpio.Entry.file("/init", (_SOURCES / "guest-init.sh").read_bytes(), 0o755),
        *_busybox_entries(busybox, "/bin"),
        cpio.Entry.file("/bin/lab-guest", files.guest_program.read_bytes(), 0o755),
        *_module_entries(_module_paths(tools, files, kernel.GUEST_MODULES), "/lib/modules"),
    ]
    lab_image = _gzip(cpio.newc_archive(lab))
    guest_image = _gzip(cpio.newc_archive(guest))
    progress("extracting the nested guest's ELF kernel from vmlinuz")
    try:
        vmlinux = kernel.extract_vmlinux(files.vmlinuz.read_bytes(),
                                         lambda data: _unzstd(tools["zstd"], data))
    except (ValueError, subprocess.CalledProcessError) as error:
        raise LabError(f"cannot extract the kernel from {files.vmlinuz}: {error}") from None
    # The nested guest's files ride along uncompressed: the lab VM unpacks them faster
    # than it could gunzip them or read them over 9p under emulation.
    nested = cpio.newc_archive(
        [
            *_dirs("/lab/l2"),
            cpio.Entry.file("/lab/l2/vmlinux", vmlinux),
            cpio.Entry.file("/lab/l2/initrd.img", guest_image),
        ]
    )
    _write(files.initrd, lab_image)
    _write(files.guest_initrd, guest_image)
    _write(files.nested_initrd, lab_image + nested)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialises builds sharing a cache (parallel test sessions, CI set-up)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _files_for(tools: dict[str, str], package: str) -> LabFiles:
    kver = kernel.kernel_version(package)
    return LabFiles(cache_root() / kver, kver, _recipe_hash(tools, kver))


def _is_fresh(files: LabFiles) -> bool:
    """Whether the images exist and were built by this recipe from this busybox (the
    stamp is written last)."""
    stamp = files.stamp.read_text() if files.stamp.is_file() else ""
    return stamp == files.recipe and all(p.is_file() for p in files.products())


def _prune_images(files: LabFiles) -> None:
    """Remove the image sets no build has used for a day (their stamp's mtime says when
    one last did); the current one is touched first."""
    files.stamp.touch()
    for stamp in files.images.parent.glob("*/recipe.sha256"):
        if time.time() - stamp.stat().st_mtime > IMAGES_KEPT_UNUSED:
            shutil.rmtree(stamp.parent, ignore_errors=True)


def _build(tools: dict[str, str], meta: str, spec: str | None, progress: Progress) -> LabFiles:
    package = _resolve_package(meta, spec)
    files = _files_for(tools, package)
    with _locked(cache_root()):
        if not files.kernel_root.is_dir():
            _fetch_kernel(package, files, progress)
        if not _is_fresh(files):
            files.images.mkdir(parents=True, exist_ok=True)
            _assemble(tools, files, progress)
            files.stamp.write_text(files.recipe)
            progress(f"built in {files.images}")
        _prune_images(files)
    return files


def build(meta: str = KERNEL_META_PACKAGE, progress: Progress = _quiet,
          kernel_spec: str | None = None) -> LabFiles:
    """Builds the lab, or finds it cached, and says where it is.

    The kernel is the newest Debian image package matching ``kernel_spec`` (a series such as
    ``6.12``, a version, or a whole release) when given, else the one ``meta`` names (or
    ``meta`` itself when it is an image package). Each kernel is cached in its own directory.

    ``progress`` hears of work only: a build that finds everything cached says nothing.
    When the kernel package cannot be resolved or downloaded, the package lists may be
    stale (Debian bumped the ABI): ``apt-get update`` once and start over.
    """
    tools = check_tools()
    try:
        return _build(tools, meta, kernel_spec, progress)
    except _StaleLists as first:
        progress(f"{first}; running apt-get update")
    try:
        _run(["apt-get", "update", "-q"])
    except subprocess.CalledProcessError as error:
        progress(f"apt-get update failed: {apt_reason(error)}")
    try:
        return _build(tools, meta, kernel_spec, progress)
    except _StaleLists as error:
        raise LabError(str(error)) from None


def status(meta: str = KERNEL_META_PACKAGE, kernel_spec: str | None = None
           ) -> tuple[LabFiles, bool]:
    """Where a kernel's lab is cached, and whether it is built and up to date."""
    tools = check_tools()
    try:
        files = _files_for(tools, _resolve_package(meta, kernel_spec))
    except _StaleLists as error:
        raise LabError(str(error)) from None
    return files, _is_fresh(files)
