"""blockgraph-nbd: NBD client driver, server export and the nbd command."""

__version__ = "0.1.0"
