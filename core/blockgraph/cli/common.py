"""Helpers shared by the qemu-img and qemu-io compatible subcommands."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import BlockGraphError
from ..plugins import PluginHost
from ..session import Session


def run_with_session(host: PluginHost, prog: str, body: Callable[[Session], Awaitable[int]]) -> int:
    """Run ``body(session)`` on a fresh loop; a BlockGraphError becomes ``prog: message`` and exit 1."""

    async def wrapper() -> int:
        session = Session(plugins=host, warn=lambda msg: print(msg, file=sys.stderr))
        try:
            return await body(session)
        finally:
            await session.close()

    try:
        return asyncio.run(wrapper())
    except BlockGraphError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1


def parse_cache_mode(mode: str) -> dict[str, Any]:
    """qemu's ``-t`` cache modes -> (write cache, cache.direct, cache.no-flush)."""
    table = {
        "writeback": (True, False, False), "none": (True, True, False), "off": (True, True, False),
        "writethrough": (False, False, False), "directsync": (False, True, False),
        "unsafe": (True, False, True),
    }
    if mode not in table:
        raise BlockGraphError(f"Invalid cache option: {mode}")
    wc, direct, no_flush = table[mode]
    return {"write_cache": wc, "cache_direct": direct, "no_flush": no_flush}


def size_to_str(n: int) -> str:
    """QEMU's size_to_str: three significant digits and a binary unit ("64 KiB", "1.5 GiB")."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value = float(n)
    i = 0
    while value >= 1000 and i < len(units) - 1:  # qemu switches unit once the value reaches 1000
        value /= 1024
        i += 1
    return f"{value:0.3g} {units[i]}"
