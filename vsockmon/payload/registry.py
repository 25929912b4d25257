"""Which dissector reads a payload: a port table first, then heuristics, then nothing.

Built-in dissectors register here at import; third-party ones through the Python entry
point group ``vsockmon.payload``, loaded once on first use. An entry point names a
:class:`PayloadDissector` or an iterable of them (or a callable returning either), e.g. in a
plugin's ``pyproject.toml``::

    [project.entry-points."vsockmon.payload"]
    myproto = "myplugin.vsock:DISSECTOR"

A dissector that raises is skipped for that payload: one plugin's bug must not stop
``decode`` or ``export`` on a capture of a million frames.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TypeVar

from vsockmon.payload.model import PayloadInfo

ENTRY_POINT_GROUP = "vsockmon.payload"
T = TypeVar("T")


@dataclass(frozen=True)
class PayloadDissector:
    """A payload protocol: how to read it and when to try it.

    ``dissect`` reads a payload it has been given (leniently: on its port a fragment is still
    worth a line); ``detect`` says whether an arbitrary payload looks like this protocol
    (strictly: it runs on every port). Without ``detect`` the dissector is tried only on its
    ``ports``. Heuristics run in ascending ``priority``.

    ``detect_decides`` is a promise: whenever ``detect`` says yes, ``dissect`` returns a
    :class:`PayloadInfo` whose protocol is ``name``. A caller that hides this protocol
    (:meth:`Registry.dissect`'s ``hide``) then learns enough from ``detect`` alone, and the
    dissection is not run just to be thrown away.
    """

    name: str
    dissect: Callable[[bytes], PayloadInfo | None]
    ports: frozenset[int] = frozenset()
    detect: Callable[[bytes], bool] | None = None
    priority: int = 100
    description: str = ""
    detect_decides: bool = False


@dataclass
class Registry:
    """Dissectors by name, with the port table and the heuristic order derived from them
    (once per change, not per payload: export dissects millions)."""

    dissectors: dict[str, PayloadDissector] = field(default_factory=dict)
    load_entry_points: bool = True
    _order: list[PayloadDissector] | None = field(default=None, init=False, repr=False)
    _ports: dict[int, tuple[PayloadDissector, ...]] = field(default_factory=dict, init=False,
                                                            repr=False)
    _heuristics: list[tuple[PayloadDissector, Callable[[bytes], bool]]] = field(
        default_factory=list, init=False, repr=False)

    def register(self, dissector: PayloadDissector) -> PayloadDissector:
        """Add (or replace, by name) a dissector; returns it so it can be used as a value."""
        self.dissectors[dissector.name] = dissector
        self._order = None
        return dissector

    def unregister(self, name: str) -> None:
        self.dissectors.pop(name, None)
        self._order = None

    def _plugins(self) -> None:
        """Load the entry points once; a broken plugin is a warning, not a failure."""
        if not self.load_entry_points:
            return
        self.load_entry_points = False
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                for d in _as_dissectors(ep.load()):
                    self.register(d)
            except Exception as e:  # a plugin's bug must not break the host tool
                warnings.warn(f"vsockmon.payload plugin {ep.name!r}: {e}", stacklevel=2)

    def all(self) -> list[PayloadDissector]:
        """Every dissector, port-table ones and heuristics, in heuristic order."""
        self._plugins()
        if self._order is None:
            self._order = sorted(self.dissectors.values(), key=lambda d: (d.priority, d.name))
            self._heuristics = [(d, d.detect) for d in self._order if d.detect is not None]
            self._ports = {}
            for d in self._order:
                for port in d.ports:
                    self._ports[port] = (*self._ports.get(port, ()), d)
        return self._order

    def for_port(self, port: int) -> list[PayloadDissector]:
        self.all()
        return list(self._ports.get(port, ()))

    def dissect(self, payload: bytes, src_port: int, dst_port: int, hide: str | None = None
                ) -> PayloadInfo | None:
        """The first dissection of ``payload``: by the destination port's dissectors, then
        the source port's (replies come from the well-known port), then by heuristics.
        None, too, when that dissection's protocol is ``hide`` (``decode``'s lines hide
        ``text``: their preview already shows it).

        It runs once per RW packet (a million per capture), so the port table and the
        heuristic order are looked up once, not per step, and a hidden protocol whose
        ``detect`` decides is never dissected."""
        if not payload:
            return None
        if self._order is None or self.load_entry_points:  # all()'s work to do
            self.all()
        ports = self._ports
        on_ports = ports.get(dst_port, _NO_DISSECTORS) + ports.get(src_port, _NO_DISSECTORS)
        for d in on_ports:
            info = _safely(d.dissect, payload)
            if info is not None:
                return None if info.protocol == hide else info
        for d, detect in self._heuristics:
            if d in on_ports:
                continue
            try:  # inline, not _safely: this loop runs five times per payload
                if not detect(payload):
                    continue
            except Exception:  # see the module docstring: skip a failing dissector
                continue
            if d.detect_decides and d.name == hide:
                return None
            info = _safely(d.dissect, payload)
            if info is not None:
                return None if info.protocol == hide else info
        return None


_NO_DISSECTORS: tuple[PayloadDissector, ...] = ()


def _safely(fn: Callable[[bytes], T], payload: bytes) -> T | None:
    try:
        return fn(payload)
    except Exception:  # see the module docstring: skip a failing dissector
        return None


def _as_dissectors(obj: object) -> Iterable[PayloadDissector]:
    if callable(obj):
        obj = obj()
    if isinstance(obj, PayloadDissector):
        return [obj]
    if not isinstance(obj, Iterable):
        raise TypeError("entry point must give PayloadDissector objects")
    items = list(obj)
    if not all(isinstance(d, PayloadDissector) for d in items):
        raise TypeError("entry point must give PayloadDissector objects")
    return items
