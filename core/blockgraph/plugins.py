"""Plugin discovery and the registries of what plugins provide.

Entry points in the group ``blockgraph`` name import-light modules that
register their drivers as ``"module:Class"`` strings; the driver module itself
is imported only when one of its drivers is used. A plugin that fails to load
is recorded and reported, and becomes fatal only when its driver is asked for.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterable
from functools import partial
from typing import Any

import attrs
import pluggy

from . import hookspecs
from .driver import SUPPORTED_API_VERSIONS, DriverKind
from .errors import BlockGraphError, DriverNotFound, OptionError

GROUP = "blockgraph"
CORE_DIST = "blockgraph"

# Which distribution provides a driver, for "not installed" messages (QEMU's module_block.h).
# tests/test_known_drivers.py keeps it in step with the workspace.
KNOWN_DRIVERS: dict[str, str] = {
    "file": "blockgraph-file", "host_device": "blockgraph-file", "host_cdrom": "blockgraph-file",
    "null-co": "blockgraph-null", "null-aio": "blockgraph-null",
    "raw": "blockgraph-raw",
    "qcow2": "blockgraph-qcow2",
    "vmdk": "blockgraph-vmdk", "vpc": "blockgraph-vpc", "vhd": "blockgraph-vpc",
    "vdi": "blockgraph-vdi", "vhdx": "blockgraph-vhdx", "luks": "blockgraph-luks",
    "nbd": "blockgraph-nbd", "iscsi": "blockgraph-iscsi",
    "http": "blockgraph-http", "https": "blockgraph-http", "ssh": "blockgraph-ssh",
    "throttle": "blockgraph-throttle", "quorum": "blockgraph-quorum",
    "copy-on-read": "blockgraph-copy-on-read", "blkdebug": "blockgraph-blkdebug",
    "blkverify": "blockgraph-blkverify", "preallocate": "blockgraph-preallocate",
    "compress": "blockgraph-compress", "copy-before-write": "blockgraph-copy-before-write",
}


def dist_for(driver: str) -> str:
    return KNOWN_DRIVERS.get(driver, f"blockgraph-{driver}")


@attrs.frozen
class PluginInfo:
    """One loaded (or failed) entry point."""

    name: str
    dist: str
    version: str
    module: str
    error: str | None = None


@attrs.define(eq=False)
class Entry:
    """Something a plugin registered; ``target`` is resolved on first use."""

    name: str
    target: Any
    plugin: str
    dist: str
    meta: dict[str, Any] = attrs.Factory(dict)

    def resolve(self) -> Any:
        if isinstance(self.target, str):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            self.target = getattr(obj, attr) if attr else obj
        return self.target


class PluginHost:
    """The plugin manager of one session, and its registries."""

    def __init__(self, *, autoload: bool | None = None, load: Iterable[str] | None = None,
                 block: Iterable[str] = (), extra: Iterable[tuple[Any, str]] = ()) -> None:
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.drivers: dict[str, Entry] = {}
        self.aliases: dict[str, str] = {}
        self.protocols: dict[str, str] = {}
        self.tables: dict[str, dict[str, Entry]] = {
            k: {} for k in ("jobs", "devices", "exports", "object_types", "qmp_commands", "cli")}
        self._blocked = set(block)
        if os.environ.get("BLOCKGRAPH_TRACE_PLUGINS"):
            self.pm.trace.root.setwriter(print)
            self.pm.enable_tracing()
        from . import builtin
        self.register(builtin, "builtin", CORE_DIST)
        if autoload is None:
            autoload = not os.environ.get("BLOCKGRAPH_DISABLE_PLUGIN_AUTOLOAD")
        if load is None and "BLOCKGRAPH_LOAD_PLUGINS" in os.environ:
            load = [d.strip() for d in os.environ["BLOCKGRAPH_LOAD_PLUGINS"].split(",") if d.strip()]
        if autoload:
            self._load_entry_points(None if load is None else set(load))
        for obj, name in extra:
            self.register(obj, name)
        self.pm.check_pending()

    # ------------------------------------------------------------ loading

    def _load_entry_points(self, only: set[str] | None) -> None:
        from .entrypoints import entry_points

        for ep in entry_points(GROUP):
            dist, version = ep.dist, ep.version
            if ep.name in self._blocked or (only is not None and dist not in only and ep.name not in only):
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as e:  # one broken plugin must not take the others down
                self.plugins.append(PluginInfo(ep.name, dist, version, ep.value, f"{type(e).__name__}: {e}"))
                continue
            self.register(module, ep.name, dist, version)

    def register(self, plugin: Any, name: str, dist: str | None = None, version: str = "") -> None:
        """Register a plugin object (module or instance) and collect what it provides."""
        dist = dist or name
        self.pm.register(plugin, name=name)
        self.plugins.append(PluginInfo(name, dist, version, getattr(plugin, "__name__", repr(plugin))))
        self._collect(name, dist)

    def _collect(self, plugin_name: str, dist: str) -> None:
        calls = {
            "blockgraph_register_drivers": self._add_driver,
            **{f"blockgraph_register_{k}": partial(self._add_entry, k) for k in self.tables},
        }
        for hook_name, adder in calls.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name == plugin_name:
                    impl.function(register=partial(adder, plugin_name, dist))

    def _add_driver(self, plugin: str, dist: str, target: Any, *, name: str | None = None,
                    kind: str | DriverKind | None = None, aliases: Iterable[str] = (),
                    protocols: Iterable[str] = (), probe: bool | str | None = None) -> None:
        if not isinstance(target, str):
            name = name or target.name
            kind = kind or target.kind
            aliases = tuple(aliases) or tuple(getattr(target, "aliases", ()))
            protocols = tuple(protocols) or tuple(getattr(target, "protocols", ()))
            probe = callable(getattr(target, "probe", None)) if probe is None else probe
        if not name or not kind:
            raise BlockGraphError(f"plugin '{plugin}' registered a driver without name and kind")
        kind = DriverKind(kind) if isinstance(kind, str) else kind
        # probe="module:function" names a light probe function, so probing need not import the driver module.
        entry = Entry(name, target, plugin, dist, {"kind": kind, "probe": bool(probe),
                                                   "probe_fn": probe if isinstance(probe, str) else None})
        self.drivers[name] = entry
        for alias in aliases:
            self.aliases[alias] = name
        for prefix in protocols:
            self.protocols[prefix] = name

    def _add_entry(self, table: str, plugin: str, dist: str, target: Any, *, name: str | None = None,
                   **meta: Any) -> None:
        name = name or getattr(target, "name", None)
        if not name:
            raise BlockGraphError(f"plugin '{plugin}' registered a {table} entry without a name")
        self.tables[table][name] = Entry(name, target, plugin, dist, meta)

    # ------------------------------------------------------------ lookups

    def driver_entry(self, name: str) -> Entry:
        name = self.aliases.get(name, name)
        entry = self.drivers.get(name)
        if entry is None:
            for info in self.plugins:
                if info.error and info.dist == dist_for(name):
                    raise DriverNotFound(name, info.dist, installed_error=info.error)
            raise DriverNotFound(name, dist_for(name) if name in KNOWN_DRIVERS else None)
        return entry

    def driver(self, name: str) -> type:
        entry = self.driver_entry(name)
        cls = entry.resolve()
        version = getattr(cls, "api_version", None)
        if version not in SUPPORTED_API_VERSIONS:
            raise BlockGraphError(
                f"driver '{name}' from {entry.dist} declares api_version {version}, but this blockgraph "
                f"supports {SUPPORTED_API_VERSIONS.start}..{SUPPORTED_API_VERSIONS.stop - 1}")
        return cls

    def formats(self) -> list[str]:
        return sorted(n for n, e in self.drivers.items() if e.meta["kind"] is DriverKind.FORMAT)

    def protocol_for(self, filename: str) -> str | None:
        """The protocol driver a filename's ``prefix:`` selects (QEMU's path_has_protocol), or None."""
        colon = filename.find(":")
        if colon <= 0:
            return None
        slash = filename.find("/")
        if 0 <= slash < colon:
            return None
        prefix = filename[:colon]
        if prefix in self.protocols:
            return self.protocols[prefix]
        if prefix == "json":
            return None
        raise OptionError(f"Unknown protocol '{prefix}' in '{filename}'"
                          + (f"; it is provided by {dist_for(prefix)}, which is not installed"
                             if prefix in KNOWN_DRIVERS else ""))

    def probe(self, header: bytes, filename: str) -> str:
        """The format whose probe scores highest on the first bytes (QEMU's bdrv_probe_all)."""
        best, score = "raw", 0
        for name, entry in self.drivers.items():
            if entry.meta["kind"] is not DriverKind.FORMAT or not entry.meta["probe"]:
                continue
            try:
                fn = entry.meta.get("probe_fn")
                s = (_resolve(fn) if fn else self.driver(name).probe)(header, filename)
            except BlockGraphError:
                continue
            if s > score:
                best, score = name, s
        return best

    def table(self, kind: str) -> dict[str, Entry]:
        return self.tables[kind]


@functools.cache
def _resolve(spec: str) -> Any:
    """``module:attribute`` imported once."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)
