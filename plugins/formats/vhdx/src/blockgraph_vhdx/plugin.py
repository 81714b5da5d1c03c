"""Entry point: registers the driver by name, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_vhdx.driver:VhdxDriver", name="vhdx", kind="format", probe="blockgraph_vhdx.probe:probe")
