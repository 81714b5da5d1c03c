"""``img info``: qemu-img's ImageInfo, human or JSON, for an image or its whole backing chain.

Generic over drivers: a driver's optional ``info()`` (plain or async) returns a
dict. Keys that are ImageInfo fields (``cluster-size``, ``dirty-flag``,
``encrypted``, ``backing-filename``, ``full-backing-filename``,
``backing-filename-format``, ``snapshots``, ``compressed``) go to the top
level; everything else is the "format-specific" data, typed with the driver's
name. As in qemu-img the image is opened without taking any permission, so
info works on images other processes are using.
"""

from __future__ import annotations

import inspect
import sys
from typing import TYPE_CHECKING, Any

from .img_opts import CommonFlags, Getopt, expect, one_of_output, shared_long
from .img_qjson import dump_human, dumps
from .img_util import allocated_size, open_node, run, size_to_str

if TYPE_CHECKING:
    from ..node import Node
    from ..plugins import PluginHost
    from ..session import Session

TOP_LEVEL = ("cluster-size", "encrypted", "compressed", "dirty-flag", "backing-filename",
             "full-backing-filename", "backing-filename-format", "snapshots")
SIMPLE_KEYS = {"driver", "file", "filename", "read-only", "force-share", "cache", "discard", "detect-zeroes"}


def display_name(given: str, image_opts: bool) -> str:
    """The name qemu prints: the filename as given, or a ``json:`` rendering of non-trivial options."""
    import json

    if not image_opts and not given.startswith("json:"):
        return given
    from .img_util import image_opts_filename

    tree = json.loads((image_opts_filename(given) if image_opts else given)[5:])
    plain = _plain_filename(tree)
    return plain if plain is not None else "json:" + dumps(tree, pretty=False)


def exact_filename(node: Node) -> str | None:
    """A protocol's own canonical name when the image is just a format over it (QEMU's bdrv_refresh_filename
    rebuilds ``nbd://host:port/export`` from the options); None when the driver has no such name."""
    cur = node.file.node if node.file is not None and node.kind.value == "format" else node
    exact = getattr(cur.driver, "exact_filename", None)
    return exact() if callable(exact) else None


def _plain_filename(tree: dict[str, Any]) -> str | None:
    if not set(tree) <= SIMPLE_KEYS:
        return None
    file = tree.get("file")
    if isinstance(file, dict):
        if set(file) <= {"driver", "filename"} and file.get("driver", "file") == "file" and "filename" in file:
            return str(file["filename"])
        return None
    if isinstance(file, str):
        return None
    if "filename" in tree and tree.get("driver", "file") in ("file", "raw"):
        return str(tree["filename"])
    return None


def _has_info(node: Node | None) -> bool:
    depth = 0
    while node is not None and depth < 64:
        if callable(getattr(node.driver, "info", None)):
            return True
        child = node.file or node.filtered
        node = child.node if child is not None else None
        depth += 1
    return False


async def driver_info(node: Node) -> dict[str, Any]:
    fn = getattr(node.driver, "info", None)
    if not callable(fn):
        return {}
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return dict(result or {})


async def image_info(node: Node, filename: str) -> dict[str, Any]:
    """ImageInfo for one node, keys inserted in QAPI order (QEMU's JSON order depends on it)."""
    extra = await driver_info(node)
    info: dict[str, Any] = {"filename": filename, "format": node.driver_name}
    if _has_info(node):
        info["dirty-flag"] = bool(extra.get("dirty-flag", False))
    actual = allocated_size(node)
    if actual is not None:
        info["actual-size"] = actual
    info["virtual-size"] = node.length
    cluster = extra.get("cluster-size", getattr(node.driver, "cluster_size", None))
    if isinstance(cluster, int) and cluster > 0:
        info["cluster-size"] = cluster
    for key in ("encrypted", "compressed"):
        if extra.get(key):
            info[key] = True
    for key in ("backing-filename", "full-backing-filename", "backing-filename-format", "snapshots"):
        if extra.get(key) is not None:
            info[key] = extra[key]
    if "snapshots" not in info and getattr(getattr(node, "caps", None), "snapshot", False):
        from .img_snapshot import list_snapshots, to_qapi

        snapshots = await list_snapshots(node)
        if snapshots:
            info["snapshots"] = [to_qapi(sn) for sn in snapshots]
    if "backing-filename" not in info and node.cow_child() is not None:
        backing = node.cow_child().node
        info["backing-filename"] = info["full-backing-filename"] = backing.filename
        info["backing-filename-format"] = backing.driver_name
    specific = extra.get("format-specific")
    if not isinstance(specific, dict):
        data = {k: v for k, v in extra.items() if k not in TOP_LEVEL and k != "format-specific"}
        specific = {"type": node.driver_name, "data": data} if data else None
    if specific:
        info["format-specific"] = specific
    return info


async def chain_info(node: Node, given: str, image_opts: bool = False, chain: bool = False) -> list[dict[str, Any]]:
    """ImageInfo of ``node`` opened as ``given``, then (with ``chain``) of each backing image below it.

    Also behind :meth:`blockgraph.sync.Image.info`.
    """
    infos = [await image_info(node, exact_filename(node) or display_name(given, image_opts))]
    seen = {id(node)}
    cur = node.cow_child().node if chain and node.cow_child() is not None else None
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        infos.append(await image_info(cur, cur.filename))
        cur = cur.cow_child().node if cur.cow_child() is not None else None
    return infos


def human(info: dict[str, Any]) -> list[str]:
    actual = info.get("actual-size")
    lines = [f"image: {info['filename']}", f"file format: {info['format']}",
             f"virtual size: {size_to_str(info['virtual-size'])} ({info['virtual-size']} bytes)",
             f"disk size: {size_to_str(actual) if actual is not None else 'unavailable'}"]
    if info.get("encrypted"):
        lines.append("encrypted: yes")
    if "cluster-size" in info:
        lines.append(f"cluster_size: {info['cluster-size']}")
    if info.get("dirty-flag"):
        lines.append("cleanly shut down: no")
    if info.get("backing-filename"):
        line = f"backing file: {info['backing-filename']}"
        full = info.get("full-backing-filename")
        if not full:
            line += " (cannot determine actual path)"
        elif full != info["backing-filename"]:
            line += f" (actual path: {full})"
        lines.append(line)
        if info.get("backing-filename-format"):
            lines.append(f"backing file format: {info['backing-filename-format']}")
    if info.get("snapshots"):
        lines += snapshot_lines(info["snapshots"])
    specific = info.get("format-specific")
    if specific and specific.get("data"):
        lines.append("Format specific information:")
        lines += dump_human(specific["data"], 1)
    return lines


def snapshot_lines(snapshots: list[dict[str, Any]]) -> list[str]:
    from ..driver import SnapshotInfo
    from .img_snapshot import table

    return table([SnapshotInfo(id=str(sn.get("id", "")), name=str(sn.get("name", "")),
                               vm_state_size=int(sn.get("vm-state-size", 0)), date_sec=int(sn.get("date-sec", 0)),
                               date_nsec=int(sn.get("date-nsec", 0)),
                               vm_clock_nsec=int(sn.get("vm-clock-sec", 0)) * 1_000_000_000
                               + int(sn.get("vm-clock-nsec", 0)), icount=sn.get("icount"))
                  for sn in snapshots])


def main(argv: list[str], host: PluginHost) -> int:
    return run(host, lambda session: _main(session, argv))


async def _main(session: Session, argv: list[str]) -> int:
    long = shared_long("object", "image-opts", "force-share") | {
        "format": (True, "f"), "output": (True, "output"), "backing-chain": (False, "backing-chain")}
    opts, rest = Getopt("f:hU", long).parse(argv)
    fmt = output = None
    chain = False
    common = CommonFlags()
    for key, value in common.own(opts):
        if key == "f":
            fmt = value
        elif key == "output":
            output = value
        elif key == "backing-chain":
            chain = True
    expect(rest, 1, "Expecting one image file name")
    output = one_of_output(output)
    filename = rest[0]
    node = await open_node(session, filename, fmt=fmt, image_opts=common.image_opts, read_only=True,
                           force_share=common.force_share)
    infos = await chain_info(node, filename, common.image_opts, chain)
    if output == "json":
        sys.stdout.write(dumps(infos if chain else infos[0]) + "\n")
    else:
        sys.stdout.write("\n\n".join("\n".join(human(i)) for i in infos) + "\n")
    return 0
