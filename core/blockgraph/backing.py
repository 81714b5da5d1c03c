"""Backing files named inside an image: resolving the name safely and building the child's options."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from . import io
from .errors import OpenError
from .perms import ChildRole

if TYPE_CHECKING:
    from .node import Node

PROBE_BYTES = 2048


def full_backing_filename(image: str, backing: str, registry: Any) -> str:
    """``backing`` as QEMU's path_combine sees it: relative names are relative to the image's directory."""
    if not backing or backing.startswith("json:") or registry.protocol_for(backing) or os.path.isabs(backing):
        return backing
    if image.startswith("json:"):
        raise OpenError(f"Cannot use relative backing file names for '{image}'")
    if not image:
        return backing
    head = image.rsplit("/", 1)[0] + "/" if "/" in image else ""
    return head + backing


def _cow_ancestors(node: Node) -> list[Node]:
    """This node and every node that uses it, transitively, as backing (the chain above it)."""
    seen, todo = [node], [node]
    while todo:
        for edge in todo.pop().parents:
            parent = getattr(edge, "parent", None)
            if edge.role & ChildRole.COW and isinstance(parent, type(node)) and parent not in seen:
                seen.append(parent)
                todo.append(parent)
    return seen


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # ValueError: a name with a NUL byte (corrupt header) names no file
        return False


async def backing_spec(node: Node, backing: str, fmt: str | None) -> Any:
    """The option tree (or an already-open protocol node) for ``node``'s backing file ``backing``."""
    from .options import parse_json

    session = node.session
    registry = session.registry
    # A probed image gets its filename from its file child only after open; the backing is opened during it.
    image = node.filename or (node.file.node.filename if node.file is not None else "")
    name = full_backing_filename(image, backing, registry)
    for above in _cow_ancestors(node):
        above_name = above.filename or (above.file.node.filename if above.file is not None else "")
        if above_name and _same_file(above_name, name):
            raise OpenError(f"Could not open backing file '{name}' of '{image}': "
                            "the backing chain loops back to an image above it")
    if name.startswith("json:"):
        tree = parse_json(name[5:], "json: backing filename")
        if fmt is not None:
            tree.setdefault("driver", fmt)
        return tree
    proto = registry.protocol_for(name) or "file"
    parse = getattr(registry.driver(proto), "parse_filename", None)
    file_spec = {"driver": proto, **(parse(name) if parse else {"filename": name})}
    if fmt is not None:
        if fmt == proto:
            return file_spec
        return {"driver": fmt, "file": file_spec}
    proto_node = await session.open_node(file_spec, parent=node, role=ChildRole.COW)
    header = bytearray(min(PROBE_BYTES, proto_node.length))
    try:
        await io.preadv(proto_node, 0, memoryview(header))
    except BaseException:
        from .node import close_node

        await close_node(proto_node)
        raise
    return {"driver": registry.probe(bytes(header), name), "file": proto_node}


def backing_changed(node: Node, child: Any) -> None:
    """Tell ``node``'s driver that its backing edge is now ``child`` (None: gone): the ``set_backing`` hook."""
    if node.caps.set_backing:
        node.driver.set_backing(child)
