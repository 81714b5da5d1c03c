"""blockgraph-qcow2: qcow2 format driver."""

__version__ = "0.1.0"
