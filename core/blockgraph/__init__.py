"""blockgraph: the QEMU block layer as a plugin microkernel.

The package root stays import-light (start-up is part of every CLI figure):
heavier names are loaded on first access.
"""

from __future__ import annotations

from typing import Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("blockgraph")

_LAZY = {
    "Session": "blockgraph.session",
    "BlockBackend": "blockgraph.backend",
    "Image": "blockgraph.sync",
    "open": "blockgraph.sync",
    "Node": "blockgraph.node",
    "NodeContext": "blockgraph.node",
    "Child": "blockgraph.node",
    "DriverKind": "blockgraph.driver",
    "ReqFlags": "blockgraph.driver",
    "BlockStatus": "blockgraph.driver",
    "BlockLimits": "blockgraph.driver",
    "Status": "blockgraph.driver",
    "Concurrency": "blockgraph.driver",
    "PreallocMode": "blockgraph.driver",
    "Perm": "blockgraph.perms",
    "ChildRole": "blockgraph.perms",
    "opt": "blockgraph.options",
    "parse_size": "blockgraph.options",
    "parse_bool": "blockgraph.options",
}

__all__ = ["hookimpl", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockgraph' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
