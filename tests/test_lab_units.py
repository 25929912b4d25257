"""The lab's pure parts, without booting a VM: parsers, the initramfs writer, the console."""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from vsockmon.lab import cpio, kernel, vm
from vsockmon.lab.build import apt_reason


def test_versioned_package_from_apt_cache_depends() -> None:
    text = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert kernel.versioned_package(text) == "linux-image-6.1.0-56-amd64"
    assert kernel.versioned_package("linux-image-amd64\n") is None
    assert kernel.kernel_version("linux-image-6.1.0-56-amd64") == "6.1.0-56-amd64"


def test_load_order_keeps_first_mention_only() -> None:
    text = (
        "insmod /k/vsock.ko \n"
        "insmod /k/vmw_vsock_virtio_transport_common.ko \n"
        "builtin af_packet\n"
        "insmod /k/vsock.ko \n"
        "insmod /k/vsockmon.ko \n"
    )
    assert kernel.load_order([text]) == [
        "/k/vsock.ko",
        "/k/vmw_vsock_virtio_transport_common.ko",
        "/k/vsockmon.ko",
    ]


def _bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 16, len(payload))
    return bytes(image) + b"\0" * 16 + payload + b"\x11\x22\x33\x44"


def test_extract_vmlinux_finds_the_xz_payload_through_the_boot_header() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 8
    xz = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    assert kernel.extract_vmlinux(_bzimage(xz)) == elf
    with pytest.raises(ValueError, match="not a bzImage"):
        kernel.extract_vmlinux(bytes(4096))
    with pytest.raises(ValueError, match="neither xz nor zstd"):
        kernel.extract_vmlinux(_bzimage(b"\x1f\x8b" + bytes(64)))


def _unzstd(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout


def test_extract_vmlinux_reads_a_zstd_payload_with_its_size_trailer() -> None:
    # Debian 6.12's payload: a zstd frame, then the decompressed size as u32 LE (the
    # kernel's size_append), which zstd itself refuses as trailing garbage.
    elf = b"\x7fELF" + bytes(range(256)) * 8
    frame = subprocess.run(["zstd", "-c", "-q"], input=elf, capture_output=True,
                           check=True).stdout
    assert frame.startswith(kernel.ZSTD_MAGIC)
    payload = frame + struct.pack("<I", len(elf))
    assert kernel.extract_vmlinux(_bzimage(payload), _unzstd) == elf
    with pytest.raises(ValueError, match="no zstd was given"):
        kernel.extract_vmlinux(_bzimage(payload))
    with pytest.raises(ValueError, match="not the 9 it names"):
        kernel.extract_vmlinux(_bzimage(frame + struct.pack("<I", 9)), _unzstd)


# What `apt-cache pkgnames linux-image-` lists: flavours, dbg packages, old ABIs.
PKGNAMES = [
    "linux-image-amd64", "linux-image-6.1.0-56-amd64",
    "linux-image-6.1.0-57-amd64", "linux-image-6.1.0-57-amd64-unsigned",
    "linux-image-6.1.0-57-cloud-amd64", "linux-image-6.1.0-57-rt-amd64",
    "linux-image-6.1.0-57-amd64-dbg", "linux-image-6.1.0-9-amd64",
    "linux-image-6.12.9+deb12-amd64", "linux-image-6.12.117+deb12-amd64",
    "linux-image-6.12.117+deb12-amd64-unsigned", "linux-image-6.12.115+deb12-amd64-unsigned",
    "linux-image-6.12.117+deb12-cloud-amd64",
]


@pytest.mark.parametrize(("spec", "expected"), [
    # A series: its newest release first (117 > 115 > 9 as numbers, not as text), and for
    # one release the signed package before the unsigned one.
    ("6.12", ["linux-image-6.12.117+deb12-amd64", "linux-image-6.12.117+deb12-amd64-unsigned",
              "linux-image-6.12.115+deb12-amd64-unsigned", "linux-image-6.12.9+deb12-amd64"]),
    # "6.1" is not a prefix of 6.12; ABI 57 > 56 > 9.
    ("6.1", ["linux-image-6.1.0-57-amd64", "linux-image-6.1.0-57-amd64-unsigned",
             "linux-image-6.1.0-56-amd64", "linux-image-6.1.0-9-amd64"]),
    ("6.12.115", ["linux-image-6.12.115+deb12-amd64-unsigned"]),
    ("6.1.0-56-amd64", ["linux-image-6.1.0-56-amd64"]),
    ("6.1.0-5", []),
    ("5.10", []),
])
def test_image_packages_match_a_series_a_version_or_a_release(spec: str,
                                                              expected: list[str]) -> None:
    assert kernel.image_packages(spec, PKGNAMES) == expected


def test_series_and_image_package_names() -> None:
    assert kernel.series("6.12.117+deb12-amd64") == "6.12"
    assert kernel.series("6.1.0-57-amd64") == "6.1"
    assert kernel.is_image_package("linux-image-6.12.117+deb12-amd64")
    assert kernel.is_image_package("linux-image-6.12.117+deb12-amd64-unsigned")
    assert not kernel.is_image_package("linux-image-amd64")
    assert not kernel.is_image_package("linux-image-6.1.0-57-cloud-amd64")
    assert kernel.kernel_version("linux-image-6.12.117+deb12-amd64-unsigned") == \
        "6.12.117+deb12-amd64"


def test_is_static_elf() -> None:
    assert kernel.is_static_elf(Path("/usr/bin/busybox").read_bytes())  # busybox-static
    assert not kernel.is_static_elf(Path("/usr/bin/python3").resolve().read_bytes())
    assert not kernel.is_static_elf(b"#!/bin/sh\n")


def test_newc_archive_lists_with_cpio_and_extracts(tmp_path: Path) -> None:
    archive = cpio.newc_archive(
        [
            cpio.Entry.directory("/lab"),
            cpio.Entry.file("/lab/init", b"#!/bin/sh\necho hi\n", 0o755),
            cpio.Entry.file("/lab/odd", b"123"),
            cpio.Entry.symlink("/lab/sh", "init"),
        ]
    )
    assert len(archive) % 4 == 0
    done = subprocess.run(
        [shutil.which("cpio") or "cpio", "-idm", "--quiet"],
        input=archive,
        cwd=tmp_path,
        capture_output=True,
        check=True,
    )
    assert done.stderr == b""
    assert (tmp_path / "lab/init").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "lab/init").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "lab/odd").read_bytes() == b"123"
    assert (tmp_path / "lab/sh").readlink() == Path("init")


def test_host_layout_shares_known_dirs_and_recreates_merged_usr_links() -> None:
    layout = vm.host_layout(
        {"usr": None, "etc": None, "work": None, "bin": "usr/bin", "lib64": None, "dev": None}
    )
    assert layout.binds == ("usr", "etc", "work", "lib64")
    assert layout.links == (("bin", "usr/bin"),)


def _job(**kw: object) -> vm.Job:
    fields = {
        "argv": ("printf", "%s|", "it's", "a b", "$HOME"),
        "cwd": "/work/my project",
        "env": {"PATH": "/usr/bin:/bin", "X": "1 2"},
        "layout": vm.HostLayout(("usr", "etc"), (("bin", "usr/bin"),)),
        "kernel_root": "/root/.cache/k",
        "qemu": "/usr/bin/qemu-system-x86_64",
    }
    fields.update(kw)
    return vm.Job(**fields)  # type: ignore[arg-type]


def test_job_script_is_shell_the_init_can_source(tmp_path: Path) -> None:
    """Sourced by a real shell, the settings and the command come back byte for byte."""
    (tmp_path / "job.sh").write_text(vm.job_script(_job()))
    probe = (
        '. ./job.sh; printf "%s\\n" "$LAB_MODE" "$LAB_CWD" "$LAB_BINDS" "$LAB_LINKS"; (lab_command)'
    )
    done = subprocess.run(
        ["sh", "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert done.stdout.splitlines() == [
        "run",
        "/work/my project",
        "usr etc",
        "bin:usr/bin",
        "it's|a b|$HOME|",
    ]


def test_job_script_for_a_shell_takes_the_terminal() -> None:
    script = vm.job_script(_job(argv=("/bin/bash", "-l"), shell=True, terminal_size=(40, 120)))
    assert "LAB_MODE=shell" in script
    assert "/lab/bin/stty rows 40 cols 120" in script
    assert "exec /lab/bin/setsid -c /usr/bin/env -i" in script


def test_job_script_tells_the_init_whether_the_nested_guest_loads_its_transport(
    tmp_path: Path,
) -> None:
    """init.sh passes it on as vsockmon_lab.transport=on|off; guest-init.sh skips the driver."""
    for job, expected in ((_job(guest_cid=3), "on"),
                          (_job(guest_cid=3, guest_transport=False), "off")):
        (tmp_path / "job.sh").write_text(vm.job_script(job))
        done = subprocess.run(["sh", "-c", '. ./job.sh; echo "$LAB_GUEST_TRANSPORT"'],
                              cwd=tmp_path, capture_output=True, text=True, check=True)
        assert done.stdout.strip() == expected


def test_guest_env_puts_the_venv_first_and_names_the_nested_guest() -> None:
    env = vm.guest_env("/work/main/.venv", "dumb", 3, {"FOO": "bar"})
    assert env["PATH"].startswith("/work/main/.venv/bin:/usr/local/sbin")
    assert env["VSOCKMON_LAB_GUEST_CID"] == "3"
    assert env["VSOCKMON_LAB_GUEST_PORT"] == str(vm.GUEST_PORT)
    assert env["VSOCKMON_LAB_GUEST_MONITOR"] == "/run/vsockmon-lab/guest-monitor.sock"
    assert env["FOO"] == "bar"
    assert "VSOCKMON_LAB_GUEST_CID" not in vm.guest_env(None, "dumb", None, {})


def test_qemu_argv_shares_cwd_read_write_and_doubles_commas() -> None:
    machine = vm.Machine(
        qemu="qemu",
        kernel=Path("/k/vmlinuz"),
        initrd=Path("/k/initrd.img"),
        accel="tcg",
        memory="1G",
        cwd="/tmp/a,b",
        kernel_args=vm.kernel_args("abc", "/tmp/j/job.sh"),
        stderr_path="/dev/fd/5",
    )
    argv = vm.qemu_argv(machine)
    assert "local,path=/tmp/a,,b,mount_tag=cwd,security_model=none,multidevs=remap" in argv
    assert "local,path=/,mount_tag=host,readonly=on,security_model=none,multidevs=remap" in argv
    assert "file,id=err,path=/dev/fd/5" in argv
    assert "-netdev" not in argv and "-nic" not in argv
    cmdline = argv[argv.index("-append") + 1]
    assert "quiet loglevel=3" in cmdline and "vsockmon_lab.nonce=abc" in cmdline


def _feed_bytewise(console: vm.ConsoleFilter, data: bytes) -> bytes:
    return b"".join(console.feed(data[i : i + 1]) for i in range(len(data)))


def test_console_filter_strips_kernel_noise_and_markers_even_split_bytewise() -> None:
    stream = (
        b"[ 0.1] kernel noise\n@@VSOCKMON-LAB-BOOT:n1:@@@@VSOCKMON-LAB-START:n1:@@"
        b"out @@ not a marker\n@@VSOCKMON-LAB-EXIT:other:9@@"
        b"tail@@VSOCKMON-LAB-EXIT:n1:7@@reboot: Power down\n"
    )
    for feed in (lambda c, d: c.feed(d), _feed_bytewise):
        console = vm.ConsoleFilter("n1")
        shown = feed(console, stream)
        assert shown == b"out @@ not a marker\n@@VSOCKMON-LAB-EXIT:other:9@@tail"
        assert console.booted and console.started and console.exit_code == 7
        assert console.kernel_output == b"[ 0.1] kernel noise\n"


def test_console_filter_reports_the_init_error() -> None:
    console = vm.ConsoleFilter("n2")
    console.feed(b"@@VSOCKMON-LAB-BOOT:n2:@@@@VSOCKMON-LAB-ERROR:n2:insmod 9p.ko failed@@")
    assert console.done and console.error == "insmod 9p.ko failed"


def test_apt_reason_takes_the_last_error_line() -> None:
    error = subprocess.CalledProcessError(
        100,
        ["apt-get", "download"],
        "Err:1 http://deb.debian.org/debian linux-image-6.1.0-56-amd64\n",
        "W: Download is performed unsandboxed as root\n"
        "E: Failed to fetch http://deb.debian.org/x.deb  Could not connect to 127.0.0.1:9\n",
    )
    assert apt_reason(error) == "Could not connect to 127.0.0.1:9"
    no_package = subprocess.CalledProcessError(100, ["apt-cache"], "", "E: No packages found\n")
    assert apt_reason(no_package) == "No packages found"
    assert apt_reason(subprocess.CalledProcessError(1, ["x"], "", "")) == "exit status 1"


def test_paths_outside_the_shared_dirs_are_bound_too() -> None:
    """A clone in /tmp (as CI makes) must still give the guest its venv and vsockmon."""
    layout = vm.host_layout({"usr": None, "work": None},
                            ["/tmp/ci", "/tmp/ci/.venv", "/work/main/.venv", "/builds/x"])
    assert layout.extra == ("/builds/x", "/tmp/ci")
    script = vm.job_script(_job(layout=layout))
    assert "LAB_EXTRA_BINDS='/builds/x /tmp/ci'" in script
