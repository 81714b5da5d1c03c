"""Entry point: registers what this plugin provides, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_nbd.client:NbdDriver", name="nbd", kind="protocol", protocols=("nbd", "nbd+tcp", "nbd+unix"))


@hookimpl
def blockgraph_register_cli(register):
    register("blockgraph_nbd.cli", name="nbd", help="serve an image over NBD (qemu-nbd)")


@hookimpl
def blockgraph_register_exports(register):
    register("blockgraph_nbd.export:NbdExportType", name="nbd")


@hookimpl
def blockgraph_register_qmp_commands(register):
    for name in ("start", "stop", "add", "remove"):
        register(f"blockgraph_nbd.export:qmp_nbd_server_{name}", name=f"nbd-server-{name}")
