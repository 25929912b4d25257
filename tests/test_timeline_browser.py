"""``timeline --html`` in a real browser: headless Chromium must draw the diagram.

The page is a file with inline SVG and no script; the screenshot must show the arrows in
their colours, not a blank or broken page.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from conntrack_scenarios import echo_capture

from vsockmon.cli import main


def screenshot(page: Path, png: Path) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: run ./scripts/setup"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars",
             "--window-size=1000,1200", f"--screenshot={png}", page.as_uri()],
            check=True, capture_output=True, timeout=120)


def near(img: np.ndarray, colour: str, tolerance: float = 0.08) -> int:
    """Pixels within ``tolerance`` (per channel, 0-1) of an ``#rrggbb`` colour."""
    want = np.array([int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)])
    return int(np.count_nonzero(np.all(np.abs(img[..., :3] - want) < tolerance, axis=-1)))


def test_chromium_draws_the_timeline(tmp_path: Path) -> None:
    from matplotlib.image import imread

    capture = echo_capture(tmp_path / "echo.pcap")
    page = tmp_path / "timeline.html"
    result = CliRunner().invoke(main, ["timeline", str(capture), "--conn", "0", "--conn", "1",
                                       "--html", str(page)])
    assert result.exit_code == 0, result.stderr
    png = tmp_path / "shot.png"
    screenshot(page, png)
    img = imread(png)
    assert img.shape[:2] == (1200, 1000)
    inked = np.any(img[..., :3] < 0.9, axis=-1).mean()
    assert inked > 0.02  # text, arrows, plot lines: far from a blank page
    for colour in ("#2e7d32", "#1f4e9c", "#c62828", "#7b61a8"):  # handshake, RW, RST, credit
        assert near(img, colour) > 50, colour
