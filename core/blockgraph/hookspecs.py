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
    """Register export types (``nbd``, ``vhost-user-blk``...): ``register(target, *, name)``. Plain hook.

    ``target`` (a class or ``"module:Class"``) provides:

    * ``async create(daemon, options) -> export`` (classmethod or static): start serving. ``options`` is the
      BlockExportOptions tree of ``--export`` / ``block-export-add`` (``type``, ``id``, ``node-name``,
      ``writable``, ... plus the type's own keys; keyval strings or JSON values, so convert with
      ``blockgraph.options.parse_bool`` and friends). The core has already checked that ``id`` is new and
      ``node-name`` exists; raise ``blockgraph.qmp.QMPError`` or any ``BlockGraphError`` to refuse.
    * optionally ``async start_server(daemon, options)``: the daemon's ``--<name>-server`` option
      (``--nbd-server addr.type=unix,addr.path=...`` calls the ``nbd`` type's ``start_server``), and
      optionally ``async stop_server(daemon)``, called at shutdown after every export is deleted.

    The returned export object has ``id``, ``type``, ``node_name`` and ``shutting_down`` attributes and
    ``async delete(mode)`` (``mode`` is ``safe`` or ``hard``) that stops serving and releases the node; an
    optional ``blk`` attribute (its BlockBackend) makes the graph dump show it as the export and turns its I/O
    errors into BLOCK_IO_ERROR events. ``node-name`` may name a backend (QEMU's bdrv_lookup_bs): the core
    passes the node's own name on.
    ``daemon`` is a :class:`blockgraph.daemon.Daemon`: ``daemon.session`` (the graph), ``daemon.emit(event,
    data)`` (QMP events), ``daemon.state`` (a dict for per-plugin state such as a running server),
    ``daemon.exports`` (id -> export). The core owns ``block-export-add``, ``block-export-del`` and
    ``query-block-exports`` and the daemon's ``--export``, and dispatches them here by ``type``.
    """


@hookspec
def blockgraph_register_object_types(register: Any) -> None:
    """Register ``--object`` types (``throttle-group``, ``secret``...): ``register(target, *, name)``. Plain hook."""


@hookspec
def blockgraph_register_qmp_commands(register: Any) -> None:
    """Register monitor commands: ``register(target, *, name, args=None)``. Plain hook.

    ``target`` (a function or ``"module:function"``) is called as ``await target(daemon, arguments)`` (plain
    functions work too) and returns the command's ``return`` value (``None`` means ``{}``). ``arguments`` is
    the request's ``arguments`` object. ``args``, when given, declares them as QAPI does (``{"node-name":
    "str", "size": "int", "*flat": "bool"}``; ``*`` marks optional, types are ``str``, ``int``, ``bool``,
    ``number``, ``any``, ``dict``, ``list``) and the monitor then refuses missing, unexpected and ill-typed
    arguments with QEMU's texts before calling; without ``args`` the target checks them itself.
    Errors: raise ``blockgraph.qmp.QMPError(desc, cls="GenericError")`` (or ``DeviceNotFound`` ...) or any
    ``BlockGraphError`` (a ``GenericError`` with its text). A plugin command of the same name as a core one
    replaces it. ``daemon`` is the :class:`blockgraph.daemon.Daemon` described under
    ``blockgraph_register_exports``.
    """


@hookspec
def blockgraph_register_cli(register: Any) -> None:
    """Register CLI subcommands: ``register(target, *, name, help)``, ``target`` being a module (or
    ``"module"`` / ``"module:attr"``) with ``main(argv: list[str], host: PluginHost) -> int``: ``blockgraph NAME
    ARGS...`` calls it with ``ARGS`` (the words after the subcommand name, unparsed: the module parses them
    itself) and the PluginHost the CLI built; the return value is the exit status (None counts as 0).
    ``help`` is the line ``blockgraph --help`` shows. Plain hook."""


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
