"""Permission bits and QEMU's default child permission rules (block.c: bdrv_default_perms*)."""

from __future__ import annotations

import pytest
from blockgraph.perms import ChildRole, Perm, default_child_perm, perm_names

CR, W, WU, RS, ALL = Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE, Perm.ALL
FILTERED, COW, DATA, META, PRIMARY = (ChildRole.FILTERED, ChildRole.COW, ChildRole.DATA, ChildRole.METADATA,
                                      ChildRole.PRIMARY)


def test_bits_are_qemus() -> None:
    # The file locks put these bits at bytes 100+bit and 200+bit, so they must never move.
    assert (int(CR), int(W), int(WU), int(RS), int(ALL)) == (0x1, 0x2, 0x4, 0x8, 0xF)
    assert int(ChildRole.IMAGE) == int(DATA | META | PRIMARY)


def test_perm_names() -> None:
    assert perm_names(CR | RS) == "consistent read, resize"
    assert perm_names(ALL) == "consistent read, write, write unchanged, resize"
    assert perm_names(Perm.NONE) == "none"


@pytest.mark.parametrize(("perm", "shared"), [(CR | W, CR | WU), (ALL, ALL), (Perm.NONE, ALL), (CR | RS, CR)])
def test_filtered_child_passes_everything_through(perm: Perm, shared: Perm) -> None:
    assert default_child_perm(FILTERED | PRIMARY, perm, shared, writable=True) == (perm, shared)
    assert default_child_perm(FILTERED | PRIMARY, perm | 0x10, shared | 0x10, writable=True) == (perm, shared)


@pytest.mark.parametrize(("perm", "shared", "want", "share"), [
    (CR | W | RS, ALL, CR, CR | WU | W | RS),
    (CR | W, CR | WU, CR, CR | WU),
    (W | WU, ALL, Perm.NONE, ALL),
    (Perm.NONE, Perm.NONE, Perm.NONE, CR | WU),
])
def test_cow_child_only_reads(perm: Perm, shared: Perm, want: Perm, share: Perm) -> None:
    assert default_child_perm(COW, perm, shared, writable=True) == (want, share)
    assert default_child_perm(COW, perm, shared, writable=False) == (want, share)


@pytest.mark.parametrize(("writable", "perm", "shared", "want", "share"), [
    (True, CR, ALL, CR | W | RS, CR | WU),
    (True, Perm.NONE, ALL, CR | W | RS, CR | WU),
    (False, Perm.NONE, ALL, CR, CR | WU),
    (False, CR, CR | WU, CR, CR | WU),
])
def test_metadata_child_never_shares_write_or_resize(writable: bool, perm: Perm, shared: Perm, want: Perm,
                                                     share: Perm) -> None:
    assert default_child_perm(META | PRIMARY, perm, shared, writable=writable) == (want, share)


@pytest.mark.parametrize(("perm", "shared", "want", "share"), [
    (CR | W, ALL, CR | W | RS, CR | W | WU),  # a written data file may grow; others may not resize it
    (CR | WU, ALL, CR | WU | W | RS, CR | W | WU),  # write-unchanged cannot be done as such on data
    (CR, CR | WU, CR, CR | WU),
    (CR, CR | RS, CR, CR),
])
def test_data_child(perm: Perm, shared: Perm, want: Perm, share: Perm) -> None:
    assert default_child_perm(DATA | PRIMARY, perm, shared, writable=True) == (want, share)


def test_image_child_combines_metadata_and_data() -> None:
    # qcow2's file: what real qemu-io locks on a qcow2 file opened RW is 100,101,103 + 201,203.
    assert default_child_perm(ChildRole.IMAGE, CR | W, ALL, writable=True) == (CR | W | RS, CR | WU)
    # qemu-img info (no I/O, read-only) on qcow2 locks 201,203 only; with I/O it also takes 100.
    assert default_child_perm(ChildRole.IMAGE, CR, ALL, writable=False) == (CR, CR | WU)
