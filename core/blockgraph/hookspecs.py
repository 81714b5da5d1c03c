"""Hook specifications: how plugins register what they provide.

pluggy is for assembly only; no hook is called on the data path. Each
``register`` callback takes either the object itself or, to keep start-up
fast, a ``"module:attribute"`` string that is imported on first use.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("blockgraph")


@hookspec
def blockgraph_register_drivers(register: Any) -> None:
    """Register block drivers (formats, protocols, filters).

    ``register(target, *, name, kind, aliases=(), protocols=(), probe=False)``
    where ``target`` is a driver class or ``"module:Class"``. ``protocols``
    lists filename prefixes (``nbd`` for ``nbd://...``); ``probe=True`` marks
    a format whose class has a ``probe`` classmethod. Plain hook; the return
    value is ignored.
    """


@hookspec
def blockgraph_register_jobs(register: Any) -> None:
    """Register block job types: ``register(target, *, name)``. Plain hook."""


@hookspec
def blockgraph_register_devices(register: Any) -> None:
    """Register device frontends: ``register(target, *, name)``. Plain hook."""


@hookspec
def blockgraph_register_exports(register: Any) -> None:
    """Register export types (``nbd``, ``vhost-user-blk``...): ``register(target, *, name)``. Plain hook."""


@hookspec
def blockgraph_register_object_types(register: Any) -> None:
    """Register ``--object`` types (``throttle-group``, ``secret``...): ``register(target, *, name)``. Plain hook."""


@hookspec
def blockgraph_register_qmp_commands(register: Any) -> None:
    """Register monitor commands: ``register(target, *, name)``. Plain hook."""


@hookspec
def blockgraph_register_cli(register: Any) -> None:
    """Register CLI subcommands: ``register(target, *, name, help)``, ``target`` being a module
    (or ``"module"``) with ``add_arguments(parser)`` and ``main(args) -> int``. Plain hook."""


@hookspec(historic=True)
def blockgraph_configure(session: Any) -> None:
    """Called once per session after every plugin is registered. Historic: late plugins see it too."""


@hookspec
def blockgraph_unconfigure(session: Any) -> None:
    """Called when a session closes. Plain hook."""


@hookspec
def blockgraph_node_added(node: Any) -> None:
    """A node was opened and named. Notification; return values ignored."""


@hookspec
def blockgraph_node_removed(node: Any) -> None:
    """A node was closed. Notification; return values ignored."""
