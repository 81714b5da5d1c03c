"""blockgraph-null: the ``null-co`` and ``null-aio`` protocol drivers."""

__version__ = "0.1.0"
