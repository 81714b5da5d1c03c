"""``blockgraph serve``: a storage daemon taking qemu-storage-daemon's options."""

from __future__ import annotations

from .core import Daemon

__all__ = ["Daemon"]
