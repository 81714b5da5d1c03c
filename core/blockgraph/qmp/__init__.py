"""A QMP-compatible monitor: QEMU's wire protocol, error classes and block commands.

Plugins raise :class:`QMPError` from their commands (see ``blockgraph_register_qmp_commands``).
"""

from __future__ import annotations

from .protocol import CommandNotFound, DeviceNotFound, QMPError, check_args

__all__ = ["CommandNotFound", "DeviceNotFound", "QMPError", "check_args"]
