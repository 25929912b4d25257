"""``vsockmon wireshark``: install the Lua plugin, remove it, open a capture with it.

The plugin ships inside the package (vsockmon/data/vsockmon.lua, the same file as
dissectors/vsockmon.lua in the source tree). It is copied, not linked, into Wireshark's
personal Lua plugins folder, so it keeps working if this venv moves; run ``install`` again
after upgrading vsockmon.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path

import click

from vsockmon.wire.pcapio import is_stream, open_capture

PLUGIN_NAME = "vsockmon.lua"
MARKER = "-- vsockmon.lua: Wireshark/tshark plugin"
"""The plugin's first line: how ``uninstall`` knows a file is ours."""


def packaged_plugin() -> Path:
    """The plugin file shipped with this installation of vsockmon."""
    return Path(str(files("vsockmon") / "data" / PLUGIN_NAME)).resolve()


def personal_plugin_dir() -> Path:
    """Wireshark's personal Lua plugins folder, as tshark reports it (else its default)."""
    tshark = shutil.which("tshark")
    if tshark:
        try:
            out = subprocess.run([tshark, "-G", "folders"], capture_output=True, text=True,
                                 timeout=60, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        for line in out.splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "Personal Lua Plugins" and value.strip():
                return Path(value.strip())
    return Path.home() / ".local" / "lib" / "wireshark" / "plugins"


def _is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(MARKER)
    except OSError:
        return False


def _report(as_json: bool, action: str, path: Path, message: str) -> None:
    if as_json:
        click.echo(json.dumps({"action": action, "path": str(path)}))
    else:
        click.echo(message, err=True)


@click.group()
def wireshark() -> None:
    """Wireshark integration: the vsockmon Lua plugin.

    The plugin adds the protocol 'vsockmon' beside Wireshark's own vsock dissector:
    vsockmon.stream (connection index, as 'vsockmon conns'), correct names for SEQPACKET
    and CREDIT_REQUEST, flag bits, client/server, credit, expert info (refused, reset,
    zero credit, violations, the tap-length bug) and payload dissectors (ttrpc, JSON,
    HTTP, sd_notify).

    \b
    Examples:
      vsockmon wireshark install
      tshark -r capture.pcap -Y 'vsockmon.stream == 3'
      tshark -r capture.pcap -Y _ws.expert -T fields -e frame.number -e _ws.expert.message
      vsockmon wireshark open capture.pcap
      vsockmon wireshark uninstall
    """


@wireshark.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Plugin folder (default: Wireshark's personal Lua plugins folder).")
@click.option("--force", is_flag=True, help="Replace a different file of the same name.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def install(directory: Path | None, force: bool, as_json: bool) -> None:
    """Copy the plugin into Wireshark's personal Lua plugins folder.

    An earlier vsockmon plugin there is replaced; any other file named vsockmon.lua only
    with --force.
    """
    target_dir = directory or personal_plugin_dir()
    target = target_dir / PLUGIN_NAME
    if target.exists() and not _is_ours(target) and not force:
        raise click.ClickException(f"{target}: exists and is not the vsockmon plugin; "
                                   "use --force to overwrite")
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packaged_plugin(), target)
    except OSError as e:
        raise click.ClickException(f"{target}: cannot write: {e.strerror}") from None
    _report(as_json, "installed", target,
            f"installed {target}\ncheck: tshark -G protocols | grep vsockmon")


@wireshark.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Plugin folder (default: Wireshark's personal Lua plugins folder).")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def uninstall(directory: Path | None, as_json: bool) -> None:
    """Remove the plugin from Wireshark's personal Lua plugins folder."""
    target = (directory or personal_plugin_dir()) / PLUGIN_NAME
    if not target.exists():
        raise click.ClickException(f"{target}: not installed")
    if not _is_ours(target):
        raise click.ClickException(f"{target}: not the vsockmon plugin; left alone")
    try:
        target.unlink()
    except OSError as e:
        raise click.ClickException(f"{target}: cannot remove: {e.strerror}") from None
    _report(as_json, "removed", target, f"removed {target}")


@wireshark.command("open")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--wireshark", "program", default="wireshark", show_default=True,
              help="The Wireshark program to start.")
def open_(file: str, program: str) -> None:
    """Open FILE in Wireshark with the plugin (loaded from the package unless installed).

    Needs a display (DISPLAY or WAYLAND_DISPLAY). Without one, install the plugin and use
    tshark: 'vsockmon wireshark install', then 'tshark -r FILE'.
    """
    if not is_stream(file):  # not a capture: say so here, not in a dialog box (a FIFO
        open_capture(file, require_linktype=None).close()  # is Wireshark's to read)
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise click.ClickException(
            "no display (DISPLAY and WAYLAND_DISPLAY are unset); on a text terminal use "
            f"tshark -X lua_script:{packaged_plugin()} -r {file}")
    exe = shutil.which(program)
    if exe is None:
        raise click.ClickException(f"{program}: not found; install Wireshark (Debian: apt "
                                   "install wireshark) or use tshark")
    installed = personal_plugin_dir() / PLUGIN_NAME
    # An installed copy is loaded by Wireshark itself; loading a second would clash.
    args = [exe] if _is_ours(installed) else [exe, "-X", f"lua_script:{packaged_plugin()}"]
    try:
        subprocess.Popen([*args, "-r", file], start_new_session=True,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    except OSError as e:
        raise click.ClickException(f"{exe}: cannot start: {e.strerror}") from None
    click.echo(f"started {program} on {file}", err=True)
