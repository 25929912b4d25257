"""vsockmon: capture and analyse Linux virtio-vsock traffic.

After ``import vsockmon``, scapy decodes link type 271 (files) and netdevice type 826 (live
sockets) with our layers. Scapy is not imported for that: it costs half a second here and
many seconds inside the lab VM, and the capture and echo paths never need it. If scapy is
already loaded the layers register now; otherwise a one-shot import hook registers them as
soon as the program itself imports scapy.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

__version__ = "0.1.0"

_TRIGGER = "scapy.packet"


class _RegisterAfterScapy(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``scapy.packet`` so our layers register right after it loads."""

    def find_spec(self, name: str, path: object, target: object = None) -> object:
        if name != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)  # type: ignore[arg-type]
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
