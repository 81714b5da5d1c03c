"""Open a :class:`DriveExpansion` in a Session: its nodes, then a named BlockBackend on the root."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import attrs

from .. import io
from ..backend import BlockBackend
from ..errors import BlockGraphError, DriverNotFound, OptionError
from ..node import Node, close_node
from ..options import structure
from ..session import PROBE_BYTES, RAW_PROBE_WARNING
from .drive import PROBE, TEMPORARY, DriveExpansion

CHILD_KEYS = ("file", "backing", "data-file")


async def open_drive(session: Any, exp: DriveExpansion) -> BlockBackend:
    """Open the nodes of ``exp`` and attach a BlockBackend named ``exp.id`` (``session.backends[id]``).

    Drivers the expansion needs beyond those named (``copy-on-read`` for copy-on-read=on,
    ``throttle`` for throttling, ``qcow2`` for snapshot=on) must be installed, or this fails
    naming the distribution before anything is opened.
    """
    if exp.id in session.backends:
        raise OptionError(f"Device with id '{exp.id}' already exists")
    for driver in exp.requires:
        session.registry.driver_entry(driver)  # DriverNotFound: "... provided by blockgraph-X ..."
    be = exp.backend
    blk = BlockBackend(session, exp.id, read_only=be["read-only"], write_cache=be["write-cache"],
                       rerror=be["rerror"], werror=be["werror"])
    if exp.root is None:  # an empty drive: a backend without medium
        if exp.id in session.nodes:
            raise OptionError(f"Device name '{exp.id}' conflicts with an existing node name")
        session.backends[exp.id] = blk
        return blk
    opened: dict[str, Node] = {}
    temp: list[str] = []
    try:
        for spec in exp.blockdevs:
            opened[spec["node-name"]] = await _open_one(session, exp, spec, opened, temp)
        root = opened[exp.root]
        if be["throttle"]:
            root = await _throttle_filter(session, be["throttle"], root)
        blk.insert(root)
    except BaseException:
        for node in reversed(list(opened.values())):
            if node.refcnt == 0:
                await close_node(node)
        raise
    finally:
        for path in temp:  # QEMU deletes the overlay on close; the open descriptor keeps it alive
            _unlink(path)
    return blk


async def _open_one(session: Any, exp: DriveExpansion, spec: dict[str, Any], opened: dict[str, Node],
                    temp: list[str]) -> Node:
    options = dict(spec)
    if options["node-name"] in exp.generated:
        del options["node-name"]  # QEMU names these #blockNNN
    for key in CHILD_KEYS:
        ref = options.get(key)
        if isinstance(ref, str):
            options[key] = opened.get(ref) or session.find_node(ref)
    detect_zeroes = options.pop("detect-zeroes", "off")
    if options.get("filename") == TEMPORARY:
        overlay = next(bd for bd in exp.blockdevs if bd.get("file") == spec["node-name"])
        backing = opened[overlay["backing"]]
        options["filename"] = await create_temp_overlay(session, backing.length)
        temp.append(options["filename"])
    if options["driver"] == PROBE:
        options["driver"], probed_raw = await _probe(session, options["file"])
        options["x-probed-raw"] = probed_raw
    node = await session.open_node(options)
    if detect_zeroes != "off":
        # -drive sets detect-zeroes on the opened node, past the unmap check -blockdev makes.
        node.detect_zeroes = detect_zeroes
        if node.common is not None:
            node.common = attrs.evolve(node.common, detect_zeroes=detect_zeroes)
    return node


async def _probe(session: Any, file: Node) -> tuple[str, bool]:
    header = bytearray(min(PROBE_BYTES, file.length))
    await io.preadv(file, 0, memoryview(header))
    fmt = session.registry.probe(bytes(header), file.filename)
    if fmt == "raw" and not file.read_only:
        session.warn(RAW_PROBE_WARNING.format(file.filename))
    return fmt, fmt == "raw"


async def create_temp_overlay(session: Any, size: int) -> str:
    """An empty qcow2 of ``size`` in $TMPDIR or /var/tmp, as QEMU's bdrv_append_temp_snapshot."""
    cls = session.registry.driver("qcow2")
    tmpdir = os.environ.get("TMPDIR") or "/var/tmp"
    fd, path = tempfile.mkstemp(prefix="vl.", dir=tmpdir)
    os.close(fd)
    try:
        await cls.create(session, path, structure(cls.CreateOptions, {"size": size}))
    except BaseException:
        _unlink(path)
        raise
    return path


async def _throttle_filter(session: Any, settings: dict[str, Any], root: Node) -> Node:
    """QEMU throttles a -drive in its BlockBackend; blockgraph keeps the backend small and puts the
    limits in an implicit throttle filter node from the blockgraph-throttle plugin instead."""
    try:
        return await session.open_node({"driver": "throttle", "throttle-group": settings["group"],
                                        "limits": settings["limits"], "file": root})
    except DriverNotFound:
        raise
    except BlockGraphError as e:
        raise BlockGraphError(f"throttling this drive needs blockgraph-throttle's -drive support: {e}") from None


async def open_temp_snapshot(session: Any, base: Node) -> Node:
    """snapshot=on for a node already open: an empty temporary qcow2 on top of it, deleted once open."""
    path = await create_temp_overlay(session, base.length)
    try:
        return await session.open_node({"driver": "qcow2", "backing": base, "cache": {"no-flush": True},
                                        "file": {"driver": "file", "filename": path}})
    finally:
        _unlink(path)  # QEMU deletes the overlay at once too; the open descriptor keeps it alive


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
