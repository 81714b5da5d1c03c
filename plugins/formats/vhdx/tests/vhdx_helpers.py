"""Helpers of the vhdx tests: the shared interop helpers (running qemu's tools and blockgraph)."""

from blockgraph.testing.peers import bg, commands, needs_qemu, run

__all__ = ["bg", "commands", "needs_qemu", "run"]
