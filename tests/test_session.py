"""Session: opening images by filename, option inheritance, hooks, cleanup and shutdown."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from blockgraph import hookimpl
from blockgraph.errors import BlockGraphError, DriverNotFound, ImageLocked, OpenError, OptionError
from blockgraph.plugins import KNOWN_DRIVERS, PluginHost
from helpers_drivers import drivers_plugin


def open_fds_to(path: Path) -> list[str]:
    target = os.path.realpath(path)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                out.append(fd)
        except OSError:
            pass
    return out


# ---------------------------------------------------------------- filenames


def test_format_given_or_probed(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=65536)
    node = bg_runner.run(bg_session.open_image(str(path), fmt="raw"))
    assert node.driver_name == "raw" and not node.probed_raw
    assert node.file.node.driver_name == "file" and node.file.node.filename == str(path)
    assert node.filename == str(path) and node.length == 65536
    probed = bg_runner.run(bg_session.open_image(str(path), read_only=True))
    assert probed.driver_name == "raw" and probed.probed_raw


def test_protocol_prefixes(bg_session: Any, bg_runner: Any, tmp_path: Path, monkeypatch: Any) -> None:
    odd = tmp_path / "a:b.img"
    odd.write_bytes(bytes(4096))
    assert bg_runner.run(bg_session.open_image(f"file:{odd}", fmt="raw")).length == 4096
    monkeypatch.chdir(tmp_path)
    assert bg_runner.run(bg_session.open_image("./a:b.img", fmt="raw")).length == 4096
    with pytest.raises(OptionError, match="Unknown protocol 'a'"):
        bg_runner.run(bg_session.open_image("a:b.img", fmt="raw"))
    null = bg_runner.run(bg_session.open_image("null-co://", fmt="null-co"))
    assert null.driver_name == "null-co" and null.length == 1 << 30
    with pytest.raises(OptionError, match="The only allowed filename for this driver is 'null-co://'"):
        bg_runner.run(bg_session.open_image("null-co://x", fmt="raw"))


def test_protocol_as_format_opens_the_protocol_node_alone(bg_session: Any, bg_runner: Any,
                                                         bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=8192)
    node = bg_runner.run(bg_session.open_image(str(path), fmt="file"))
    assert node.driver_name == "file" and node.children == {} and node.length == 8192


def test_json_filenames(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=8192)
    node = bg_runner.run(bg_session.open_image(
        f'json:{{"driver": "raw", "size": 4096, "file": {{"driver": "file", "filename": "{path}"}}}}'))
    assert (node.driver_name, node.length) == ("raw", 4096)
    probed = bg_runner.run(bg_session.open_image(f'json:{{"file": {{"filename": "{path}"}}}}', read_only=True))
    assert probed.driver_name == "raw" and probed.probed_raw
    # Options given separately win over the json: ones (QEMU merges them the same way).
    sized = bg_runner.run(bg_session.open_image(
        f'json:{{"driver": "raw", "size": 4096, "file.filename": "{path}"}}', options={"size": 1024}))
    assert sized.length == 1024
    with pytest.raises(OptionError, match="must give a driver or a file"):
        bg_runner.run(bg_session.open_image('json:{"read-only": true}'))


def test_missing_drivers_say_what_to_install(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image()
    with pytest.raises(DriverNotFound, match="Unknown driver 'nosuchformat'"):
        bg_runner.run(bg_session.open_image(str(path), fmt="nosuchformat"))
    absent = [n for n in KNOWN_DRIVERS if n not in bg_session.registry.drivers and n not in
              bg_session.registry.aliases]
    if absent:
        dist = KNOWN_DRIVERS[absent[0]]
        with pytest.raises(DriverNotFound, match=f"is provided by {dist}, which is not installed"):
            bg_runner.run(bg_session.open_image(str(path), fmt=absent[0]))
    assert bg_session.nodes == {}


# ---------------------------------------------------------------- inheritance


def test_children_inherit_defaults_but_keep_explicit_options(tsession: Any, bg_runner: Any) -> None:
    top = bg_runner.run(tsession.open_node({
        "driver": "tcow", "node-name": "t", "read-only": True, "cache": {"direct": True, "no-flush": True},
        "file": {"driver": "ram", "node-name": "f", "cache": {"direct": False}},
        "backing": {"driver": "ram", "node-name": "b"}}))
    f, b = tsession.nodes["f"], tsession.nodes["b"]
    assert f.read_only and f.no_flush and f.common.cache_no_flush and not f.common.cache_direct
    assert b.read_only and b.common.cache_direct
    assert f.discard_unmap and not top.discard_unmap  # lower layers may unmap (bdrv_inherited_options)
    rw = bg_runner.run(tsession.open_node({"driver": "tcow", "node-name": "w",
                                           "file": {"driver": "ram", "node-name": "wf"},
                                           "backing": {"driver": "ram", "node-name": "wb"}}))
    assert not rw.file.node.read_only and rw.backing.node.read_only  # backing files are read-only


# ---------------------------------------------------------------- cleanup


def test_failed_open_closes_what_it_opened(bg_session: Any, bg_runner: Any, bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=4096)
    with pytest.raises(OpenError, match="8192"):
        bg_runner.run(bg_session.open_node({"driver": "raw", "offset": 8192,
                                            "file": {"driver": "file", "filename": str(path)}}))
    assert bg_session.nodes == {} and open_fds_to(path) == []
    with pytest.raises(OpenError, match=r"Could not open .*No such file or directory"):
        bg_runner.run(bg_session.open_image(str(path) + ".missing", fmt="raw"))
    assert bg_session.nodes == {}


def test_open_backend_that_cannot_lock_closes_its_nodes(bg_session: Any, bg_runner: Any,
                                                        bg_tmp_image: Any) -> None:
    path = bg_tmp_image(size=4096)
    first = bg_runner.run(bg_session.open_backend(str(path), fmt="raw"))  # does not share write
    names = set(bg_session.nodes)
    with pytest.raises(ImageLocked, match='Failed to get "write" lock'):
        bg_runner.run(bg_session.open_backend(str(path), fmt="raw", share_all=True))
    assert set(bg_session.nodes) == names and len(open_fds_to(path)) == 1
    bg_runner.run(first.close())
    assert bg_session.nodes == {} and open_fds_to(path) == []


def test_find_node(bg_session: Any) -> None:
    with pytest.raises(BlockGraphError, match="Cannot find device='ghost' nor node-name='ghost'"):
        bg_session.find_node("ghost")


def test_run_blocking_uses_the_pool(bg_session: Any, bg_runner: Any) -> None:
    async def go() -> str:
        return await bg_session.run_blocking(lambda: threading.current_thread().name)

    assert bg_runner.run(go()).startswith("blockgraph-io")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    @hookimpl
    def blockgraph_configure(self, session: Any) -> None:
        self.events.append(("configure", ""))

    @hookimpl
    def blockgraph_node_added(self, node: Any) -> None:
        self.events.append(("added", node.name))

    @hookimpl
    def blockgraph_node_removed(self, node: Any) -> None:
        self.events.append(("removed", node.name))

    @hookimpl
    def blockgraph_unconfigure(self, session: Any) -> None:
        self.events.append(("unconfigure", ""))


def test_close_flushes_and_closes_everything_and_calls_the_hooks(bg_runner: Any) -> None:
    from blockgraph.backend import BlockBackend
    from blockgraph.session import Session

    rec = Recorder()
    session = Session(plugins=PluginHost(extra=[drivers_plugin(), (rec, "recorder")]))
    top = bg_runner.run(session.open_node({"driver": "tcow", "node-name": "t",
                                           "file": {"driver": "ram", "node-name": "f"}}))
    blk = bg_runner.run(BlockBackend.attach_new(session, top, name="d0"))
    bg_runner.run(blk.pwritev(0, memoryview(bytearray(4096))))
    spare = bg_runner.run(session.open_node({"driver": "ram", "node-name": "spare"}))
    bg_runner.run(session.close())
    assert session.nodes == {} and session.backends == {} and top.closed and spare.closed
    events = session.events
    assert events.index(("f", "flush")) < events.index(("f", "close"))
    assert events.index(("t", "close")) < events.index(("f", "close"))
    assert rec.events[0] == ("configure", "") and rec.events[-1] == ("unconfigure", "")
    assert sorted(e for e in rec.events if e[0] == "added") == [("added", "f"), ("added", "spare"), ("added", "t")]
    assert sorted(e for e in rec.events if e[0] == "removed") == [("removed", "f"), ("removed", "spare"),
                                                                  ("removed", "t")]


def test_file_open_failing_after_the_open_call_keeps_no_descriptor(bg_session: Any, bg_runner: Any,
                                                                   bg_tmp_image: Any, monkeypatch: Any) -> None:
    from blockgraph_file import locking

    path = bg_tmp_image(size=4096)
    monkeypatch.setattr(locking, "supported", lambda fd: False)
    with pytest.raises(OpenError, match="locking=on but the file system does not support OFD locks"):
        bg_runner.run(bg_session.open_node({"driver": "file", "filename": str(path), "locking": "on"}))
    assert open_fds_to(path) == [] and bg_session.nodes == {}
