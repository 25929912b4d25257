"""The lab: a real Linux kernel with vsockmon under qemu, for tests and fixtures.

The host's kernel may lack vsockmon (and its vsock devices belong to its infrastructure),
so vsock traffic is made and captured in a VM: Debian's own kernel, booted with the host's
userland shared read-only and the working directory read-write. See docs/lab.md.

    lab = Lab.build()
    result = lab.run("ip link add type vsockmon && ip link show vsockmon0", timeout=120)
    assert result.returncode == 0

The names below load on first use: programs running inside the VM import
``vsockmon.lab.inside`` and should not pay for the host side's modules (every import costs
15-30x under emulation).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vsockmon.lab.build import LabFiles
    from vsockmon.lab.errors import LabError, LabTimeout
    from vsockmon.lab.lab import Lab, RunResult

__all__ = ["Lab", "LabError", "LabFiles", "LabTimeout", "RunResult"]

_HOMES = {
    "Lab": "vsockmon.lab.lab",
    "RunResult": "vsockmon.lab.lab",
    "LabError": "vsockmon.lab.errors",
    "LabTimeout": "vsockmon.lab.errors",
    "LabFiles": "vsockmon.lab.build",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
