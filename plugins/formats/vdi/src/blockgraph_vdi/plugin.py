"""Entry point: registers the vdi driver by name, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_vdi.driver:VdiDriver", name="vdi", kind="format", probe="blockgraph_vdi.probe:probe")
