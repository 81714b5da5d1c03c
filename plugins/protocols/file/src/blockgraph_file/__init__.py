"""blockgraph-file: the ``file`` and ``host_device`` protocol drivers."""

__version__ = "0.1.0"
