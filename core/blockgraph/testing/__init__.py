"""The driver conformance kit and test helpers shipped with the core.

``contract`` holds the checks (plain ``async def check_*(harness)``, no pytest), ``suite`` the
pytest base classes (``DriverContract``), ``plugin`` the fixtures, ``mutants`` broken drivers that
prove every check can fail. Names load lazily so importing the package costs nothing.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "DriverContract": "blockgraph.testing.suite",
    "FilterContract": "blockgraph.testing.suite",
    "Harness": "blockgraph.testing.harness",
    "ContractViolation": "blockgraph.testing.harness",
    "NotApplicable": "blockgraph.testing.harness",
    "CHECKS": "blockgraph.testing.contract",
    "run_checks": "blockgraph.testing.contract",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blockgraph.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
