"""The monitor's command table: the core's commands plus those plugins register through
``blockgraph_register_qmp_commands`` (a plugin's command replaces a core one of the same name)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs

from ..errors import BlockGraphError
from .protocol import CommandNotFound, QMPError, check_args, from_exception

if TYPE_CHECKING:
    from ..plugins import Entry, PluginHost

Handler = Callable[[Any, dict[str, Any]], Any]
CORE: dict[str, Command] = {}
CORE_MODULES = ("commands_core", "commands_query", "commands_graph", "commands_snapshot", "commands_export",
                "commands_hmp", "commands_bitmaps")


@attrs.define
class Command:
    """One command: ``fn(daemon, arguments)``, with an optional QAPI-like argument spec."""

    name: str
    fn: Handler | None = None
    args: dict[str, str] | None = None
    entry: Entry | None = None
    # Commands the monitor itself answers (they need the client's state).
    builtin: bool = False

    def handler(self) -> Handler:
        if self.fn is None and self.entry is not None:
            self.fn = self.entry.resolve()
        if self.fn is None:
            raise CommandNotFound(f"The command {self.name} has not been found")
        return self.fn

    async def run(self, daemon: Any, args: dict[str, Any]) -> Any:
        if self.args is not None:
            check_args(args, self.args)
        try:
            result = self.handler()(daemon, args)
            if inspect.isawaitable(result):
                result = await result
        except QMPError:
            raise
        except BlockGraphError as e:
            raise from_exception(e) from None
        return {} if result is None else result


def command(name: str, args: dict[str, str] | None = None, builtin: bool = False) -> Callable[[Handler], Handler]:
    """Declare a core command (the decorated function is ``fn(daemon, arguments)``)."""

    def deco(fn: Handler) -> Handler:
        CORE[name] = Command(name, fn, args, builtin=builtin)
        return fn

    return deco


def load_core() -> dict[str, Command]:
    import importlib

    for mod in CORE_MODULES:
        importlib.import_module(f"{__package__}.{mod}")
    return CORE


def build(host: PluginHost) -> dict[str, Command]:
    table = {name: attrs.evolve(cmd) for name, cmd in load_core().items()}
    for name, entry in host.table("qmp_commands").items():
        table[name] = Command(name, None, entry.meta.get("args"), entry=entry)
    return table
