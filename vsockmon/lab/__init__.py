"""The lab: a real Linux kernel with vsockmon under qemu, for tests and fixtures.

The host's kernel may lack vsockmon (and its vsock devices belong to its infrastructure),
so vsock traffic is made and captured in a VM: Debian's own kernel, booted with the host's
userland shared read-only and the working directory read-write. See docs/lab.md.

    lab = Lab.build()
    result = lab.run("ip link add type vsockmon && ip link show vsockmon0", timeout=120)
    assert result.returncode == 0
"""

from vsockmon.lab.build import LabFiles
from vsockmon.lab.errors import LabError, LabTimeout
from vsockmon.lab.lab import Lab, RunResult

__all__ = ["Lab", "LabError", "LabFiles", "LabTimeout", "RunResult"]
