"""The ``set_backing`` driver hook: blockdev-snapshot (and blockdev-reopen) hand a driver its new backing child."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import helpers_pcow
import pytest
from blockgraph import io
from blockgraph.driver import Capabilities
from blockgraph.plugins import PluginHost
from blockgraph.qmp.commands_snapshot import append
from blockgraph.session import Session
from helpers_pcow import PcowDriver, pcow_chain, pimg


def test_capabilities_report_the_hook() -> None:
    from blockgraph_raw.driver import RawDriver
    from blockgraph_vhdx.driver import VhdxDriver
    from blockgraph_vmdk.driver import VmdkDriver

    for cls in (PcowDriver, VmdkDriver, VhdxDriver):
        assert Capabilities.of(cls).set_backing, cls.__name__
        assert "has_set_backing=1" in Capabilities.of(cls).lines()
    assert not Capabilities.of(RawDriver).set_backing


@pytest.mark.parametrize("detach", [False, True])
def test_snapshot_and_reopen_use_the_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detach: bool) -> None:
    (base,) = pcow_chain(tmp_path, {0: bytes([0x44]) * 4096})
    ov = str(tmp_path / "ov.pc")
    assert pimg("create", "-q", "-f", "pcow", ov, str(1 << 20)).rc == 0
    calls: list[Any] = []
    monkeypatch.setattr(PcowDriver, "set_backing", lambda self, child: (calls.append(child),
                                                                        setattr(self, "backing", child)))

    async def main() -> bytes:
        from blockgraph.qmp.commands_graph import _change_child

        session = Session(plugins=PluginHost(extra=[(helpers_pcow, "local:pcow")]))
        try:
            old = await session.open_image(base, fmt="pcow")
            overlay = await session.open_image(ov, fmt="pcow")
            await append(overlay, old, attach_backing=True)
            buf = bytearray(4096)
            await io.preadv(overlay, 0, memoryview(buf))
            if detach:
                await _change_child(overlay, "backing", None)
                await io.preadv(overlay, 0, memoryview(buf))
            return bytes(buf)
        finally:
            await session.close()

    data = asyncio.run(main())
    assert data == (bytes(4096) if detach else bytes([0x44]) * 4096)
    assert [c is None for c in calls] == ([False, True] if detach else [False])
