"""Backing file names resolve against the image's directory, as QEMU's path_combine does."""

from __future__ import annotations

import pytest
from blockgraph.backing import full_backing_filename
from blockgraph.errors import OpenError
from blockgraph.plugins import PluginHost


@pytest.fixture(scope="module")
def registry() -> PluginHost:
    return PluginHost()


@pytest.mark.parametrize(("image", "backing", "want"), [
    ("/srv/vm/top.qcow2", "base.qcow2", "/srv/vm/base.qcow2"),
    ("/srv/vm/top.qcow2", "../base.qcow2", "/srv/vm/../base.qcow2"),
    ("/srv/vm/top.qcow2", "/abs/base.qcow2", "/abs/base.qcow2"),
    ("top.qcow2", "base.qcow2", "base.qcow2"),
    ("dir/top.qcow2", "sub/base.raw", "dir/sub/base.raw"),
    ("/srv/vm/top.qcow2", "null-co://", "null-co://"),
    ("/srv/vm/top.qcow2", 'json:{"driver": "null-co"}', 'json:{"driver": "null-co"}'),
])
def test_relative_names_follow_the_image(registry: PluginHost, image: str, backing: str, want: str) -> None:
    assert full_backing_filename(image, backing, registry) == want


def test_relative_name_under_a_json_image_is_refused(registry: PluginHost) -> None:
    with pytest.raises(OpenError, match="Cannot use relative backing file names for 'json:"):
        full_backing_filename('json:{"file": {"filename": "/x"}}', "base.img", registry)


@pytest.mark.parametrize("spelling", [None, ""])
def test_backing_null_or_empty_opens_no_backing_file(tmp_path, spelling) -> None:
    """``backing=null`` (JSON) and ``backing=`` (keyval) both mean: ignore the backing file the image names."""
    import asyncio
    import subprocess

    from blockgraph.session import Session

    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "1M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(top)],
                   check=True)

    async def open_top() -> tuple[bool, bool]:
        session = Session()
        try:
            plain = await session.open_node({"driver": "qcow2", "file": {"driver": "file", "filename": str(top)}})
            cut = await session.open_node({"driver": "qcow2", "backing": spelling, "read-only": True,
                                           "force-share": True,
                                           "file": {"driver": "file", "filename": str(top)}})
            return plain.backing is not None, cut.backing is not None
        finally:
            await session.close()

    assert asyncio.run(open_top()) == (True, False)
