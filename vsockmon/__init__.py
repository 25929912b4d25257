"""vsockmon: capture and analyse Linux virtio-vsock traffic.

After ``import vsockmon``, scapy decodes link type 271 (files) and netdevice type 826 (live
sockets) with our layers. Scapy is not imported for that: it costs half a second here and
many seconds inside the lab VM, and the capture and echo paths never need it. If scapy is
already loaded the layers register now; otherwise a one-shot import hook registers them as
soon as the program itself imports scapy.

The public API (:mod:`vsockmon.api`: ``vsockmon.open(path)`` and what it returns) loads on
first use, so ``import vsockmon`` stays cheap for the live capture path inside the lab VM:
numpy and pyarrow load when a capture is opened, and click never does.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from vsockmon.errors import VsockmonError

if TYPE_CHECKING:
    from vsockmon.analysis.stats import Stats
    from vsockmon.api import Capture, open
    from vsockmon.diagnose.model import Finding, Severity, Thresholds
    from vsockmon.wire.pcapio import CaptureError

__version__ = "0.1.0"
__all__ = ["Capture", "CaptureError", "Finding", "Severity", "Stats", "Thresholds",
           "VsockmonError", "open"]

_LAZY = {
    "open": "vsockmon.api", "Capture": "vsockmon.api",
    "Finding": "vsockmon.diagnose.model", "Severity": "vsockmon.diagnose.model",
    "Thresholds": "vsockmon.diagnose.model", "Stats": "vsockmon.analysis.stats",
    "CaptureError": "vsockmon.wire.pcapio",
}
"""Public name → the module defining it, imported on first access (PEP 562)."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vsockmon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

_TRIGGER = "scapy.packet"


class _RegisterAfterScapy(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``scapy.packet`` so our layers register right after it loads."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            importlib.import_module("vsockmon.wire.layers")

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _TRIGGER in sys.modules:
    importlib.import_module("vsockmon.wire.layers")
else:
    sys.meta_path.insert(0, _RegisterAfterScapy())
