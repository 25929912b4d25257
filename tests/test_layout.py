"""The README's layout section is the package's tree: every folder and module it names
exists, and every subpackage and top-level module is named."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "vsockmon"


def layout() -> dict[str, str]:
    """Entry (``vsockmon/wire/``, ``vsockmon/api.py``, ``tests/``) → its description."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```\n", 2)[1]
    entries: dict[str, str] = {}
    current = ""
    for line in block.splitlines():
        m = re.match(r"^( {0,2})(\S+)\s*(.*)$", line)
        if m and (m.group(1) or line[0] != " "):
            indent, name, rest = m.groups()
            current = ("vsockmon/" + name) if indent and name != "vsockmon/" else name
            entries[current] = rest
        else:
            entries[current] += " " + line.strip()
    return entries


def test_every_entry_exists_with_the_modules_it_names() -> None:
    entries = layout()
    assert "vsockmon/diagnose/" in entries and "vsockmon/api.py" in entries
    for entry, text in entries.items():
        path = ROOT / entry
        assert path.exists(), entry
        if path.is_dir() and entry.startswith("vsockmon/"):
            for module in re.findall(r"\b[a-z_]+\.py\b", text):
                assert list(path.rglob(module)), f"{entry}: no {module}"
            for sub in re.findall(r"(?<![\w/])([a-z_]+)/(?=[\s)])", text):
                assert (path / sub).is_dir(), f"{entry}: no {sub}/"


def test_every_subpackage_and_top_level_module_is_listed() -> None:
    entries = layout()
    subpackages = {f"vsockmon/{p.parent.name}/" for p in PACKAGE.glob("*/__init__.py")}
    modules = {f"vsockmon/{p.name}" for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    assert subpackages | modules <= set(entries)
    # where an entry lists its modules, it lists them all: a module in none of them is a
    # place a newcomer cannot find (cli/ is "one module per command family")
    for sub in subpackages:
        named = set(re.findall(r"\b[a-z_]+\.py\b", entries[sub]))
        present = {p.name for p in (ROOT / sub).rglob("*.py") if p.name != "__init__.py"}
        if len(named) >= 3:
            assert present <= named | {"common.py"}, f"{sub}: {sorted(present - named)}"
