"""Entry point: registers what this plugin provides, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_qcow2.driver:Qcow2Driver", name="qcow2", kind="format", probe="blockgraph_qcow2.probe:probe")
