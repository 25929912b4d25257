"""docs/diagnose.md shows each rule's finding on a fixture, message, cause and fix word for
word: the user guide is the specification of what a finding says, so the tool must still say
exactly that (any difference is either a regression or a page to update)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from vsockmon.cli import main

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "diagnose.md"


def examples() -> list[tuple[tuple[str, ...], str]]:
    """(fixtures named in the paragraph before, the example block) for every block of the
    guide's rules section that shows a finding."""
    text = GUIDE.read_text()
    rules = text[text.index("## The rules"):]
    out = []
    for m in re.finditer(r"\n((?:(?!```)[^\n]*\n){1,6}?)```\n(.*?)```", rules, re.S):
        names = tuple(re.findall(r"`(fixtures/diagnose/[\w.-]+\.pcap)`", m.group(1)))
        if names and ("ERROR" in m.group(2) or "WARNING" in m.group(2)
                      or "INFO" in m.group(2)):
            out.append((names, m.group(2)))
    return out


def words(text: str) -> str:
    return " ".join(text.split())


def test_the_guide_has_an_example_per_rule() -> None:
    shown = " ".join(block for _, block in examples())
    for rule in ("no-listener", "seqpacket-refused", "no-transport", "cid-mismatch",
                 "window-full", "half-close-hang", "abrupt-close", "credit-violation",
                 "small-packet-reset", "state-lost", "dial-retry", "tap-length"):
        assert f" {rule}" in shown, rule


@pytest.mark.parametrize(("names", "block"), examples(),
                         ids=[f"{Path(n[0]).stem}-{i}" for i, (n, _) in enumerate(examples())])
def test_the_guide_shows_what_the_tool_says(names: tuple[str, ...], block: str) -> None:
    said = ""
    for name in names:
        result = CliRunner().invoke(main, ["diagnose", str(ROOT / name)])
        said += words(result.stdout) + " "
    # each connection header and each finding (a connection's findings may be shown apart)
    for part in re.split(r"\n(?=\S|  (?:ERROR|WARNING|INFO) )", block.strip()):
        assert words(part) in said, part
