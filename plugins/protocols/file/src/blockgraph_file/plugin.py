"""Entry point: registers the drivers by name, without importing them."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_file.driver:FileDriver", name="file", kind="protocol", protocols=("file",))
    register("blockgraph_file.driver:HostDeviceDriver", name="host_device", kind="protocol",
             protocols=("host_device",))
