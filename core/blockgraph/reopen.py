"""Reopen: change a live node's read-only flag and mutable options as one transaction.

QEMU's bdrv_reopen_multiple in three phases: every affected driver prepares
(``reopen_prepare(options, read_only)``, e.g. a new file descriptor), then
permissions are recomputed for the new read-only flags, then every driver
commits, or, if anything failed, every prepared driver aborts and nothing
has changed.
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import BlockGraphError, OptionError
from .io import drained, sector_length
from .node import Node, update_perms
from .options import flatten, option_fields, structure
from .perms import ChildRole


def _affected(node: Node, read_only: bool | None) -> list[Node]:
    """The node and, for a read-only change, the children that inherit it (not backing files)."""
    out = [node]
    if read_only is not None:
        for c in node.children.values():
            if not c.role & ChildRole.COW and c.node.read_only != read_only and len(c.node.parents) == 1:
                out.extend(n for n in _affected(c.node, read_only) if n not in out)
    return out


def _new_options(node: Node, changes: dict[str, Any]) -> Any:
    """Validate ``changes`` against the driver's options: only mutable ones may differ."""
    cls = type(node.driver).Options
    if not changes:
        return node.options
    fields = option_fields(cls)
    for key in flatten(changes):
        if key not in fields:
            raise OptionError(f"Cannot change the option '{key}'", node=node.name, driver=node.driver_name,
                              option=key)
    new = structure(cls, {**{k: getattr(node.options, f.name) for k, f in fields.items()
                             if getattr(node.options, f.name) is not None}, **changes},
                    node=node.name, driver=node.driver_name)
    for key, field in fields.items():
        if getattr(new, field.name) != getattr(node.options, field.name) and not field.metadata.get("mutable"):
            raise OptionError(f"Cannot change the option '{key}'", node=node.name, driver=node.driver_name,
                              option=key)
    return new


async def reopen(node: Node, *, read_only: bool | None = None, options: dict[str, Any] | None = None) -> None:
    """Reopen ``node`` (and children inheriting read-only) with new flags and options."""
    if read_only is False and node.common is not None and node.common.force_share:
        raise OptionError("force-share=on can only be used with read-only images", node=node.name,
                          option="force-share")
    nodes = _affected(node, read_only)
    plans: list[tuple[Node, Any, bool]] = []
    for n in nodes:
        new_ro = n.read_only if read_only is None else read_only
        if not new_ro and not n.caps.write:
            raise BlockGraphError(f"node '{n.name}': driver '{n.driver_name}' cannot write")
        plans.append((n, _new_options(n, options or {}) if n is node else n.options, new_ro))
    for n, new_opts, new_ro in plans:
        if (new_ro != n.read_only or new_opts is not n.options) and not n.caps.reopen:
            raise BlockGraphError(f"Block format '{n.driver_name}' used by node '{n.name}' does not support "
                                  "reopening files")
    async with drained(node):
        await _reopen(nodes, plans)


async def _reopen(nodes: list[Node], plans: list[tuple[Node, Any, bool]]) -> None:
    prepared: list[Node] = []
    old_ro = {n: n.read_only for n in nodes}
    try:
        for n, new_opts, new_ro in plans:
            if n.caps.reopen:
                await n.driver.reopen_prepare(new_opts, new_ro)
                prepared.append(n)
        for n, _, new_ro in plans:
            n.read_only = new_ro
        update_perms(nodes)
    except BaseException:
        for n in nodes:
            n.read_only = old_ro[n]
        for n in prepared:
            await n.driver.reopen_abort()
        raise
    for n, new_opts, new_ro in plans:
        if n.caps.reopen:
            await n.driver.reopen_commit()
        n.options = new_opts
        n.length = sector_length(await n.driver.getlength())
        if n.common is not None:
            n.common = attrs.evolve(n.common, read_only=new_ro)
