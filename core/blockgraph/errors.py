"""One exception hierarchy for everything a user can trigger.

Every message is complete on its own: it says what was wrong and where (node,
driver, option, file, offset), so that a CLI can print ``str(exc)`` and stop.
"""

from __future__ import annotations

import errno as _errno
import os


class BlockGraphError(Exception):
    """Base class of every blockgraph error."""


class OptionError(BlockGraphError):
    """An option is unknown, ill-typed or out of range."""

    def __init__(self, reason: str, *, node: str | None = None, driver: str | None = None,
                 option: str | None = None, bare: bool = False) -> None:
        """``bare``: ``reason`` is QEMU's complete text, which names the option itself; no "where" prefix."""
        self.node, self.driver, self.option, self.reason = node, driver, option, reason
        where = []
        if node and not node.startswith("#"):  # QEMU never shows a generated node name (#block001)
            where.append(f"node '{node}'")
        if driver:
            where.append(f"driver '{driver}'")
        if option:
            where.append(f"option '{option}'")
        super().__init__(f"{', '.join(where)}: {reason}" if where and not bare else reason)


class DriverNotFound(BlockGraphError):
    """A driver name that no installed plugin provides."""

    def __init__(self, driver: str, dist: str | None, *, installed_error: str | None = None) -> None:
        self.driver, self.dist = driver, dist
        if installed_error:
            msg = f"driver '{driver}' is provided by {dist}, which failed to load: {installed_error}"
        elif dist:
            msg = (f"driver '{driver}' is provided by {dist}, which is not installed "
                   f"(pip install {dist})")
        else:
            msg = f"Unknown driver '{driver}'"
        super().__init__(msg)


class NotSupported(BlockGraphError):
    """A driver cannot do this; the generic layer falls back (QEMU's -ENOTSUP)."""


class ImageCorrupt(BlockGraphError):
    """On-disk metadata is inconsistent."""

    def __init__(self, what: str, *, node: str | None = None, offset: int | None = None) -> None:
        self.node, self.offset, self.what = node, offset, what
        where = f"node '{node}'" if node else "image"
        at = f" at offset {offset}" if offset is not None else ""
        super().__init__(f"{where} is corrupt{at}: {what}")


class BlockIOError(BlockGraphError):
    """An I/O request failed; carries the errno so tools print qemu's text."""

    def __init__(self, err: int, *, node: str | None = None, op: str = "I/O",
                 offset: int | None = None, length: int | None = None, detail: str | None = None) -> None:
        self.errno, self.node, self.op, self.offset, self.length = err, node, op, offset, length
        self.strerror = detail or os.strerror(err)
        where = f" on node '{node}'" if node else ""
        rng = f" at offset {offset}" if offset is not None else ""
        rng += f", {length} bytes" if length is not None else ""
        super().__init__(f"{op} failed{where}{rng}: {self.strerror}")

    @property
    def is_enospc(self) -> bool:
        return self.errno == _errno.ENOSPC


class PermissionConflict(BlockGraphError):
    """Two users of one node want incompatible permissions."""


class ImageLocked(BlockGraphError):
    """Another process holds a conflicting byte-range lock on an image file."""


class OpenError(BlockGraphError):
    """A node could not be opened (missing file, bad header, ...)."""
