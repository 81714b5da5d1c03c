"""Entry point: registers the driver by name, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_raw.driver:RawDriver", name="raw", kind="format", probe=True)
