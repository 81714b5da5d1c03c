"""Entry point: registers the drivers by name, without importing them."""

from blockgraph import hookimpl


@hookimpl
def blockgraph_register_drivers(register):
    register("blockgraph_null.driver:NullCoDriver", name="null-co", kind="protocol", protocols=("null-co",))
    register("blockgraph_null.driver:NullAioDriver", name="null-aio", kind="protocol", protocols=("null-aio",))
