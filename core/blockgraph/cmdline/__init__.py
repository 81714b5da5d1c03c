"""QEMU command lines: ``-drive`` and its shortcuts, expanded into nodes, a BlockBackend and a device.

API for programs (``blockgraph drive``, ``blockgraph serve --drive``)::

    table = DriveTable()                      # numbering and ids across one command line
    exp = expand_drive("file=a.qcow2,if=none,id=d0", table, host=session.registry)
    blk = await open_drive(session, exp)      # session.backends["d0"] is blk
"""

from __future__ import annotations

from .drive import DriveError, DriveExpansion, ParsedDrive, expand_drive, parse_drive
from .legacy import DriveTable, shortcut_to_drive
from .open import open_drive

__all__ = ["DriveError", "DriveExpansion", "DriveTable", "ParsedDrive", "expand_drive", "open_drive",
           "parse_drive", "shortcut_to_drive"]
