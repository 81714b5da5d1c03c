"""Entry point: registers what this plugin provides, without importing it."""

from blockgraph import hookimpl  # noqa: F401
