"""Probing as QEMU's vmdk_probe, and img info of an image chain against qemu-img."""

from __future__ import annotations

from pathlib import Path

import pytest
from blockgraph_vmdk.driver import VmdkDriver
from vmdk_helpers import BLOCKGRAPH, QEMU_IMG, needs_qemu, run


@pytest.mark.parametrize(("head", "score"), [
    (b"KDMV\x01\x00\x00\x00", 100),
    (b"COWD\x01\x00\x00\x00", 100),
    (b"# Disk DescriptorFile\nversion=1\nCID=1\n", 100),
    (b"# comment\n# another\nversion=3\r\n", 100),
    (b"   \n  \r\nversion=2\n", 100),  # lines of spaces may come first
    (b"\nversion=1\n", 0),  # an empty line may not (QEMU's quirk)
    (b"# Disk DescriptorFile\nversion=4\n", 0),
    (b"version=1", 0),  # no end of line
    (b"createType=\"monolithicFlat\"\nversion=1\n", 0),
    (b"KDM", 0),
    (b"\0" * 512, 0),
])
def test_probe_scores_as_qemu(head: bytes, score: int) -> None:
    assert VmdkDriver.probe(head, "x.vmdk") == score


@needs_qemu
def test_info_of_a_chain_matches_qemu(tmp_path: Path) -> None:
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", tmp_path / "base.vmdk", "1M")
    run(QEMU_IMG, "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", tmp_path / "top.vmdk")
    for argv in (["info", tmp_path / "top.vmdk"], ["info", "--backing-chain", tmp_path / "top.vmdk"],
                 ["info", "--output=json", "--backing-chain", tmp_path / "top.vmdk"]):
        assert run(BLOCKGRAPH, "img", *argv).stdout == run(QEMU_IMG, *argv).stdout
