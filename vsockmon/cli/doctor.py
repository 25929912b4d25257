"""``vsockmon doctor``: can this machine capture vsock traffic, and if not, what fixes it."""

from __future__ import annotations

import json
import sys

import click

from vsockmon.live.doctor import as_dict, capture_ready, run_checks


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object with every check.")
@click.option("--probe", is_flag=True,
              help="Also open /dev/vsock to ask for the local CID (off by default: the "
                   "device belongs to the machine's vsock setup).")
def doctor(as_json: bool, probe: bool) -> None:
    """Check the kernel, modules, devices, capabilities, QEMU and libvirt for vsock capture.

    One line per check (✓ fine, ✗ broken, - for information) with the command that fixes
    it. Exits 1 when something a capture needs is missing.

    \b
    Examples:
      vsockmon doctor
      vsockmon doctor --json | jq .capture_ready
    """
    checks = run_checks(probe=probe)
    if as_json:
        click.echo(json.dumps(as_dict(checks), indent=2))
    else:
        for check in checks:
            click.echo(check.line())
        ready = capture_ready(checks)
        click.echo("capture: ready" if ready else "capture: NOT ready (see ✗ above)")
    if not capture_ready(checks):
        sys.exit(1)
