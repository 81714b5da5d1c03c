"""blockgraph-vhdx: VHDX format driver."""

__version__ = "0.1.0"
