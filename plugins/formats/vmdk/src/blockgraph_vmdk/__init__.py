"""blockgraph-vmdk: VMDK format driver."""

__version__ = "0.1.0"
