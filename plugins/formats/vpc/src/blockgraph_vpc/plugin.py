"""Entry point: registers the vpc (VHD) driver by name, without importing it."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_vpc.driver:VpcDriver", name="vpc", kind="format", probe="blockgraph_vpc.probe:probe",
             aliases=("vhd",))
