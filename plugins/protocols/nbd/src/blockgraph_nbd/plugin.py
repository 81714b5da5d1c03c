"""Entry point: registers what this plugin provides, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_nbd.client:NbdDriver", name="nbd", kind="protocol", protocols=("nbd", "nbd+tcp", "nbd+unix"))
