"""From the SOURCES a user names to the list of captures a fleet run analyses.

A source is a directory (every capture file under it, by suffix), a glob (every file it
matches) or a file, on the local disk or at an fsspec URL (``s3://bucket/prefix/``,
``gcs://…``) that the workers read themselves. Each capture gets the host it came from —
taken from its path, as ``--host-from`` says — and a name; ``(host, capture)`` names its
partition in the output dataset, so two captures may not share both.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vsockmon.errors import VsockmonError
from vsockmon.export.run import CAPTURE_SUFFIXES

HOST_FROM_DEFAULT = "parent"
HOST_FROM_NAMED = {
    "parent": "the name of the directory holding the capture",
    "name": "the capture's file name without its suffixes (node-017.pcap.gz → node-017)",
}
"""The named ways of taking a host from a path; anything else is a regular expression."""

_GLOB_CHARS = re.compile(r"[*?\[]")


class FleetError(VsockmonError):
    """A fleet run that cannot start or finish: the message is one line for the user."""


@dataclass(frozen=True)
class Capture:
    """One capture of the fleet: where it is, and which host and name it has."""

    source: str
    """A local absolute path or an fsspec URL: what a worker opens."""
    host: str
    name: str
    """The file name: unique among the captures of its host."""


def _strip_suffix(name: str) -> str:
    for suffix in sorted(CAPTURE_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name.split(".", 1)[0]


def host_rule(host_from: str) -> Callable[[str], str | None]:
    """A function from a capture's path to its host (None when the path does not say).

    ``parent`` and ``name`` are named rules; anything else is a regular expression searched
    in the path: its group ``host``, else its first group, else the whole match."""
    if host_from == "parent":
        return lambda path: os.path.basename(os.path.dirname(path)) or None
    if host_from == "name":
        return lambda path: _strip_suffix(os.path.basename(path)) or None
    try:
        pattern = re.compile(host_from)
    except re.error as e:
        raise FleetError(f"--host-from {host_from!r}: not a regular expression: {e}") from None
    group: int | str = "host" if "host" in pattern.groupindex else min(pattern.groups, 1)

    def by_pattern(path: str) -> str | None:
        match = pattern.search(path)
        return (match.group(group) or None) if match else None

    return by_pattern


def _files(source: str) -> list[str]:
    """The capture files of one source, as paths (local) or URLs, sorted."""
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(source)
    except (ImportError, ValueError) as e:
        raise FleetError(f"{source}: {e}") from None
    from fsspec.implementations.local import LocalFileSystem

    local = isinstance(fs, LocalFileSystem)
    try:
        if _GLOB_CHARS.search(path):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
            if not found:
                raise FleetError(f"{source}: matches no file")
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if p.endswith(CAPTURE_SUFFIXES)]
            if not found:
                raise FleetError(f"{source}: no capture files ({', '.join(CAPTURE_SUFFIXES)})")
        elif fs.exists(path):
            found = [path]
        else:
            raise FleetError(f"{source}: no such file or directory")
    except OSError as e:
        raise FleetError(f"{source}: {e.strerror or e}") from None
    if local:
        return sorted(os.path.abspath(p) for p in found)
    return sorted(fs.unstrip_protocol(p) for p in found)


def expand(sources: Sequence[str], host_from: str = HOST_FROM_DEFAULT) -> list[Capture]:
    """Every capture the sources name, once each, in a stable order, with host and name."""
    if not sources:
        raise FleetError("no sources: name directories, globs or capture files")
    host_of = host_rule(host_from)
    seen: dict[str, None] = {}
    for source in sources:
        seen.update(dict.fromkeys(_files(source)))
    captures: list[Capture] = []
    owner: dict[tuple[str, str], str] = {}
    for path in seen:
        host = host_of(path)
        if host is None:
            raise FleetError(f"{path}: --host-from {host_from!r} finds no host in this path")
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if (host, name) in owner:
            raise FleetError(f"{path} and {owner[host, name]}: both are capture {name!r} of "
                             f"host {host!r}; choose --host-from to tell them apart")
        owner[host, name] = path
        captures.append(Capture(path, host, name))
    return captures
