"""vsockmon wireshark install / uninstall / open, and the plugin shipped with the package."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import frame, write_pcap

from vsockmon.cli import main
from vsockmon.cli.wireshark import packaged_plugin, personal_plugin_dir
from vsockmon.wire.protocol import Op

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME: tshark reports its personal plugin folder under it."""
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_packaged_plugin_is_the_dissectors_file() -> None:
    assert packaged_plugin().read_bytes() == (ROOT / "dissectors" / "vsockmon.lua").read_bytes()


def test_plugin_is_in_the_built_package(tmp_path: Path) -> None:
    """setuptools copies the file (not the symlink) into what gets installed."""
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
                    "build_py", "--build-lib", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    built = tmp_path / "vsockmon" / "data" / "vsockmon.lua"
    assert not built.is_symlink()
    assert built.read_bytes() == (ROOT / "dissectors" / "vsockmon.lua").read_bytes()


@pytest.mark.tshark
def test_install_makes_tshark_load_it_and_uninstall_removes_it(home: Path) -> None:
    folder = personal_plugin_dir()
    assert folder == home / ".local" / "lib" / "wireshark" / "plugins"
    runner = CliRunner()
    res = runner.invoke(main, ["wireshark", "install", "--json"])
    assert res.exit_code == 0, res.output
    assert (folder / "vsockmon.lua").read_bytes() == packaged_plugin().read_bytes()
    pcap = write_pcap(home / "c.pcap", [frame(Op.REQUEST), frame(Op.CREDIT_REQUEST)])
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "vsockmon.stream",
                          "-e", "vsockmon.op_name"], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines() == ["0\tREQUEST", "0\tCREDIT_REQUEST"]
    assert runner.invoke(main, ["wireshark", "install"]).exit_code == 0  # again: replaces
    res = runner.invoke(main, ["wireshark", "uninstall"])
    assert res.exit_code == 0 and not (folder / "vsockmon.lua").exists()
    res = runner.invoke(main, ["wireshark", "uninstall"])
    assert res.exit_code == 1 and "not installed" in res.output


@pytest.mark.tshark
def test_installed_plugin_coexists_with_x_lua_script(home: Path) -> None:
    """The documented `tshark -X lua_script:dissectors/vsockmon.lua` still works after
    `vsockmon wireshark install` (the second copy steps aside instead of aborting tshark);
    a copy of another version says on stderr that it is not the one in use."""
    assert CliRunner().invoke(main, ["wireshark", "install"]).exit_code == 0
    pcap = write_pcap(home / "c.pcap", [frame(Op.REQUEST), frame(Op.CREDIT_REQUEST)])
    other = home / "other.lua"
    other.write_text((ROOT / "dissectors" / "vsockmon.lua").read_text()
                     .replace('local VERSION = "', 'local VERSION = "9.9.9-', 1))
    fields = ["-T", "fields", "-e", "vsockmon.stream", "-e", "vsockmon.op_name"]
    for script in (ROOT / "dissectors" / "vsockmon.lua", other):
        res = subprocess.run(["tshark", "-X", f"lua_script:{script}", "-r", str(pcap), *fields],
                             capture_output=True, text=True, check=False)
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == ["0\tREQUEST", "0\tCREDIT_REQUEST"]
        assert ("9.9.9" in res.stderr and "is not used" in res.stderr) == (script == other)


def test_foreign_file_is_left_alone(tmp_path: Path) -> None:
    foreign = tmp_path / "vsockmon.lua"
    foreign.write_text("-- someone else's script\n")
    runner = CliRunner()
    res = runner.invoke(main, ["wireshark", "install", "--dir", str(tmp_path)])
    assert res.exit_code == 1 and "--force" in res.output
    res = runner.invoke(main, ["wireshark", "uninstall", "--dir", str(tmp_path)])
    assert res.exit_code == 1 and "left alone" in res.output
    assert foreign.read_text() == "-- someone else's script\n"
    res = runner.invoke(main, ["wireshark", "install", "--dir", str(tmp_path), "--force"])
    assert res.exit_code == 0 and foreign.read_bytes() == packaged_plugin().read_bytes()


def test_open_needs_a_display(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pcap = write_pcap(home / "c.pcap", [frame(Op.REQUEST)])
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    res = CliRunner().invoke(main, ["wireshark", "open", str(pcap)])
    assert res.exit_code == 1 and "no display" in res.output and "tshark -X lua_script:" \
        in res.output


def test_open_starts_wireshark_with_the_plugin(home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pcap = write_pcap(home / "c.pcap", [frame(Op.REQUEST)])
    bindir = home / "bin"
    bindir.mkdir()
    record = home / "args.txt"
    fake = bindir / "wireshark"
    fake.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("DISPLAY", ":99")
    runner = CliRunner()

    def started_with() -> list[str]:
        for _ in range(100):
            if record.exists() and record.read_text().endswith(f"{pcap}\n"):
                return record.read_text().splitlines()
            time.sleep(0.05)
        raise AssertionError("wireshark was not started")

    assert runner.invoke(main, ["wireshark", "open", str(pcap)]).exit_code == 0
    assert started_with() == ["-X", f"lua_script:{packaged_plugin()}", "-r", str(pcap)]
    record.unlink()
    assert runner.invoke(main, ["wireshark", "install"]).exit_code == 0
    assert runner.invoke(main, ["wireshark", "open", str(pcap)]).exit_code == 0
    assert started_with() == ["-r", str(pcap)]  # the installed copy loads by itself
    res = runner.invoke(main, ["wireshark", "open", str(pcap), "--wireshark", "no-such-ws"])
    assert res.exit_code == 1 and "not found" in res.output
