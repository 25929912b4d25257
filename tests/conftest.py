"""Shared pytest fixtures. Each block belongs to one part of vsockmon; add yours below."""

from __future__ import annotations

import pytest

from vsockmon.lab import Lab, LabError

# ---- lab: the lab VM (vsockmon.lab, docs/lab.md) ------------------------------------------


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The lab VM, built (or found in the cache) once per test session.

    Lab tests must run in CI: when the lab cannot be built this fails the test, it never
    skips it. Use it as ``lab.run(cmd, cwd=tmp_path, timeout=...)`` (see vsockmon.lab.Lab);
    what the command writes into ``cwd`` is on the host when ``run`` returns.
    """
    try:
        return Lab.build()
    except LabError as error:
        pytest.fail(f"the lab VM cannot be built: {error}", pytrace=False)


# ---- end of lab ---------------------------------------------------------------------------
