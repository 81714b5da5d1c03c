"""blockgraph-vdi: VirtualBox VDI format driver."""

__version__ = "0.1.0"
