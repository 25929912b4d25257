"""Shared pytest fixtures. Each block belongs to one part of vsockmon; add yours below."""

from __future__ import annotations

import os

import pytest

from vsockmon.lab import Lab, LabError

# ---- lab: the lab VM (vsockmon.lab, docs/lab.md) ------------------------------------------

LAB_KERNELS = tuple(k for k in os.environ.get("VSOCKMON_LAB_KERNELS", "6.1,6.12").split(",") if k)
"""The Debian kernel series every lab test runs on (``VSOCKMON_LAB_KERNELS=6.12`` for one):
Debian 12's default 6.1 and its 6.12, whose vsock tap and transport differ (docs/lab.md)."""


@pytest.fixture(scope="session", params=LAB_KERNELS)
def lab(request: pytest.FixtureRequest) -> Lab:
    """The lab VM on each kernel of :data:`LAB_KERNELS`, built (or found in the cache) once
    per test session; every test that uses it runs once per kernel.

    Lab tests must run in CI: when the lab cannot be built this fails the test, it never
    skips it. Use it as ``lab.run(cmd, cwd=tmp_path, timeout=...)`` (see vsockmon.lab.Lab);
    what the command writes into ``cwd`` is on the host when ``run`` returns. ``lab.kernel``
    is the release it boots.
    """
    try:
        return Lab.build(kernel=request.param)
    except LabError as error:
        pytest.fail(f"the lab VM cannot be built: {error}", pytrace=False)


# ---- end of lab ---------------------------------------------------------------------------
