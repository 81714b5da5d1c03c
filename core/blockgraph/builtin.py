"""Core's own plugin: the CLI subcommands it ships. Nothing is special about it."""

from __future__ import annotations

from typing import Any

from . import hookimpl


@hookimpl
def blockgraph_register_cli(register: Any) -> None:
    register("blockgraph.cli.img", name="img", help="create, inspect, convert and compare images (qemu-img)")
    register("blockgraph.cli.qio", name="io", help="run qemu-io commands on an image")
    register("blockgraph.cli.plugins", name="plugins", help="list installed plugins and their drivers")
    register("blockgraph.cli.drive", name="drive", help="show what QEMU -drive lines mean: nodes, backend, device")
    register("blockgraph.cli.serve", name="serve", help="run a storage daemon with a QMP monitor (qemu-storage-daemon)")
