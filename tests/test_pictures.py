"""The docs' pictures: ``scripts/make-pictures`` draws every one of them from committed
fixtures, the committed images are exactly what it draws, and the docs reference them all."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner

from vsockmon.cli import main
from vsockmon.wire.protocol import VIRTIO_HEADER, VSOCKMON_HEADER

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts/make-pictures"
IMG = ROOT / "docs/img"
MAX_BYTES = 150_000


def _script() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("make_pictures", str(SCRIPT))
    spec = importlib.util.spec_from_loader("make_pictures", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def drawn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pictures")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def _referenced() -> set[str]:
    """Every docs/img picture that README or a docs page shows."""
    names = set()
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        names |= set(re.findall(r"\]\((?:docs/)?img/([\w.-]+\.png)\)", page.read_text()))
    return names


def test_the_committed_pictures_are_what_the_script_draws(drawn: Path) -> None:
    made = sorted(p.name for p in drawn.iterdir())
    assert made == sorted(p.name for p in IMG.iterdir())  # none missing, none left over
    for name in made:
        assert (drawn / name).read_bytes() == (IMG / name).read_bytes(), (
            f"docs/img/{name} is stale: run scripts/make-pictures")


def test_every_picture_is_shown_and_small(drawn: Path) -> None:
    made = {p.name for p in drawn.iterdir()}
    assert _referenced() == made
    for name in made:
        size = (drawn / name).stat().st_size
        assert 0 < size < MAX_BYTES, (name, size)
        assert (drawn / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_frame_layout_is_drawn_from_the_field_tables() -> None:
    fig = _script().frame_layout_figure()
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    for header in (VSOCKMON_HEADER, VIRTIO_HEADER):
        for f in header.fields:  # each field once per header, with its size
            assert f"{f.name} ({f.size})" in texts
        assert any(t.startswith(f"{header.name} header\n{header.size} bytes") for t in texts)
    # one box per field (fields of 8 bytes fill a row), plus the payload's row remainder
    boxes = len(fig.axes[0].patches)
    assert boxes == len(VSOCKMON_HEADER.fields) + len(VIRTIO_HEADER.fields) + 1
    # row labels: 0, 8, … up to the row holding the payload's start (byte 76)
    assert [t for t in texts if t.isdigit()] == [str(8 * i) for i in range(10)]


def test_segments_split_a_byte_range_at_row_ends() -> None:
    segments = _script()._segments
    assert list(segments(0, 8, 8)) == [(0, 0, 8)]
    assert list(segments(6, 4, 8)) == [(0, 6, 2), (1, 0, 2)]
    assert list(segments(76, 12, 8)) == [(9, 4, 4), (10, 0, 8)]


def test_the_timeline_caption_states_the_fixtures_numbers() -> None:
    """The caption that went stale once (441 ms for a fixture re-recorded since)."""
    out = CliRunner().invoke(main, ["conns", str(ROOT / "fixtures/real/credit-stall.pcap"),
                                    "--json"])
    conn = json.loads(out.stdout.splitlines()[0])
    text = (ROOT / "docs/analysis.md").read_text()
    caption = " ".join(text[text.index("](img/timeline.png)"):].split("\n\n")[1].split())
    assert f"counts {conn['credit_stalls']} stalls, {conn['stall_time'] * 1000:.3f} ms" in (
        caption), caption
