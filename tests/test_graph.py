"""The node graph: names, reference counting, attach/detach/replace as permission transactions."""

from __future__ import annotations

import re
from typing import Any

import pytest
from blockgraph.backend import BlockBackend
from blockgraph.errors import BlockGraphError, ImageLocked, OptionError, PermissionConflict
from blockgraph.node import attach, close_node, detach, replace
from blockgraph.perms import ChildRole, Perm

CR, W, WU, RS, ALL = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE, Perm.ALL


def ram(name: str | None = None, **opts: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"driver": "ram", "size": 1 << 16, **opts}
    if name:
        spec["node-name"] = name
    return spec


def snapshot(*nodes: Any) -> list[tuple]:
    """Everything a failed transaction must leave unchanged."""
    out = []
    for n in nodes:
        out.append((n.name, n.perm, n.shared, n.refcnt, [(c.name, id(c.parent), c.perm, c.shared) for c in n.parents],
                    {k: (id(c.node), c.perm, c.shared) for k, c in n.children.items()}))
    return out


# ---------------------------------------------------------------- names


def test_generated_names(tsession: Any, bg_runner: Any) -> None:
    a = bg_runner.run(tsession.open_node(ram()))
    b = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "top", "file": ram()}))
    assert re.fullmatch(r"#block\d{3}", a.name) and a.generated_name
    child = b.file.node
    assert re.fullmatch(r"#block\d{3}", child.name) and child.name != a.name
    assert not b.generated_name and tsession.nodes["top"] is b and tsession.nodes[child.name] is child
    assert tsession.find_node(a.name) is a


@pytest.mark.parametrize(("name", "message"), [
    ("1a", "Invalid node-name: '1a'"),
    ("a#", "Invalid node-name: 'a#'"),
    ("", "Invalid node-name: ''"),
    ("#block001", "Invalid node-name: '#block001'"),
    ("a" * 32, "Node name too long"),
])
def test_invalid_node_names(tsession: Any, bg_runner: Any, name: str, message: str) -> None:
    with pytest.raises(OptionError, match=re.escape(message)) as info:
        bg_runner.run(tsession.open_node({**ram(), "node-name": name}))
    assert info.value.option == "node-name"
    assert tsession.nodes == {}


def test_longest_node_name_and_allowed_characters(tsession: Any, bg_runner: Any) -> None:
    node = bg_runner.run(tsession.open_node(ram("a" * 28 + "-_.")))
    assert node.name == "a" * 28 + "-_."


def test_duplicate_names_are_refused(tsession: Any, bg_runner: Any) -> None:
    first = bg_runner.run(tsession.open_node(ram("d0")))
    with pytest.raises(OptionError, match=re.escape("Duplicate nodes with node-name='d0'")):
        bg_runner.run(tsession.open_node(ram("d0")))
    with pytest.raises(OptionError, match=re.escape("Duplicate nodes with node-name='x'")):
        bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "x", "file": ram("x")}))
    assert set(tsession.nodes) == {"d0"} and tsession.nodes["d0"] is first and not first.closed


def test_node_and_device_names_share_one_namespace(tsession: Any, bg_runner: Any) -> None:
    node = bg_runner.run(tsession.open_node(ram("n0")))
    bg_runner.run(BlockBackend.attach_new(tsession, node, name="dev0"))
    with pytest.raises(OptionError, match=re.escape("node-name=dev0 is conflicting with a device id")):
        bg_runner.run(tsession.open_node(ram("dev0")))
    with pytest.raises(OptionError, match=re.escape("Device name 'n0' conflicts with an existing node name")):
        bg_runner.run(BlockBackend.attach_new(tsession, node, name="n0", read_only=True, share_all=True))
    with pytest.raises(OptionError, match=re.escape("Device with id 'dev0' already exists")):
        bg_runner.run(BlockBackend.attach_new(tsession, node, name="dev0", read_only=True, share_all=True))
    assert len(node.parents) == 1


def test_child_reference_by_node_name(tsession: Any, bg_runner: Any) -> None:
    base = bg_runner.run(tsession.open_node(ram("f0")))
    top = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "t0", "file": "f0"}))
    assert top.file.node is base and base.parents == [top.file]
    with pytest.raises(BlockGraphError, match="Cannot find device='nope' nor node-name='nope'"):
        bg_runner.run(tsession.open_node({"driver": "tcow", "file": "nope"}))


# ---------------------------------------------------------------- reference counting


def test_shared_child_closes_with_its_last_parent(tsession: Any, bg_runner: Any) -> None:
    a = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "a", "read-only": True,
                                          "file": ram("shared")}))
    shared = tsession.nodes["shared"]
    b = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "b", "read-only": True,
                                          "file": "shared"}))
    assert shared.refcnt == 2 and [c.parent for c in shared.parents] == [a, b]
    bg_runner.run(close_node(a))
    assert a.closed and not shared.closed and shared.refcnt == 1
    assert [c.parent for c in shared.parents] == [b] and "shared" in tsession.nodes
    assert ("close",) not in shared.driver.calls
    bg_runner.run(close_node(b))
    assert shared.closed and shared.refcnt == 0 and "shared" not in tsession.nodes
    assert shared.driver.calls.count(("close",)) == 1


def test_backend_detach_releases_permissions_and_closes(tsession: Any, bg_runner: Any) -> None:
    node = bg_runner.run(tsession.open_node(ram("r0")))
    blk = bg_runner.run(BlockBackend.attach_new(tsession, node, name="d"))
    assert (node.perm, node.shared) == (CR | W, CR | WU) and node.refcnt == 1
    bg_runner.run(blk.close())
    assert node.closed and node.parents == [] and "d" not in tsession.backends


def test_failed_open_leaves_nothing_behind(tsession: Any, bg_runner: Any) -> None:
    with pytest.raises(OptionError):
        bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "t", "file": ram("f"), "bogus": 1}))
    assert tsession.nodes == {} and not hasattr(tsession, "events")  # refused before any child opened
    with pytest.raises(BlockGraphError, match="Cannot find device='nope' nor node-name='nope'"):
        bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "t", "file": ram("f"), "backing": "nope"}))
    assert tsession.nodes == {}
    events = getattr(tsession, "events", [])
    assert ("f", "close") in events  # the child that did open was closed again


def test_a_child_name_cannot_be_attached_twice(tsession: Any, bg_runner: Any) -> None:
    top = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "t", "file": ram("f")}))
    other = bg_runner.run(tsession.open_node(ram("g")))
    before = snapshot(top, other, top.file.node)
    with pytest.raises(BlockGraphError, match="already has a 'file' child"):
        attach(top, other, "file", ChildRole.IMAGE)
    assert snapshot(top, other, top.file.node) == before


# ---------------------------------------------------------------- transactions and conflicts


def test_conflicting_attach_changes_nothing_and_names_both_users(tsession: Any, bg_runner: Any) -> None:
    top = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "t", "file": ram("f")}))
    f = top.file.node
    first = bg_runner.run(BlockBackend.attach_new(tsession, top, name="first"))
    assert (f.perm, f.shared) == (CR | W | RS, CR | WU)
    before = snapshot(top, f)
    with pytest.raises(PermissionConflict) as info:
        bg_runner.run(BlockBackend.attach_new(tsession, top, name="second"))
    assert str(info.value) == (
        "Permission conflict on node 't': permissions 'write' are both required by block device 'first' "
        "(uses node 't' as 'root' child) and unshared by block device 'second' (uses node 't' as 'root' child).")
    assert snapshot(top, f) == before and "second" not in tsession.backends
    assert top.parents == [first.root]
    # A reader that shares everything is fine, and detaching it restores the same state.
    reader = bg_runner.run(BlockBackend.attach_new(tsession, top, read_only=True, share_all=True))
    assert len(top.parents) == 2
    bg_runner.run(reader.close())
    assert snapshot(top, f) == before


def test_unnamed_users_in_conflict_messages(tsession: Any, bg_runner: Any) -> None:
    node = bg_runner.run(tsession.open_node(ram("r")))
    bg_runner.run(BlockBackend.attach_new(tsession, node, read_only=True))  # unshares write
    with pytest.raises(PermissionConflict, match=re.escape(
            "permissions 'write' are both required by an unnamed block device (uses node 'r' as 'root' child) "
            "and unshared by an unnamed block device (uses node 'r' as 'root' child).")):
        bg_runner.run(BlockBackend.attach_new(tsession, node, share_all=True))


def test_node_parent_conflicts_with_an_exclusive_writer(tsession: Any, bg_runner: Any) -> None:
    f = bg_runner.run(tsession.open_node(ram("f")))
    bg_runner.run(BlockBackend.attach_new(tsession, f, name="dev"))
    before = snapshot(f)
    # A format node over "f" never shares write on its metadata child, and "dev" writes.
    with pytest.raises(PermissionConflict) as info:
        bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "fmt", "read-only": True, "file": "f"}))
    msg = str(info.value)
    assert "block device 'dev'" in msg and "node 'fmt'" in msg and "'write'" in msg
    assert snapshot(f) == before and "fmt" not in tsession.nodes


def test_perms_propagate_through_the_chain(tsession: Any, bg_runner: Any) -> None:
    top = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "top", "file": ram("tf"),
                                            "backing": {"driver": "tcow", "node-name": "base",
                                                        "file": ram("bf")}}))
    base, tf, bf = tsession.nodes["base"], tsession.nodes["tf"], tsession.nodes["bf"]
    assert base.read_only  # backing children are opened read-only
    assert (tf.perm, tf.shared) == (CR | W | RS, CR | WU)  # writable metadata child, before any user
    blk = bg_runner.run(BlockBackend.attach_new(tsession, top, share_all=True))
    assert (top.perm, top.shared) == (CR | W, ALL)
    assert (base.perm, base.shared) == (CR, ALL)  # backing: read only, shares write since the user does
    assert (bf.perm, bf.shared) == (CR, CR | WU)  # read-only metadata child still unshares write/resize
    blk.set_perm(CR | W, CR | WU)
    assert (base.perm, base.shared) == (CR, CR | WU)


def test_raw_window_takes_only_what_parents_ask(tsession: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    """raw with offset has a DATA child; like QEMU it does not add resize (qemu-io: locks 100,101,203)."""
    path = bg_tmp_image(size=8192)
    node = bg_runner.run(tsession.open_node({"driver": "raw", "offset": 512, "file": {
        "driver": "file", "filename": str(path)}}))
    bg_runner.run(BlockBackend.attach_new(tsession, node, share_all=True))
    f = node.file.node
    assert (f.perm, f.shared) == (CR | W, CR | W | WU)
    plain = bg_runner.run(tsession.open_node({"driver": "raw", "file": {"driver": "file", "filename": str(path)},
                                              "read-only": True}))
    bg_runner.run(BlockBackend.attach_new(tsession, plain, read_only=True, share_all=True))
    assert (plain.file.node.perm, plain.file.node.shared) == (CR, ALL)  # filtered: passed through


def test_force_share_shares_everything(tsession: Any, bg_runner: Any) -> None:
    with pytest.raises(OptionError, match="force-share=on can only be used with read-only images"):
        bg_runner.run(tsession.open_node(ram("x", **{"force-share": True})))
    top = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "t", "read-only": True,
                                            "force-share": True, "file": ram("f")}))
    f = top.file.node
    assert f.common.force_share  # inherited from the parent
    bg_runner.run(BlockBackend.attach_new(tsession, top, read_only=True))
    assert (f.perm, f.shared) == (CR, ALL)
    plain = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "p", "read-only": True,
                                              "file": ram("g")}))
    assert plain.file.node.shared == CR | WU


class User:
    """A graph user that is not a node (like a job or an export)."""

    def describe(self) -> str:
        return "a test user"


def test_perm_hook_refusal_rolls_back_every_node(tsession: Any, bg_runner: Any) -> None:
    top = bg_runner.run(tsession.open_node({
        "driver": "tcow", "node-name": "top", "read-only": True,
        "file": {"driver": "ram-locky", "node-name": "lf", "refuse-unshare": int(WU)},
        "backing": {"driver": "ram-locky", "node-name": "lb"}}))
    lf, lb = tsession.nodes["lf"], tsession.nodes["lb"]
    lf.driver.perm_calls.clear()
    lb.driver.perm_calls.clear()
    before = snapshot(top, lf, lb)
    # The backing node is checked (and accepts) first, then the file refuses to stop sharing write-unchanged.
    with pytest.raises(ImageLocked, match="lf: must share write unchanged"):
        attach(User(), top, "root", ChildRole.IMAGE, perm=CR, shared=CR)
    assert snapshot(top, lf, lb) == before and top.parents == []
    assert [c[0] for c in lb.driver.perm_calls] == ["check", "abort"]
    assert [c[0] for c in lf.driver.perm_calls] == ["check"]  # the refusing driver cleans up itself (as QEMU)
    # The same attach that keeps sharing write-unchanged goes through and sets both.
    attach(User(), top, "root", ChildRole.IMAGE, perm=CR, shared=CR | WU)
    assert [c[0] for c in lb.driver.perm_calls] == ["check", "abort", "check", "set"]
    assert (lb.perm, lf.perm, lf.shared) == (CR, CR, CR | WU)


def test_detach_and_reattach(tsession: Any, bg_runner: Any) -> None:
    top = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "t", "file": ram("f")}))
    f = top.file.node
    bg_runner.run(BlockBackend.attach_new(tsession, f, read_only=True, share_all=True))  # keeps f alive
    bg_runner.run(detach(top.file))
    assert "file" not in top.children and [c.parent for c in f.parents] != [top]
    assert not f.closed and (f.perm, f.shared) == (CR, ALL)
    child = attach(top, f, "file", ChildRole.IMAGE)
    assert top.file is child and f.refcnt == 2 and (f.perm, f.shared) == (CR | W | RS, CR | WU)


def test_replace_moves_an_edge_or_changes_nothing(tsession: Any, bg_runner: Any) -> None:
    n1 = bg_runner.run(tsession.open_node(ram("n1")))
    n2 = bg_runner.run(tsession.open_node(ram("n2")))
    n3 = bg_runner.run(tsession.open_node(ram("n3")))
    blk = bg_runner.run(BlockBackend.attach_new(tsession, n1, name="d"))
    replace(blk.root, n2)
    assert blk.node is n2 and n1.parents == [] and n2.parents == [blk.root]
    assert (n2.refcnt, n1.refcnt) == (1, 0) and (n1.perm, n2.perm) == (Perm.NONE, CR | W)
    bg_runner.run(BlockBackend.attach_new(tsession, n3, name="e"))  # n3 has an exclusive writer
    before = snapshot(n2, n3)
    with pytest.raises(PermissionConflict) as info:
        replace(blk.root, n3)
    assert "block device 'd'" in str(info.value) and "block device 'e'" in str(info.value)
    assert blk.node is n2 and snapshot(n2, n3) == before
