"""Where a descriptor's extent files are, and which of them an untrusted image may name.

QEMU opens whatever an extent line names, absolute paths included, so a
crafted descriptor can expose any file the process can read as disk data
(the check OpenStack adds before handing images to QEMU). Here an extent
must stay inside the descriptor's directory, after ``..`` and symlinks are
resolved, unless the user opts in with ``x-allow-external-extents=on``.
"""

from __future__ import annotations

import os
from typing import Any

from blockgraph.errors import OpenError

ALLOW_OPTION = "x-allow-external-extents"


def _refuse(name: str, descriptor: str, why: str) -> OpenError:
    return OpenError(f"VMDK extent '{name}' of '{descriptor}' {why}: refused, since an image may only name files "
                     f"in its own directory (open with {ALLOW_OPTION}=on to allow it)")


def extent_path(descriptor: str, name: str, registry: Any, allow_external: bool) -> str:
    """The filename to open for extent ``name`` of the descriptor file ``descriptor``."""
    if not name:
        raise OpenError(f"VMDK extent of '{descriptor}' has an empty file name")
    if name.startswith("json:") or registry.protocol_for(name) or os.path.isabs(name):
        if not allow_external:
            raise _refuse(name, descriptor, "is an absolute path" if os.path.isabs(name) else
                          "names another protocol")
        return name
    if descriptor.startswith("json:") or not descriptor:
        raise OpenError(f"Cannot use relative paths with VMDK descriptor file '{descriptor}': Cannot generate a "
                        f"base directory for this node")
    head = descriptor.rsplit("/", 1)[0] + "/" if "/" in descriptor else ""
    path = head + name
    if allow_external:
        return path
    if os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise _refuse(name, descriptor, "leaves the descriptor's directory")
    if registry.protocol_for(descriptor) is None:
        base = os.path.realpath(head or ".")
        real = os.path.realpath(path)
        if os.path.commonpath([base, real]) != base:
            raise _refuse(name, descriptor, f"leaves the descriptor's directory (it resolves to '{real}')")
    return path


def child_spec(path: str, registry: Any, read_only: bool) -> dict[str, Any]:
    """Options for opening ``path`` with its protocol driver."""
    if path.startswith("json:"):
        from blockgraph.options import parse_json

        tree = parse_json(path[5:], "json: extent filename")
        return {**tree, "read-only": True} if read_only else tree
    proto = registry.protocol_for(path) or "file"
    parse = getattr(registry.driver(proto), "parse_filename", None)
    spec: dict[str, Any] = {"driver": proto, **(parse(path) if parse else {"filename": path})}
    if read_only:
        spec["read-only"] = True
    return spec
