"""blockgraph-raw: the ``raw`` format driver."""

__version__ = "0.1.0"
