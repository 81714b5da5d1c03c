"""Entry point: registers the driver by name, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_vmdk.driver:VmdkDriver", name="vmdk", kind="format", probe="blockgraph_vmdk.probe:probe")
